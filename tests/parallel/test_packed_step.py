"""Packed samples through the sharded step: on the expert-parallel mesh, a batch with segment ids
and per-sample positions gives the single-device step's loss, gradients and parameters.

The batch field travels as any other Batch leaf (sharded over the batch axes); this checks that
nothing on the way (the plan's batch sharding, the EP shard_map) drops or reorders it, and that
the ids change the step at all (else equality would prove little).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.train import sharded
from deepseek_jax.train import state as state_lib
from tests.parallel import cases
from tests.parallel import test_step_equivalence as eq

PRESET = cases.Preset.FSDP_EXPERT_TP


def packed_batch():
    """Rows of two or three samples each (a different cut per row), positions restarting at 0."""
    batch = cases.batch()
    B, S = batch.inputs.shape
    seg = np.ones((B, S), np.int32)
    for r in range(B):
        cuts = sorted({3 + r % 4, S // 2 + r % 3})
        for c in cuts:
            seg[r, c:] += 1
    pos = np.zeros((B, S), np.int32)
    for r in range(B):
        for t in range(1, S):
            pos[r, t] = 0 if seg[r, t] != seg[r, t - 1] else pos[r, t - 1] + 1
    return dataclasses.replace(batch, segment_ids=seg, positions=pos)


def test_packed_sharded_step_equals_single_device():
    setup = eq.SETUPS["float32"]
    fn, tx = eq._fn(setup)
    batch = packed_batch()
    one = jax.devices()[0]
    single = lambda b: jax.device_get(  # noqa: E731
        jax.jit(fn)(jax.device_put(eq.start("float32"), one), jax.device_put(b, one))
    )
    ref_state, ref_metrics = single(batch)
    plan = plan_lib.make_plan(cases.parallel(PRESET), setup.model, cases.B)
    graphdef, _, _ = state_lib.abstract_model(setup.model)
    step = sharded.train_step(plan, setup.model, setup.train, graphdef, tx)
    state = jax.device_put(eq.start("float32"), sharded.state_shardings(plan, setup.model, tx))
    got_state, got_metrics = jax.device_get(step(state, plan.global_batch(batch, cases.B)))

    unpacked = single(cases.batch())[1]["loss"]
    assert cases.rel_err(ref_metrics["loss"], unpacked) > 1e-3  # the ids changed the step
    np.testing.assert_array_equal(got_metrics["expert_load"], ref_metrics["expert_load"])
    mu = lambda s: optax.tree_utils.tree_get(s.opt_state, "mu")  # noqa: E731
    assert cases.rel_err(got_metrics["loss"], ref_metrics["loss"]) <= setup.tol
    for name, got, want in [
        ("grads", mu(got_state), mu(ref_state)),
        ("params", got_state.params, ref_state.params),
    ]:
        err, where = cases.worst(got, want)
        assert err <= setup.tol, f"{name} {where}: relative error {err:.3e} > {setup.tol}"
