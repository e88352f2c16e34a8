"""The train step with each `model.grouped_matmul` gives the same losses, and the option reaches
the MoE layers (the traced step holds ragged_dot exactly when RAGGED_DOT is chosen)."""

import dataclasses

import jax
import numpy as np
import pytest

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import grouped
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib
from tests.train import test_step

G = config_lib.GroupedMatmul
STEPS = 5


def run(impl: G):
    model = dataclasses.replace(test_step.MODEL, grouped_matmul=impl)
    tx = optim.optimizer(test_step.TRAIN)
    graphdef, _, _ = state_lib.abstract_model(model)
    step = step_lib.make_train_step(graphdef, test_step.TRAIN, tx)
    state = test_step.initial_state()  # the grouped matmul changes no parameter
    jaxpr = str(jax.make_jaxpr(step)(state, test_step.batch(0)))
    fn = jax.jit(step)
    losses = []
    for i in range(STEPS):
        state, m = fn(state, test_step.batch(i))
        losses.append(float(m["loss"]))
    return np.asarray(losses), jaxpr


@pytest.fixture(scope="module")
def ragged():
    return run(G.RAGGED_DOT)


@pytest.mark.parametrize("impl", [G.TILED, G.MEGABLOX, G.AUTO])
def test_losses_equal_ragged_dot(ragged, impl):
    losses, jaxpr = run(impl)
    want, want_jaxpr = ragged
    assert "ragged_dot" in want_jaxpr
    assert ("ragged_dot" in jaxpr) is (grouped.resolve(impl) is G.RAGGED_DOT)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-5)
