"""Shared setup of the pipeline equality tests: one tiny model, one batch, the unpipelined reference
step and the pipelined steps, each compiled once and cached for the whole test session.

The model is the smallest that exercises every stage role with MoE and MTP on: 1 dense layer (with
the embedding on the first stage) and 4 MoE layers, so that PP=4 (and DualPipeV on 2 ranks, 4
stages) has one MoE layer per stage and DualPipe on 2 ranks has two. Parameters are drawn with
numpy once and cast to each dtype, so float32 and float64 run the same values. Router kernels are
10x wider than the rest so that routing (a discrete top-k) cannot flip between the pipelined and
the unpipelined float32 computations; the tests check that the expert loads are identical.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import config as config_lib
from deepseek_jax.parallel import pipeline, pipeline_step, schedules, ticks
from deepseek_jax.parallel.schedules import Schedule
from deepseek_jax.train import config as train_config
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib

# XLA:CPU compile time dominates these tests; codegen optimisation changes nothing we test.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BATCH, SEQ, MICROBATCHES = 16, 8, 8
TOL = {"float32": 1e-5, "float64": 1e-10}
# (schedule, pp): the executor groups that share one compiled program (same mesh and layout).
GROUPS = {4: (Schedule.DUALPIPE, Schedule.ONE_F_ONE_B, Schedule.GPIPE)}
# The float32 runs double as the composition tests: the same equality on a mesh with more axes
# (float64 runs on the stage-only mesh, where any difference is the pipeline's own).
MESHES = {("float32", 4): {"stage": 4, "data": 2}}


def model_config(dtype: str) -> config_lib.ModelConfig:
    dt = config_lib.DType(dtype)
    return config_lib.ModelConfig(
        vocab_size=32, d_model=32, n_layers=5, first_k_dense_replace=1, intermediate_size=48,
        n_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=16,
        num_experts_per_tok=2, n_group=2, topk_group=1, mtp_depth=1, init_std=0.02,
        param_dtype=dt, compute_dtype=dt)


# Adam's first update is lr * g / (|g| + eps): with the default eps=1e-8 it is lr * sign(g) for
# all but the tiniest gradients, so float32 rounding of a near-zero gradient can move a parameter
# by up to lr. A larger eps makes the update a smooth function of the gradient; everything else
# (clipping, weight decay, the bias update from the loads) is the real step.
TRAIN = train_config.TrainConfig(global_batch_size=BATCH, seq_len=SEQ, warmup_steps=0, lr=1e-3,
                                 eps=1e-3, bias_update_rate=train_config.Piecewise((1e-2,)))


@functools.cache
def _numpy_state() -> tuple:
    """Parameters, expert biases and a batch as float64 numpy arrays (drawn once)."""
    _, params, bias = state_lib.abstract_model(model_config("float32"))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if names[-1] == "weight":  # RMSNorm scales: around 1
            return 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        std = 0.2 if "gate" in names else 0.02  # routing kept far from ties
        return std * rng.standard_normal(leaf.shape)

    params = jax.tree_util.tree_map_with_path(draw, params)
    bias = jax.tree.map(lambda a: 0.01 * rng.standard_normal(a.shape), bias)
    batch = {"inputs": rng.integers(0, 32, (BATCH, SEQ)).astype(np.int32),
             "targets": rng.integers(0, 32, (BATCH, SEQ)).astype(np.int32),
             "loss_mask": (rng.random((BATCH, SEQ)) > 0.2).astype(np.int32)}
    return params, bias, batch


def state(dtype: str) -> tuple[state_lib.TrainState, dict]:
    """The train state (fresh AdamW) and batch in `dtype`; call under enable_x64 for float64."""
    params, bias, batch = _numpy_state()
    cast = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, dtype))
    params, bias = cast(params), cast(bias)
    tx = optim.optimizer(TRAIN)
    return state_lib.TrainState(jnp.zeros((), jnp.int32), params, bias, tx.init(params)), {
        k: jnp.asarray(v) for k, v in batch.items()}


@functools.cache
def reference(dtype: str):
    """(grads, new_state, metrics, aux) of the unpipelined step, compiled once per dtype."""
    with jax.enable_x64(dtype == "float64"):
        cfg = model_config(dtype)
        graphdef, _, _ = state_lib.abstract_model(cfg)
        tx = optim.optimizer(TRAIN)
        st, batch = state(dtype)

        def fn(st, batch):
            loss, aux, grads = step_lib.loss_and_grads(graphdef, TRAIN, st, batch)
            new, metrics = step_lib.apply_update(graphdef, TRAIN, tx, st, loss, aux, grads)
            return grads, new, metrics, aux

        exe = jax.jit(fn).lower(st, batch).compile(FAST_COMPILE)
        return jax.device_get(exe(st, batch))


@dataclasses.dataclass
class Compiled:
    pipe: pipeline_step.Pipeline
    exe: object
    dtype: str

    mesh: jax.sharding.Mesh

    def run(self, table: ticks.TickTable | None = None):
        """(grads, new_state, metrics, aux, log, d_stack) for `table` (default: the schedule's)."""
        with jax.enable_x64(self.dtype == "float64"):
            st, batch = placed(self.mesh, *state(self.dtype))
            return jax.device_get(self.exe(st, batch, self.pipe.tables(table)))


def mesh_for(pp: int, dtype: str) -> jax.sharding.Mesh:
    sizes = MESHES.get((dtype, pp), {"stage": pp})
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def placed(mesh, st, batch):
    """State replicated, batch rows split over the batch axes of `mesh` (all but stage)."""
    rows = tuple(a for a in mesh.axis_names if a != pipeline.AXIS) or None
    put = jax.sharding.NamedSharding
    return (jax.device_put(st, put(mesh, jax.sharding.PartitionSpec())),
            jax.device_put(batch, put(mesh, jax.sharding.PartitionSpec(rows))))


@functools.cache
def compiled(schedule: Schedule, pp: int, dtype: str) -> Compiled:
    """The pipelined step of `schedule`, compiled once per executor group and dtype."""
    group = GROUPS.get(pp, ()) if schedule in GROUPS.get(pp, ()) else (schedule,)
    if schedule is not group[0]:
        base = compiled(group[0], pp, dtype)
        return Compiled(_pipe(schedule, pp, dtype, base.pipe.layout), base.exe, dtype, base.mesh)
    with jax.enable_x64(dtype == "float64"):
        tables = [ticks.build(schedules.build(s, pp, MICROBATCHES)) for s in group]
        num_stages = schedules.build(schedule, pp, MICROBATCHES).num_stages
        layout = pipeline.Layout.of(*tables, num_stages=num_stages)
        pipe = _pipe(schedule, pp, dtype, layout)
        mesh = mesh_for(pp, dtype)
        run = pipeline.executor(pipe.stage, layout, mesh)
        tx = optim.optimizer(TRAIN)
        graphdef = pipe.stage.graphdef

        def fn(st, batch, tbl):
            loss, aux, grads, res = pipeline_step.loss_and_grads(pipe, run, TRAIN, st, batch,
                                                                 tbl)
            new, metrics = step_lib.apply_update(graphdef, TRAIN, tx, st, loss, aux, grads)
            return grads, new, metrics, aux, res.log, res.d_stack

        st, batch = placed(mesh, *state(dtype))
        exe = jax.jit(fn).lower(st, batch, pipe.tables()).compile(FAST_COMPILE)
        return Compiled(pipe, exe, dtype, mesh)


def _pipe(schedule, pp, dtype, layout) -> pipeline_step.Pipeline:
    cfg = model_config(dtype)
    with jax.enable_x64(dtype == "float64"):
        graphdef, _, _ = state_lib.abstract_model(cfg)
    return pipeline_step.build(schedule, pp, MICROBATCHES, graphdef, cfg, TRAIN, layout)


def max_rel(a, b) -> float:
    """max |a - b| / max |b| over one array (0 when both are all zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    diff = np.max(np.abs(a - b)) if b.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def worst(tree_a, tree_b) -> tuple[float, str]:
    """The largest per-leaf max_rel and the leaf's path (inf if any value is not finite)."""
    flat_b = dict(jax.tree_util.tree_leaves_with_path(tree_b))
    out = (0.0, "")
    for path, a in jax.tree_util.tree_leaves_with_path(tree_a):
        b = flat_b[path]
        err = max_rel(a, b) if np.all(np.isfinite(a)) else float("inf")
        out = max(out, (err, jax.tree_util.keystr(path)))
    return out
