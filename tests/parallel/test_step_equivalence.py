"""Every preset's sharded train step equals the single-device step on 8 simulated devices.

One step from the same state and batch: loss, gradients (Adam's first moment after one step is
(1 - b1) * gradient, clipping off), updated parameters, optimizer state and expert biases, per
leaf within 1e-5 relative (max |diff| / max |reference|) in float32 and 1e-10 in float64. The
routing decisions (expert loads) must be identical, or the comparison would be meaningless.

Float32 uses Adam eps=1e-4 instead of 1e-8: the first Adam step is lr * g / (|g| + eps), which
for |g| near eps amplifies float32 reduction-order noise (~1e-8 absolute here) up to lr/eps-fold,
a discontinuity like a flipped top-k. Float64 uses the default eps; its noise is 1e-16.
The compiled EP steps are also inspected: their HLO must hold the expert all-to-all.

The float32 comparisons run packed rows (segment ids, positions restarting per sample), the
float64 ones plain rows: every preset is checked on both kinds of batch with no extra compile, so
nothing on the way (the plan's batch sharding, the EP shard_map) may drop or reorder the fields.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import numpy as np
import optax
import pytest

from deepseek_jax.batch import Batch
from deepseek_jax.parallel import hlo_stats
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.train import optim, sharded
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib
from tests.parallel import cases

# LLVM optimisation level only (the HLO and its partitioning are unchanged): halves CPU compile
# time, and both sides of every comparison use it.
COMPILE = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Setup:
    model: object
    train: object
    tol: float
    batch: Callable[[], Batch]


SETUPS = {
    "float32": Setup(
        cases.CFG, dataclasses.replace(cases.TRAIN, eps=1e-4), 1e-5, cases.packed_batch
    ),
    "float64": Setup(cases.CFG64, cases.TRAIN, 1e-10, cases.batch),
}


@dataclasses.dataclass
class Run:
    state: state_lib.TrainState  # numpy leaves
    metrics: dict
    hlo: str = ""
    shardings: object = None


def x64(dtype: str):
    return jax.enable_x64(dtype == "float64")


@functools.cache
def initial_state() -> state_lib.TrainState:
    """Created sharded (fsdp_expert_tp) by the plan's jitted init; returned as numpy."""
    plan = plan_lib.make_plan(cases.parallel(cases.Preset.FSDP_EXPERT_TP), cases.CFG, cases.B)
    tx = optim.optimizer(cases.TRAIN)
    state = sharded.init_state(plan, cases.CFG, tx, seed=0)
    want = sharded.state_shardings(plan, cases.CFG, tx)
    got = jax.tree.map(lambda x: x.sharding, state)
    assert jax.tree.all(jax.tree.map(lambda a, b: a == b, got, want))
    return jax.device_get(state)


def start(dtype: str) -> state_lib.TrainState:
    state = initial_state()
    if dtype == "float32":
        return state
    return jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, state)


def _fn(setup: Setup):
    tx = optim.optimizer(setup.train)
    graphdef, _, _ = state_lib.abstract_model(setup.model)
    return step_lib.make_train_step(graphdef, setup.train, tx), tx


def _structs(tree, sharding_of):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding_of(tree)
    )


def _lower(dtype: str, preset: cases.Preset | None):
    """The step of one comparison, lowered from abstract inputs (None: the single device)."""
    setup = SETUPS[dtype]
    with x64(dtype):
        fn, tx = _fn(setup)
        state = state_lib.abstract_state(setup.model, tx)
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.batch())
        if preset is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            every = lambda tree: jax.tree.map(lambda _: one, tree)  # noqa: E731
            return step_lib.jit_train_step(fn).lower(_structs(state, every), _structs(batch, every))
        plan = plan_lib.make_plan(cases.parallel(preset), setup.model, cases.B)
        batch = _structs(batch, lambda tree: jax.tree.map(lambda _: plan.batch_sharding(), tree))
        graphdef, _, _ = state_lib.abstract_model(setup.model)
        step = sharded.train_step(plan, setup.model, setup.train, graphdef, tx)
        return step.lower(sharded.abstract_state(plan, setup.model, tx), batch)


@functools.cache
def compiled() -> dict:
    """Every program of this module, compiled before any test runs them.

    Tracing holds the GIL, so programs are lowered one after the other, but XLA:CPU compiles
    (most of this module's time, single-threaded each) run in a pool, one per core.
    """
    keys = [(d, None) for d in SETUPS] + [(d, p) for d in SETUPS for p in cases.MESHES]
    with concurrent.futures.ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
        init = pool.submit(initial_state)
        jobs = {key: pool.submit(_lower(*key).compile, COMPILE) for key in keys}
        init.result()
        return {key: job.result() for key, job in jobs.items()}


@functools.cache
def run_reference(dtype: str) -> Run:
    with x64(dtype):
        state = jax.device_put(start(dtype), jax.devices()[0])
        batch = jax.device_put(SETUPS[dtype].batch(), jax.devices()[0])
        new, metrics = compiled()[(dtype, None)](state, batch)
        return Run(jax.device_get(new), jax.device_get(metrics))


