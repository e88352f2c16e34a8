"""Shared setup of the pipeline equality tests: one tiny model, one batch, the unpipelined reference
step and the pipelined steps, each compiled once and cached for the whole test session.

The model is the smallest that exercises every stage role with MoE and MTP on: 1 dense layer (with
the embedding on the first stage) and 4 MoE layers, so that PP=4 (and DualPipeV on 2 ranks, 4
stages) has one MoE layer per stage and DualPipe on 2 ranks has two (its float32 program drops
one, for uneven stages: UNEVEN). Parameters are drawn with numpy once and cast to each dtype, so
float32 and float64 run the same values. Router kernels are 10x wider than the rest so that
routing (a discrete top-k) cannot flip between the pipelined and the unpipelined float32
computations; the tests check that the expert loads are identical.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.batch import Batch
from deepseek_jax.model import config as config_lib
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel.config import BackwardSplit
from deepseek_jax.parallel.pipeline import executor, schedules, ticks
from deepseek_jax.parallel.pipeline.schedules import Schedule
from deepseek_jax.train import config as train_config
from deepseek_jax.train import optim, pipeline_step, sharded
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib
from tests.parallel import cases

# XLA:CPU compile time dominates these tests; codegen optimisation changes nothing we test.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BATCH, SEQ, MICROBATCHES = 32, 8, 8  # 4 rows per micro-batch: split over up to 4 batch shards
TOL = {"float32": 1e-5, "float64": 1e-10}
EXACT = BackwardSplit.EXACT  # the default split; every schedule runs with it
# (schedule, pp): the executor groups that share one compiled program (same mesh and layout).
GROUPS = {4: (Schedule.DUALPIPE, Schedule.ONE_F_ONE_B, Schedule.GPIPE)}
# The float32 runs double as the composition tests: the same equality on a mesh with more axes
# (float64 runs on a stage-only mesh, where any difference is the pipeline's own). Keyed by the
# (schedule, pp) that compiles the group's program.
Preset = parallel_config.Preset
MESHES = {
    (Schedule.DUALPIPE, 4, "float32"): dict(pipe=4, data=2),
    # ... with ZeRO-1: the optimizer state also split over `data` (the V3 paper's layout).
    (Schedule.DUALPIPE, 2, "float32"): dict(
        pipe=2, expert=2, data=2, preset=Preset.DATA_EXPERT, zero=1
    ),
}
# Uneven stages: the float32 DualPipe PP=2 program (on the ZeRO-1 mesh above) runs 3 MoE layers
# (n_layers=4) on DualPipe's 2 stages (2 + 1: a padding slot on the last stage,
# stages.layer_counts), so the stack is split over `pipe` on a layer dimension. The float64 run
# of the same schedule keeps 2 + 2, and every other program 5 layers.
UNEVEN = (Schedule.DUALPIPE, 2, "float32")
LAYERS = {UNEVEN: 4}


def model_config(dtype: str, n_layers: int = 5) -> config_lib.ModelConfig:
    dt = config_lib.DType(dtype)
    return config_lib.ModelConfig(
        vocab_size=32,
        d_model=32,
        n_layers=n_layers,
        first_k_dense_replace=1,
        intermediate_size=48,
        n_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=16,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        mtp_depth=1,
        init_std=0.02,
        param_dtype=dt,
        compute_dtype=dt,
    )


# Adam's first update is lr * g / (|g| + eps): with the default eps=1e-8 it is lr * sign(g) for
# all but the tiniest gradients, so float32 rounding of a near-zero gradient can move a parameter
# by up to lr. A larger eps makes the update a smooth function of the gradient; everything else
# (clipping, weight decay, the bias update from the loads) is the real step.
TRAIN = train_config.TrainConfig(
    global_batch_size=BATCH,
    seq_len=SEQ,
    warmup_steps=0,
    lr=1e-3,
    eps=1e-3,
    bias_update_rate=train_config.Piecewise((1e-2,)),
)


@functools.cache
def _numpy_state(n_layers: int = 5) -> tuple:
    """Parameters, expert biases and a batch as float64 numpy arrays (drawn once)."""
    _, params, bias = state_lib.abstract_model(model_config("float32", n_layers))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        names = [getattr(k, "key", None) for k in path]
        if names[-1] == "weight":  # RMSNorm scales: around 1
            return 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        std = 0.2 if "gate" in names else 0.02  # routing kept far from ties
        return std * rng.standard_normal(leaf.shape)

    params = jax.tree_util.tree_map_with_path(draw, params)
    bias = jax.tree.map(lambda a: 0.01 * rng.standard_normal(a.shape), bias)
    batch = Batch(
        inputs=rng.integers(0, 32, (BATCH, SEQ)).astype(np.int32),
        targets=rng.integers(0, 32, (BATCH, SEQ)).astype(np.int32),
        loss_mask=(rng.random((BATCH, SEQ)) > 0.2).astype(np.int32),
    )
    return params, bias, batch


_TX = optim.optimizer(TRAIN)  # one object: plan shardings are cached per (config, tx)


# The float32 programs take packed rows (2 or 3 samples each: segment ids, positions restarting
# per sample), the float64 ones plain rows: every schedule is checked on both kinds of batch with
# no extra compile. Packed rows must reach every stage's attention and RoPE (stages.Stage).
PACKED = ("float32",)


def packed(batch: Batch) -> Batch:
    B, S = batch.inputs.shape
    seg = np.ones((B, S), np.int32)
    for r in range(B):
        for cut in sorted({2 + r % 3, S // 2 + r % 2} if r % 4 else {3}):
            seg[r, cut:] += 1
    return dataclasses.replace(batch, segment_ids=seg, positions=cases.segment_positions(seg))


def state(dtype: str, n_layers: int = 5) -> tuple[state_lib.TrainState, Batch]:
    """The train state (fresh AdamW) and batch in `dtype` (packed for PACKED dtypes); call under
    enable_x64 for float64."""
    params, bias, batch = _numpy_state(n_layers)
    if dtype in PACKED:
        batch = packed(batch)
    cast = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, dtype))
    params, bias = cast(params), cast(bias)
    return state_lib.TrainState(jnp.zeros((), jnp.int32), params, bias, _TX.init(params)), (
        jax.tree.map(jnp.asarray, batch)
    )


def _lower_reference(dtype: str, n_layers: int = 5):
    cfg = model_config(dtype, n_layers)
    graphdef, _, _ = state_lib.abstract_model(cfg)

    def fn(st, batch):
        loss, aux, grads = step_lib.loss_and_grads(graphdef, TRAIN, st, batch)
        new, metrics = step_lib.apply_update(graphdef, TRAIN, _TX, st, loss, aux, grads)
        return grads, new, metrics, aux

    return jax.jit(fn).lower(*state(dtype, n_layers)), None


@dataclasses.dataclass
class Compiled:
    pipe: pipeline_step.Pipeline
    exe: object
    dtype: str
    plan: plan_lib.Plan
    n_layers: int = 5

    @property
    def mesh(self):
        return self.plan.mesh

    def run(self, table: ticks.TickTable | None = None):
        """(grads, new_state, metrics, aux, log, d_stack) for `table` (default: the schedule's)."""
        with jax.enable_x64(self.dtype == "float64"):
            st, batch = placed(self.plan, self.dtype, self.n_layers)
            return jax.device_get(self.exe(st, batch, self.pipe.tables(table)))


def plan_for(schedule: Schedule, pp: int, dtype: str, n_layers: int = 5) -> plan_lib.Plan:
    """The parallel plan (mesh, rules, expert function) the loop would build."""
    axes = MESHES.get((schedule, pp, dtype), dict(pipe=pp, data=1))
    cfg = parallel_config.ParallelConfig(
        pipeline=parallel_config.Schedule(schedule.value), microbatches=MICROBATCHES, **axes
    )
    n = cfg.pipe * cfg.data * cfg.fsdp * cfg.expert * cfg.tensor
    return plan_lib.make_plan(cfg, model_config(dtype, n_layers), BATCH, jax.devices()[:n])


def placed(plan: plan_lib.Plan, dtype: str, n_layers: int = 5):
    """The state with the plan's shardings (MoE layers split over stage) and the batch's rows
    split over its batch axes."""
    st, batch = state(dtype, n_layers)
    shardings = sharded.state_shardings(plan, model_config(dtype, n_layers), _TX)
    return jax.device_put(st, shardings), jax.device_put(batch, plan.batch_sharding())


def _group(schedule: Schedule, pp: int) -> tuple[Schedule, ...]:
    return GROUPS[pp] if schedule in GROUPS.get(pp, ()) else (schedule,)


def _lower_pipeline(
    schedule: Schedule, pp: int, dtype: str, split: BackwardSplit = EXACT, n_layers: int = 5
):
    """The pipelined step of the group `schedule` heads, lowered from placed inputs."""
    tables = [
        ticks.build(schedules.build(s, pp, MICROBATCHES), split) for s in _group(schedule, pp)
    ]
    num_stages = schedules.build(schedule, pp, MICROBATCHES).num_stages
    layout = executor.Layout.of(*tables, num_stages=num_stages)
    plan = plan_for(schedule, pp, dtype, n_layers)
    pipe = _pipe(schedule, pp, dtype, layout, plan.experts(), split, n_layers)
    run = executor.build(pipe.stage, layout, plan.mesh)
    graphdef = pipe.stage.graphdef

    def fn(st, batch, tbl):
        loss, aux, grads, res = pipeline_step.loss_and_grads(pipe, run, TRAIN, st, batch, tbl)
        new, metrics = step_lib.apply_update(graphdef, TRAIN, _TX, st, loss, aux, grads)
        return grads, new, metrics, aux, res.log, res.d_stack

    # plan.wrap: the activation constraints, as in the loop (the stage has plan.experts()).
    lowered = jax.jit(plan.wrap(fn)).lower(*placed(plan, dtype, n_layers), pipe.tables())
    return lowered, (pipe, plan)


BASES = ((Schedule.DUALPIPE, 2), (Schedule.DUALPIPE, 4), (Schedule.DUALPIPEV, 2))
# The recompute split (parallel.backward_split=recompute) on one program: its Bi/W are the only
# ops that differ from the exact split's, and DualPipe PP=2 runs both kinds on every rank.
RECOMPUTE = ((Schedule.DUALPIPE, 2, "float64"),)


def n_layers_of(schedule: Schedule, pp: int, dtype: str) -> int:
    return LAYERS.get((schedule, pp, dtype), 5)


@functools.cache
def programs() -> dict:
    """Every program of the pipeline tests, compiled before the first test runs.

    Tracing holds the GIL, so programs are lowered one after the other; XLA:CPU compiles (most of
    the time, single-threaded each) run in a pool, one per core.
    """
    keys = [(s, pp, d) for s, pp in BASES for d in TOL]
    keys += [(s, pp, d, BackwardSplit.RECOMPUTE) for s, pp, d in RECOMPUTE]
    refs = sorted({("reference", k[2], n_layers_of(*k[:3])) for k in keys})
    with concurrent.futures.ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 1))) as pool:
        jobs = {}
        for key in refs + keys:
            with jax.enable_x64("float64" in key):
                if key[0] == "reference":
                    lowered, extra = _lower_reference(*key[1:])
                else:
                    lowered, extra = _lower_pipeline(*key, n_layers=n_layers_of(*key[:3]))
            jobs[key] = (pool.submit(lowered.compile, FAST_COMPILE), extra)
        return {key: (job.result(), extra) for key, (job, extra) in jobs.items()}


