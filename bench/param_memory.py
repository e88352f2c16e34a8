"""Per-device parameter + optimizer-state memory of an experiment under a layout, device-free.

    python bench/param_memory.py --config=configs/deepseek_v3_671b.py \
        --preset=fsdp_expert_tp --fsdp=4 --expert=64 --devices=256
    # the V3 paper's layout: PP=16 x EP=64 x ZeRO-1 over data, 2048 devices
    python bench/param_memory.py --preset=data_expert --fsdp=1 --pipe=16 --pipeline=dualpipe \
        --zero=1 --devices=2048

With --pipeline the report adds what the pipelined step holds besides the canonical state
(`pipeline` rows): gradients (sharded like the parameters), the rank's working copy of its chunks'
MoE layers in the pipelined layout [K, Ls, ...] and their gradient accumulator, and the tick
table's buffers at --seq tokens x --micro_batch rows per micro-batch: act and grd slots
([b, s, D] in the compute dtype) and the exact split's residual slots (per layer slot: every
non-routed weight GEMM's input and output cotangent, T x (in + out); with expert parallelism the
routed experts' weight GEMMs stay in Bi, so they keep none). Micro-batches per step:
global batch / (batch shards x micro-batch rows). Transients inside one tick (a stage's recompute
under remat) and XLA temporaries are not included.

Shapes come from `jax.eval_shape` of the train-state init and shardings from the plan over an
`AbstractMesh`, so nothing is allocated and no device is needed. Every leaf's per-device bytes
is its shard shape (NamedSharding.shard_shape) times its itemsize; the layouts are uniform, so
every device holds the same amount. Without --pipeline, activations, gradients and XLA
temporaries are not included.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import config as experiment_config
from deepseek_jax.model import layers, transformer
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel import sharding as sharding_lib
from deepseek_jax.parallel.pipeline import schedules, stages, ticks
from deepseek_jax.train import optim, sharded
from deepseek_jax.train import state as state_lib

GIB = 2**30


def per_device_bytes(abstract, specs, mesh) -> tuple[int, int]:
    """(bytes on one device, bytes unsharded) of a tree of ShapeDtypeStructs."""
    leaves = jax.tree.leaves(abstract)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    local = total = 0
    for leaf, spec in zip(leaves, spec_leaves, strict=True):
        shard = NamedSharding(mesh, spec).shard_shape(leaf.shape)
        local += math.prod(shard) * leaf.dtype.itemsize
        total += leaf.size * leaf.dtype.itemsize
    return local, total


def report(exp, cfg: parallel_config.ParallelConfig, n_devices: int) -> dict[str, tuple]:
    tx = optim.optimizer(exp.train)
    abstract = state_lib.abstract_state(exp.model, tx)
    plan = plan_lib.make_abstract_plan(cfg, exp.model, exp.train.global_batch_size, n_devices)
    specs = sharded.state_specs(plan, exp.model, abstract)
    return {
        part: per_device_bytes(getattr(abstract, part), getattr(specs, part), plan.mesh)
        for part in ("params", "opt_state", "expert_bias")
    }


def residual_elems_per_token(model_cfg) -> int:
    """Per MoE layer: the exact split's residuals per token, sum over the layer's Linear GEMMs of
    (in + out) features (routed experts excluded: under EP their W stays in Bi)."""
    model = nnx.eval_shape(lambda: transformer.Transformer(model_cfg, rngs=nnx.Rngs(0)))
    total = 0
    for _, node in nnx.iter_graph(model.moe_layers):
        if isinstance(node, layers.Linear):
            shape = node.kernel.shape[1:]  # drop the layer axis
            total += math.prod(shape[: node.in_rank]) + math.prod(shape[node.in_rank :])
    return total


def pipeline_report(exp, cfg, plan, abstract, seq: int, micro_batch: int) -> dict[str, tuple]:
    """Per-device bytes of what the pipelined step holds besides the canonical state."""
    m, sizes = exp.model, plan.sizes
    shards = math.prod(sizes[a] for a in plan.rules.act_batch if sizes[a] > 1)
    M = exp.train.global_batch_size // (shards * micro_batch)
    orders = schedules.build(cfg.pipeline, cfg.pipe, M)
    table = ticks.build(orders, cfg.backward_split)
    S, K = orders.num_stages, table.chunks
    Ls = max(stages.layer_counts(m.n_moe_layers, S))
    specs = sharded.state_specs(plan, m, abstract)
    logical, _ = state_lib.logical_axes(m)
    stack_specs = sharding_lib.tree_specs(plan.rules, logical, abstract.params, sizes, "params")
    stack_local, _ = per_device_bytes(
        abstract.params[stages.STACK], stack_specs[stages.STACK], plan.mesh
    )
    copy = stack_local // m.n_moe_layers * K * Ls  # K chunks of Ls layer slots, preset-sharded
    T = seq * micro_batch
    cd = jnp.dtype(m.compute_dtype.jnp).itemsize
    act = T * m.d_model * cd
    res = T * residual_elems_per_token(m) * cd * Ls
    grads = per_device_bytes(abstract.params, specs.params, plan.mesh)
    return {
        "grads (canonical)": grads,
        f"stack copy [K={K}, Ls={Ls}]": (copy, copy * sizes["pipe"]),
        "stack grads [K, Ls]": (copy, copy * sizes["pipe"]),
        f"act slots ({table.act_slots})": (table.act_slots * act, 0),
        f"grd slots ({table.grd_slots})": (table.grd_slots * act, 0),
        f"wres slots ({table.wres_slots} x {res / GIB:.2f} GiB)": (table.wres_slots * res, 0),
    }, M


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/deepseek_v3_671b.py")
    ap.add_argument("--preset", default="fsdp_expert_tp")
    ap.add_argument("--devices", type=int, default=256)
    for axis, default in (("data", -1), ("fsdp", 4), ("expert", 64), ("tensor", 1), ("pipe", 1)):
        ap.add_argument(f"--{axis}", type=int, default=default)
    ap.add_argument("--pipeline", default="none")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--backward_split", default="exact", help="exact or recompute")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro_batch", type=int, default=1, help="rows per batch shard")
    ap.add_argument("--hbm_gb", type=float, default=80.0)
    args = ap.parse_args()
    exp = experiment_config.load(args.config)
    kw = dict(
        preset=parallel_config.Preset(args.preset),
        data=args.data,
        fsdp=args.fsdp,
        expert=args.expert,
        tensor=args.tensor,
        pipe=args.pipe,
        pipeline=parallel_config.Schedule(args.pipeline),
        zero=args.zero,
        backward_split=parallel_config.BackwardSplit(args.backward_split),
    )
    cfg = parallel_config.ParallelConfig(**kw)
    if cfg.pipeline is not parallel_config.Schedule.NONE:
        sizes = {**cfg.sizes()}
        if sizes["data"] == -1:
            rest = math.prod(v for k, v in sizes.items() if k != "data")
            sizes["data"] = args.devices // rest
        shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
        M = exp.train.global_batch_size // (shards * args.micro_batch)
        cfg = parallel_config.ParallelConfig(**kw, microbatches=M)
    parts = report(exp, cfg, args.devices)
    if cfg.pipeline is not parallel_config.Schedule.NONE:
        tx = optim.optimizer(exp.train)
        abstract = state_lib.abstract_state(exp.model, tx)
        plan = plan_lib.make_abstract_plan(
            cfg, exp.model, exp.train.global_batch_size, args.devices
        )
        extra, M = pipeline_report(exp, cfg, plan, abstract, args.seq, args.micro_batch)
        parts.update(extra)
    n_params = sum(
        x.size
        for x in jax.tree.leaves(
            state_lib.abstract_state(exp.model, optim.optimizer(exp.train)).params
        )
    )
    print(
        f"{args.config}: {n_params / 1e9:.1f}B parameters ({exp.model.param_dtype.value}), "
        f"preset {args.preset}, {args.devices} devices (data={args.data} fsdp={args.fsdp} "
        f"expert={args.expert} tensor={args.tensor} pipe={args.pipe}, pipeline {args.pipeline}, "
        f"zero={args.zero})"
    )
    if cfg.pipeline is not parallel_config.Schedule.NONE:
        stages_n = schedules.build(cfg.pipeline, cfg.pipe, cfg.num_microbatches).num_stages
        print(
            f"{cfg.num_microbatches} micro-batches of {args.micro_batch} x {args.seq} tokens per "
            "batch shard; MoE layers per stage "
            f"{stages.layer_counts(exp.model.n_moe_layers, stages_n)}"
        )
    print("| part | per device | unsharded |")
    print("|---|---|---|")
    for part, (local, total) in parts.items():
        print(f"| {part} | {local / GIB:.2f} GiB | {total / GIB:.1f} GiB |")
    local = sum(v[0] for v in parts.values())
    total = sum(v[1] for v in parts.values())
    print(f"| total | {local / GIB:.2f} GiB | {total / GIB:.1f} GiB |")
    verdict = "fits" if local <= args.hbm_gb * 1e9 else "does not fit"
    print(f"{local / 1e9:.1f} GB per device: {verdict} in {args.hbm_gb:g} GB")


if __name__ == "__main__":
    main()
