"""The expert-parallel MoE layer equals the single-device MoE layer (values and gradients), the
ragged exchange's bookkeeping equals the dense one (through an all_to_all emulation of
ragged_all_to_all, which XLA:CPU cannot run), and group-limited routing reaches at most
topk_group expert-parallel ranks per token."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax.model import dispatch, routing
from deepseek_jax.model import moe as moe_lib
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel import expert, sharding
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel import plan as plan_lib
from tests.parallel import cases

Exchange = parallel_config.ExpertExchange
GroupedMatmul = dispatch.GroupedMatmul
B, S = 8, 8


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """jax.lax.ragged_all_to_all's documented semantics from a dense all_to_all (CPU tests)."""
    n, m = operand.shape[0], output.shape[0]
    rows = jnp.arange(n)
    src = jnp.clip(input_offsets[:, None] + rows[None, :], 0, n - 1)
    chunks = jnp.where(
        (rows[None, :] < send_sizes[:, None])[..., None], jnp.take(operand, src, axis=0), 0
    )
    received = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dst = jnp.where(rows[None, :] < recv_sizes[:, None], offsets[:, None] + rows[None, :], m)
    return output.at[dst.reshape(-1)].set(received.reshape(-1, *operand.shape[1:]), mode="drop")


@functools.cache
def moe_setup(dtype: str = "float32", impl: GroupedMatmul = GroupedMatmul.TILED):
    """(grad_fn(experts): value_and_grad of a scalar of one MoE layer, its forward(params, x,
    experts), params, an input) in `dtype`, its grouped matmuls by `impl`."""
    model = cases.CFG if dtype == "float32" else cases.CFG64
    moe_cfg = dataclasses.replace(model.moe(), grouped_matmul=impl)
    layer = moe_lib.MoE(moe_cfg, rngs=nnx.Rngs(0))
    graphdef, params, bias = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (B, S, model.d_model), model.compute_dtype.jnp)
    cot = jax.random.normal(jax.random.key(2), (B, S, model.d_model), model.compute_dtype.jnp)

    def forward(params, x, experts=dispatch.dropless_experts):
        return nnx.merge(graphdef, params, bias)(x, experts)

    def grad_fn(experts=dispatch.dropless_experts):
        def loss(params, x):
            y, stats = forward(params, x, experts)
            return jnp.sum(y * cot), (y, stats.load_E)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    return grad_fn, forward, params, x


def run(dtype: str, plan=None, impl: GroupedMatmul = GroupedMatmul.TILED):
    """The layer jitted on one device, or over the plan's mesh with its expert function (EP MoE)
    and activation constraints."""
    grad_fn, _, params, x = moe_setup(dtype, impl)
    if plan is None:
        return jax.jit(grad_fn())(params, x)
    fn = plan.wrap(grad_fn(plan.experts()))
    return jax.jit(fn)(params, jax.device_put(x, plan.batch_sharding()))


@functools.cache
def reference(dtype: str):
    """One device, jax.lax.ragged_dot: the reference for every expert-parallel run."""
    with jax.enable_x64(dtype == "float64"):
        return run(dtype, impl=GroupedMatmul.RAGGED_DOT)


def check_equal(got, want, tol):
    (_, (y, load)), grads = got
    (_, (y0, load0)), grads0 = want
    np.testing.assert_array_equal(load, load0)  # the same routing on both sides
    assert cases.rel_err(y, y0) <= tol
    assert cases.worst(grads, grads0)[0] <= tol


@pytest.mark.parametrize(
    "preset,dtype,impl",
    [
        (cases.Preset.DATA_EXPERT, "float32", GroupedMatmul.TILED),
        (cases.Preset.FSDP_EXPERT_TP, "float32", GroupedMatmul.TILED),
        (cases.Preset.FSDP_EXPERT_TP, "float64", GroupedMatmul.TILED),
        (cases.Preset.FSDP_EXPERT_TP, "float32", GroupedMatmul.RAGGED_DOT),
        (cases.Preset.FSDP_EXPERT_TP, "float32", GroupedMatmul.MEGABLOX),
    ],
    ids=[
        "data_expert-float32-tiled",
        "fsdp_expert_tp-float32-tiled",
        "fsdp_expert_tp-float64-tiled",
        "fsdp_expert_tp-float32-ragged_dot",
        "fsdp_expert_tp-float32-megablox",
    ],
)
def test_ep_moe_layer_equals_single_device(preset, dtype, impl):
    want = reference(dtype)
    with jax.enable_x64(dtype == "float64"):
        model = cases.CFG if dtype == "float32" else cases.CFG64
        got = run(dtype, plan_lib.make_plan(cases.parallel(preset), model, B), impl)
        check_equal(got, want, 1e-5 if dtype == "float32" else 1e-10)