@functools.cache
def reference(dtype: str, n_layers: int = 5):
    """(grads, new_state, metrics, aux) of the unpipelined step on one device."""
    exe, _ = programs()[("reference", dtype, n_layers)]
    with jax.enable_x64(dtype == "float64"):
        return jax.device_get(exe(*state(dtype, n_layers)))


@functools.cache
def compiled(schedule: Schedule, pp: int, dtype: str, split: BackwardSplit = EXACT) -> Compiled:
    """The pipelined step of `schedule` (its group's program) for `dtype` and `split`."""
    base = _group(schedule, pp)[0]
    key = (base, pp, dtype) + (() if split is EXACT else (split,))
    exe, (pipe, plan) = programs()[key]
    n = n_layers_of(base, pp, dtype)
    if schedule is not base:
        pipe = _pipe(schedule, pp, dtype, pipe.layout, pipe.stage.experts, split, n)
    return Compiled(pipe, exe, dtype, plan, n)


def _pipe(schedule, pp, dtype, layout, experts, split=EXACT, n_layers=5) -> pipeline_step.Pipeline:
    cfg = model_config(dtype, n_layers)
    with jax.enable_x64(dtype == "float64"):
        graphdef, _, _ = state_lib.abstract_model(cfg)
    return pipeline_step.build(
        schedule, pp, MICROBATCHES, graphdef, cfg, layout, experts=experts, split=split
    )


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
