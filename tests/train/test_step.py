"""The single-device train step: loss falls, exact bias-update rule, non-finite skip, schedules,
decay mask."""

import dataclasses
import functools

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

MODEL = config_lib.ModelConfig(
    vocab_size=32,
    d_model=32,
    n_layers=2,
    first_k_dense_replace=1,
    intermediate_size=48,
    n_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    mtp_depth=1,
    init_std=0.1,
)
TRAIN = train_config.TrainConfig(
    steps=40,
    global_batch_size=4,
    seq_len=16,
    lr=1e-2,
    warmup_steps=4,
    bias_update_rate=train_config.Piecewise((0.01,)),
)


def batch(seed: int):
    # A learnable stream: each row counts up by a row-specific stride (mod vocab).
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 32, (4, 1))
    stride = rng.integers(1, 4, (4, 1))
    seq = (start + stride * np.arange(17)[None]) % 32
    return Batch(
        inputs=jnp.asarray(seq[:, :-1], jnp.int32),
        targets=jnp.asarray(seq[:, 1:], jnp.int32),
        loss_mask=jnp.ones((4, 16), jnp.float32),
        target_bytes=jnp.ones((4, 16), jnp.int32),
    )


@functools.cache
def initial_state():
    """MODEL's parameters and fresh AdamW state, compiled and drawn once for this module and the
    step tests of options that leave the parameters alone (attention, grouped matmul)."""
    return state_lib.init_state(MODEL, optim.optimizer(TRAIN), 0)


@pytest.fixture(scope="module")
def setup():
    tx = optim.optimizer(TRAIN)
    graphdef, _, _ = state_lib.abstract_model(MODEL)
    fn = jax.jit(step_lib.make_train_step(graphdef, TRAIN, tx))  # no donation: tests reuse states
    return tx, fn, initial_state()


def test_loss_falls_and_biases_move(setup):
    _, fn, state = setup
    losses = []
    for i in range(TRAIN.steps):
        before = [np.asarray(b) for b in jax.tree.leaves(state.expert_bias)]  # [moe, mtp]
        state, m = fn(state, batch(i))
        losses.append(float(m["loss"]))
        # b += gamma * sign(mean load - load), per MoE layer (main layer, then the MTP layer)
        load = np.asarray(m["expert_load"])
        assert load.shape == (2, 4)
        np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
        after = [np.asarray(b) for b in jax.tree.leaves(state.expert_bias)]
        for layer, (b0, b1) in enumerate(zip(before, after)):
            want = 0.01 * np.sign(load[layer].mean() - load[layer])
            np.testing.assert_allclose(b1[0] - b0[0], want, atol=1e-7)
    assert int(state.step) == TRAIN.steps
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_non_finite_step_changes_nothing(setup):
    _, fn, state = setup
    state, _ = fn(state, batch(0))  # a real optimizer state first
    bad = dataclasses.replace(batch(1), loss_mask=jnp.full((4, 16), jnp.nan))
    new, m = fn(state, bad)
    assert int(m["skipped"]) == 1 and not bool(m["loss_finite"])
    assert int(new.step) == int(state.step) + 1
    for a, b in zip(
        jax.tree.leaves((state.params, state.expert_bias, state.opt_state)),
        jax.tree.leaves((new.params, new.expert_bias, new.opt_state)),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    good, m = fn(new, batch(2))
    assert int(m["skipped"]) == 0


def test_learning_rate_schedule_shape():
    cfg = train_config.TrainConfig(
        steps=100, lr=1.0, lr_final=0.1, warmup_steps=10, constant_steps=20, decay_steps=50
    )
    lr = optim.learning_rate(cfg)
    assert float(lr(0)) == 0.0 and abs(float(lr(5)) - 0.5) < 1e-6
    assert float(lr(10)) == 1.0 and float(lr(29)) == 1.0
    assert abs(float(lr(55)) - (0.1 + 0.9 * 0.5)) < 1e-6  # cosine midpoint
    assert abs(float(lr(80)) - 0.1) < 1e-6 and abs(float(lr(99)) - 0.1) < 1e-6


def test_piecewise_and_decay_mask():
    sched = train_config.Piecewise((0.3, 0.1), (100,))
    assert [
        float(optim.piecewise(sched, jnp.int32(s))) for s in (0, 99, 100, 500)
    ] == pytest.approx([0.3, 0.3, 0.1, 0.1])
    with pytest.raises(ValueError, match="len\\(values\\) == len\\(boundaries\\) \\+ 1"):
        train_config.Piecewise((0.3, 0.1))
    _, params, _ = state_lib.abstract_model(MODEL)
    mask = optim.decay_mask(params)
    assert mask["embed"]["embedding"] and mask["moe_layers"]["ffn"]["w1"]
    assert mask["moe_layers"]["attn"]["wq_b"]["kernel"]
    assert not mask["norm"]["weight"] and not mask["moe_layers"]["attn"]["kv_norm"]["weight"]
    assert not mask["mtp"]["layers"]["enorm"]["weight"]