def test_ragged_exchange_equals_dense(monkeypatch):
    """Same layer, RAGGED_ALL_TO_ALL with the primitive emulated: offsets and sizes are right."""
    monkeypatch.setattr(expert, "ragged_all_to_all", emulated_ragged_all_to_all)
    cfg = dataclasses.replace(
        cases.parallel(cases.Preset.FSDP_EXPERT_TP, fsdp=1, expert=4),
        expert_exchange=Exchange.RAGGED_ALL_TO_ALL,
    )
    got = run("float32", plan_lib.make_plan(cfg, cases.CFG, B))
    check_equal(got, reference("float32"), 1e-5)


def test_ragged_exchange_lowers_to_ragged_all_to_all():
    """The TPU/GPU path lowers (forward and both transposes) to the real collective."""
    grad_fn, _, params, x = moe_setup()
    cfg = dataclasses.replace(
        cases.parallel(cases.Preset.DATA_EXPERT), expert_exchange=Exchange.RAGGED_ALL_TO_ALL
    )
    plan = plan_lib.make_plan(cfg, cases.CFG, B)
    text = (
        jax.jit(plan.wrap(grad_fn(plan.experts())))
        .lower(params, jax.device_put(x, plan.batch_sharding()))
        .as_text()
    )
    # Two MoE exchanges forward (dispatch, return), two in the backward pass.
    assert text.count("@ragged_all_to_all") >= 4
    assert text.count("stablehlo.all_to_all") + text.count('"stablehlo.all_to_all"') >= 1


def test_group_limited_routing_reaches_at_most_topk_group_ranks():
    """n_group a multiple of the expert axis: each token's experts lie on <= topk_group ranks."""
    ep, X = 4, 4096
    logits = jax.random.normal(jax.random.key(0), (X, 16))
    bias = jax.random.normal(jax.random.key(1), (16,)) * 0.1

    def ranks_per_token(**kw):
        cfg = dataclasses.replace(cases.CFG, n_routed_experts=16, num_experts_per_tok=4, **kw)
        idx = np.asarray(routing.route(logits, bias, cfg.moe()).idx_Xk)
        ranks = idx // (16 // ep)
        return np.array([len(set(r)) for r in ranks])

    limited = ranks_per_token(n_group=8, topk_group=2)  # 2 groups per rank
    assert limited.max() <= 2
    unlimited = ranks_per_token(n_group=1, topk_group=1)  # the check can fail
    assert unlimited.max() > 2


def test_ep_moe_inside_a_stage_shard_map():
    """What a pipeline stage does: each `pipe` rank runs the EP layer on its own tokens."""
    _, forward, params, x = moe_setup()
    cfg = parallel_config.ParallelConfig(
        preset=cases.Preset.DATA_EXPERT,
        pipe=2,
        expert=4,
        pipeline=parallel_config.Schedule.ONE_F_ONE_B,
    )
    mesh = mesh_lib.make_mesh(cfg)
    plan = plan_lib.Plan(cfg, mesh, sharding.rules_for(cfg.preset))
    experts = plan.experts()
    per_stage = jax.shard_map(
        lambda p, x: plan.wrap(forward)(p, x, experts)[0],
        mesh=mesh,
        in_specs=(P(), P("pipe")),
        out_specs=P("pipe"),
        axis_names={"pipe"},
    )
    compiled = jax.jit(per_stage).lower(params, x).compile()
    assert "all-to-all" in compiled.as_text()
    y = compiled(params, x)
    want = jax.jit(lambda p, x: forward(p, x)[0])(params, x)  # per-sequence: halves don't mix
    assert cases.rel_err(y, want) <= 1e-5