@functools.cache
def run_sharded(dtype: str, preset: cases.Preset) -> Run:
    setup = SETUPS[dtype]
    with x64(dtype):
        _, tx = _fn(setup)
        plan = plan_lib.make_plan(cases.parallel(preset), setup.model, cases.B)
        state = jax.device_put(start(dtype), sharded.state_shardings(plan, setup.model, tx))
        batch = plan.global_batch(setup.batch(), cases.B)
        step = compiled()[(dtype, preset)]
        new, metrics = step(state, batch)
        shardings = jax.tree.map(lambda x: x.sharding, new)
        return Run(jax.device_get(new), jax.device_get(metrics), step.as_text(), shardings)


@pytest.mark.parametrize("preset", list(cases.MESHES), ids=lambda p: p.value)
@pytest.mark.parametrize("dtype", list(SETUPS))
def test_sharded_step_equals_single_device(dtype, preset):
    tol = SETUPS[dtype].tol
    ref, got = run_reference(dtype), run_sharded(dtype, preset)
    np.testing.assert_array_equal(got.metrics["expert_load"], ref.metrics["expert_load"])
    assert int(got.metrics["skipped"]) == 0
    mu = lambda s: optax.tree_utils.tree_get(s.opt_state, "mu")  # noqa: E731
    figures = {
        "loss": cases.rel_err(got.metrics["loss"], ref.metrics["loss"]),
        "grads": cases.worst(mu(got.state), mu(ref.state)),
        "params": cases.worst(got.state.params, ref.state.params),
        "opt_state": cases.worst(got.state.opt_state, ref.state.opt_state),
        "expert_bias": cases.worst(got.state.expert_bias, ref.state.expert_bias),
        "grad_norm": cases.rel_err(got.metrics["grad_norm"], ref.metrics["grad_norm"]),
    }
    print(
        f"\n{dtype} {preset.value}: "
        + ", ".join(f"{k} {v[0] if isinstance(v, tuple) else v:.2e}" for k, v in figures.items())
    )
    for name, value in figures.items():
        err, where = value if isinstance(value, tuple) else (value, "")
        assert err <= tol, f"{name} {where}: relative error {err:.3e} > {tol}"
    # The step really moved the parameters (else params equality would prove little).
    moved = cases.worst(ref.state.params, start(dtype).params)[0]
    assert moved > 100 * tol


def test_packed_rows_change_the_step():
    """The float32 runs take packed rows; their equality means something only if the segment ids
    change the step. Without them the float32 loss would equal the float64 one (plain rows, the
    same parameters and tokens) to float32 rounding, ~1e-7."""
    packed, plain = run_reference("float32"), run_reference("float64")
    assert cases.rel_err(packed.metrics["loss"], plain.metrics["loss"]) > 1e-3
    assert SETUPS["float64"].batch().segment_ids is None


@pytest.mark.parametrize("preset", list(cases.MESHES), ids=lambda p: p.value)
def test_step_outputs_keep_the_rules_shardings(preset):
    """The donated state comes back exactly as the rules lay it out."""
    run = run_sharded("float32", preset)
    plan = plan_lib.make_plan(cases.parallel(preset), cases.CFG, cases.B)
    want = sharded.state_shardings(plan, cases.CFG, optim.optimizer(SETUPS["float32"].train))
    same = jax.tree.map(lambda a, b: a.is_equivalent_to(b, 4), run.shardings, want)
    assert jax.tree.all(same)


def expert_groups(plan) -> frozenset:
    """Device-id groups along the mesh's expert axis (who exchanges tokens with whom)."""
    devices = np.vectorize(lambda d: d.id)(plan.mesh.devices)
    axis = plan.mesh.axis_names.index("expert")
    ids = np.moveaxis(devices, axis, -1).reshape(-1, devices.shape[axis])
    return hlo_stats.canonical_groups(ids.tolist())


@pytest.mark.parametrize("preset", cases.EP_PRESETS, ids=lambda p: p.value)
def test_compiled_ep_step_contains_the_expert_all_to_all(preset):
    run = run_sharded("float32", preset)
    plan = plan_lib.make_plan(cases.parallel(preset), cases.CFG, cases.B)
    ops = [
        c
        for c in hlo_stats.collectives(run.hlo)
        if c.kind == "all-to-all" and "shard_map" in c.op_name
    ]
    rows = [c for c in ops if "s32[" not in c.result_type]  # token rows, not per-expert counts
    # MoE layer + MTP MoE layer, each: dispatch and return, forward and backward.
    assert len(rows) == 2 * 2 * 2, [c.result_type for c in ops]
    assert {hlo_stats.canonical_groups(c.groups) for c in ops} == {expert_groups(plan)}


def test_non_ep_step_has_no_expert_all_to_all():
    run = run_sharded("float32", cases.Preset.FSDP_TP)
    assert not [
        c
        for c in hlo_stats.collectives(run.hlo)
        if c.kind == "all-to-all" and "shard_map" in c.op_name
    ]
