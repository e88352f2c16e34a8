"""The train step with each attention implementation gives the same losses: dense, blockwise
(blocks that divide neither the sequence nor each other, so padding and several causal blocks
are exercised), and blockwise under the full and dots remat policies (its custom VJP inside
jax.checkpoint)."""

import dataclasses

import jax
import numpy as np
import pytest

from deepseek_jax.model import config as config_lib
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib
from tests.train import test_step

MODEL, TRAIN = test_step.MODEL, test_step.TRAIN
STEPS = 5
BLOCKWISE = config_lib.AttentionConfig(config_lib.AttentionImpl.BLOCKWISE, block_q=5, block_k=3)


def run(model: config_lib.ModelConfig):
    tx = optim.optimizer(TRAIN)
    graphdef, _, _ = state_lib.abstract_model(model)
    fn = jax.jit(step_lib.make_train_step(graphdef, TRAIN, tx))
    state = test_step.initial_state()  # the attention implementation changes no parameter
    losses = []
    for i in range(STEPS):
        state, m = fn(state, test_step.batch(i))
        losses.append(float(m["loss"]))
    return np.asarray(losses), state


@pytest.fixture(scope="module")
def dense():
    return run(MODEL)


@pytest.mark.parametrize(
    "variant",
    [
        dict(attention=BLOCKWISE),
        dict(attention=BLOCKWISE, remat=config_lib.RematPolicy.FULL),
        dict(attention=BLOCKWISE, remat=config_lib.RematPolicy.DOTS),
    ],
    ids=["blockwise", "blockwise-remat-full", "blockwise-remat-dots"],
)
def test_same_losses_as_dense(dense, variant):
    want, want_state = dense
    got, got_state = run(dataclasses.replace(MODEL, **variant))
    assert want[-1] < want[0]  # the steps did train
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
