"""`model.loss_chunk_tokens`: the step with the fused chunked head + CE equals the step on the
logits (loss, every metric and every gradient, masked tokens, MTP depths, tied and untied head),
and the trainer gives the same losses for 5 steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.batch import Batch
from deepseek_jax.model import config as config_lib
from deepseek_jax.train import config as train_config
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib

TOL = 1e-6


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


CFG = config_lib.ModelConfig(
    vocab_size=61, d_model=32, n_layers=2, intermediate_size=48, n_routed_experts=4, mtp_depth=2
)
TRAIN = train_config.TrainConfig(global_batch_size=2, seq_len=13, warmup_steps=0, lr=3e-3)


def batch() -> Batch:
    rng = np.random.default_rng(1)
    seq = rng.integers(0, CFG.vocab_size, (2, 14))
    mask = np.ones((2, 13), np.float32)
    mask[0, 3:6] = 0  # masked tokens, also shifted into the MTP masks
    return Batch(
        inputs=jnp.asarray(seq[:, :-1], jnp.int32),
        targets=jnp.asarray(seq[:, 1:], jnp.int32),
        loss_mask=jnp.asarray(mask),
        target_bytes=jnp.ones((2, 13), jnp.int32),
    )


@pytest.mark.parametrize("tied", [False, True])
def test_objective_fused_equals_logits(tied):
    results = []
    # One init for both: the chunking changes the loss computation, not the parameters.
    st = state_lib.init_state(
        dataclasses.replace(CFG, tie_embeddings=tied), optim.optimizer(TRAIN), 0
    )
    for chunk in (0, 7):  # 7 divides neither 26 tokens nor anything else
        cfg = dataclasses.replace(CFG, loss_chunk_tokens=chunk, tie_embeddings=tied)
        graphdef, _, _ = state_lib.abstract_model(cfg)
        fn = jax.jit(lambda s, b, g=graphdef: step_lib.loss_and_grads(g, TRAIN, s, b))
        loss, (metrics, _, _), grads = fn(st, batch())
        results.append((loss, metrics, grads))
    (l0, m0, g0), (l1, m1, g1) = results
    assert max_rel(l1, l0) <= TOL
    for key in ("lm_loss", "mtp_loss", "mtp_loss_per_depth", "balance_loss"):
        assert max_rel(m1[key], m0[key]) <= TOL, key
    for path, a, b in zip(jax.tree.leaves_with_path(g1), jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert max_rel(a, b) <= TOL, jax.tree_util.keystr(path[0])


def test_trainer_same_losses():
    runs = []
    tx = optim.optimizer(TRAIN)
    start = state_lib.init_state(CFG, tx, 0)  # the chunking does not change the parameters
    for chunk in (0, 10):
        cfg = dataclasses.replace(CFG, loss_chunk_tokens=chunk)
        st = start
        graphdef, _, _ = state_lib.abstract_model(cfg)
        fn = jax.jit(step_lib.make_train_step(graphdef, TRAIN, tx))
        losses_ = []
        for _ in range(5):
            st, metrics = fn(st, batch())
            losses_.append(float(metrics["loss"]))
        runs.append(losses_)
    assert runs[0][-1] < runs[0][0]  # it trains
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)
