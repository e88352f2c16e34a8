"""Per-device parameter + optimizer-state memory of an experiment under a layout, device-free.

    python bench/param_memory.py --config=configs/deepseek_v3_671b.py \
        --preset=fsdp_expert_tp --fsdp=4 --expert=64 --devices=256

Shapes come from `jax.eval_shape` of the train-state init and shardings from the plan over an
`AbstractMesh`, so nothing is allocated and no device is needed. Every leaf's per-device bytes
is its shard shape (NamedSharding.shard_shape) times its itemsize; the layouts are uniform, so
every device holds the same amount. Activations, gradients and XLA temporaries are not included.
"""

from __future__ import annotations

import argparse
import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import config as experiment_config
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel import plan as plan_lib
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/deepseek_v3_671b.py")
    ap.add_argument("--preset", default="fsdp_expert_tp")
    ap.add_argument("--devices", type=int, default=256)
    for axis, default in (("data", -1), ("fsdp", 4), ("expert", 64), ("tensor", 1)):
        ap.add_argument(f"--{axis}", type=int, default=default)
    args = ap.parse_args()
    exp = experiment_config.load(args.config)
    cfg = parallel_config.ParallelConfig(
        preset=parallel_config.Preset(args.preset),
        data=args.data,
        fsdp=args.fsdp,
        expert=args.expert,
        tensor=args.tensor,
    )
    parts = report(exp, cfg, args.devices)
    n_params = sum(
        x.size
        for x in jax.tree.leaves(
            state_lib.abstract_state(exp.model, optim.optimizer(exp.train)).params
        )
    )
    print(
        f"{args.config}: {n_params / 1e9:.1f}B parameters ({exp.model.param_dtype.value}), "
        f"preset {args.preset}, {args.devices} devices (data={args.data} fsdp={args.fsdp} "
        f"expert={args.expert} tensor={args.tensor})"
    )
    print("| part | per device | unsharded |")
    print("|---|---|---|")
    for part, (local, total) in parts.items():
        print(f"| {part} | {local / GIB:.2f} GiB | {total / GIB:.1f} GiB |")
    local = sum(v[0] for v in parts.values())
    total = sum(v[1] for v in parts.values())
    print(f"| total | {local / GIB:.2f} GiB | {total / GIB:.1f} GiB |")


if __name__ == "__main__":
    main()
