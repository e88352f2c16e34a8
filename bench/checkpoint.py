"""Checkpoint save/restore cost for a train-state-sized pytree (params + AdamW moments).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python bench/checkpoint.py --mb=100 --saves=3 --workdir=/tmp/ckpt_bench
    # the real TrainState of an experiment, sharded as its parallel section says (FSDP here):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python bench/checkpoint.py --config=configs/small.py --set parallel.preset=fsdp \
        --set parallel.fsdp=8 --saves=3

Reports, per save after the first (which also compiles): the time save() blocks the caller (what
the training step sees), the time until the step is committed, the bytes on disk; then restore
time with verification onto the same mesh and onto half the devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import config as config_lib
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.train import checkpoint, checkpoint_integrity, optim, sharded


def make_state(mb: float, mesh: jax.sharding.Mesh) -> dict:
    # Params are a third of the bytes (AdamW keeps two float32 moments per parameter).
    n = int(mb * 2**20 / 4 / 3)
    rows = 1024
    cols = max(8, n // rows // 8 * 8)
    shard = NamedSharding(mesh, P("fsdp", None))
    rng = np.random.default_rng(0)
    params = {
        f"layer{i}": jax.device_put(rng.standard_normal((rows, cols // 4), dtype=np.float32), shard)
        for i in range(4)
    }
    # Moments filled like a trained run's (random, not the compressible zeros of init).
    opt = jax.tree.map(
        lambda x: (
            jax.device_put(rng.standard_normal(x.shape, np.float32), x.sharding)
            if x.ndim == 2
            else x
        ),
        optax.adamw(1e-3).init(params),
    )
    replicated = NamedSharding(mesh, P())
    opt = jax.tree.map(lambda x: x if x.ndim else jax.device_put(x, replicated), opt)
    return {
        "params": params,
        "opt_state": opt,
        "step": jax.device_put(jnp.int32(0), replicated),
        "key": jax.device_put(jax.random.key(0), replicated),
    }


def config_state(path: str, overrides: list[str]):
    """The experiment's initial TrainState on its mesh, AdamW moments filled with noise (a trained
    run's moments do not compress like init's zeros), and a function giving the abstract state
    sharded the same way over the first n devices (the restore targets)."""
    exp = config_lib.load(path, config_lib.parse_overrides(overrides))
    tx = optim.optimizer(exp.train)
    plan = plan_lib.make_plan(exp.parallel, exp.model, exp.train.global_batch_size)
    state = sharded.init_state(plan, exp.model, tx, exp.train.seed)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.opt_state))))
    noisy = jax.jit(lambda k, x: jax.random.normal(k, x.shape, x.dtype) * 1e-3)
    opt = jax.tree.map(lambda x: noisy(next(keys), x) if x.ndim else x, state.opt_state)
    state = dataclasses.replace(state, opt_state=opt)

    def target(n: int):
        # The same layout over n devices: the axis that absorbed the device count shrinks.
        sizes = plan.mesh.shape
        axis = next(a for a in ("fsdp", "data", "expert") if sizes[a] > 1 and sizes[a] % 2 == 0)
        par = dataclasses.replace(exp.parallel, **{axis: sizes[axis] * n // jax.device_count()})
        small = plan_lib.make_plan(par, exp.model, exp.train.global_batch_size, jax.devices()[:n])
        return sharded.abstract_state(small, exp.model, tx)

    return state, target


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=100)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/ckpt_bench")
    p.add_argument("--file-checksums", action="store_true")
    p.add_argument("--config", help="save this experiment's real TrainState instead of --mb")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="config override, e.g. parallel.fsdp=8 (repeatable)",
    )
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    if args.config:
        state, target = config_state(args.config, args.set)
    else:
        mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,))
        state = make_state(args.mb, mesh)

        def target(n: int):
            target_mesh = jax.make_mesh(
                (n,), ("fsdp",), devices=jax.devices()[:n], axis_types=(AxisType.Auto,)
            )
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    x.shape, x.dtype, sharding=NamedSharding(target_mesh, x.sharding.spec)
                ),
                state,
            )

    nbytes = sum(
        x.nbytes for x in jax.tree.leaves(state) if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    )
    print(
        f"state: {nbytes / 2**20:.1f} MiB in {len(jax.tree.leaves(state))} leaves on "
        f"{jax.device_count()} devices"
    )
    t = time.perf_counter()
    checkpoint_integrity.fingerprints(state)
    t_fp_first = time.perf_counter() - t
    t = time.perf_counter()
    checkpoint_integrity.fingerprints(state)
    print(
        f"fingerprints: {time.perf_counter() - t:.3f} s (first call, with compile: "
        f"{t_fp_first:.2f} s)"
    )
    blocking, committed = [], []
    with checkpoint.Checkpointer(
        args.workdir, keep_last=args.saves + 1, file_checksums=args.file_checksums
    ) as ckpt:
        for step in range(args.saves + 1):
            t = time.perf_counter()
            ckpt.save(step, state)
            t_block = time.perf_counter() - t
            ckpt.wait_until_finished()
            t_commit = time.perf_counter() - t
            if step > 0:
                blocking.append(t_block)
                committed.append(t_commit)
            print(
                f"save {step}: blocked {t_block:.3f} s, committed after {t_commit:.3f} s"
                + (" (first: compiles)" if step == 0 else "")
            )
        size = du(Path(args.workdir) / "checkpoints" / str(args.saves))
        print(
            f"median: blocked {statistics.median(blocking):.3f} s, committed "
            f"{statistics.median(committed):.3f} s; on disk {size / 2**20:.1f} MiB per step"
        )
        for name, n in (
            ("same mesh", jax.device_count()),
            ("half the devices", jax.device_count() // 2),
        ):
            abstract = target(n)
            t = time.perf_counter()
            ckpt.restore(None, abstract)
            print(f"restore onto {name} (verified): {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
