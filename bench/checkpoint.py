"""Checkpoint save/restore cost for a train-state-sized pytree (params + AdamW moments).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python bench/checkpoint.py --mb=100 --saves=3 --workdir=/tmp/ckpt_bench

Reports, per save after the first (which also compiles): the time save() blocks the caller (what
the training step sees), the time until the step is committed, the bytes on disk; then restore
time with verification onto the same mesh and onto half the devices.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from deepseek_jax.train import checkpoint, checkpoint_integrity


def make_state(mb: float, mesh: jax.sharding.Mesh) -> dict:
    # Params are a third of the bytes (AdamW keeps two float32 moments per parameter).
    n = int(mb * 2**20 / 4 / 3)
    rows = 1024
    cols = max(8, n // rows // 8 * 8)
    shard = NamedSharding(mesh, P("fsdp", None))
    rng = np.random.default_rng(0)
    params = {f"layer{i}": jax.device_put(
        rng.standard_normal((rows, cols // 4), dtype=np.float32), shard) for i in range(4)}
    # Moments filled like a trained run's (random, not the compressible zeros of init).
    opt = jax.tree.map(lambda x: jax.device_put(rng.standard_normal(x.shape, np.float32),
                                                x.sharding) if x.ndim == 2 else x,
                       optax.adamw(1e-3).init(params))
    replicated = NamedSharding(mesh, P())
    opt = jax.tree.map(lambda x: x if x.ndim else jax.device_put(x, replicated), opt)
    return {"params": params, "opt_state": opt,
            "step": jax.device_put(jnp.int32(0), replicated),
            "key": jax.device_put(jax.random.key(0), replicated)}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=100)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/ckpt_bench")
    p.add_argument("--file-checksums", action="store_true")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,))
    state = make_state(args.mb, mesh)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state)
                 if not jnp.issubdtype(x.dtype, jax.dtypes.prng_key))
    print(f"state: {nbytes / 2**20:.1f} MiB in {len(jax.tree.leaves(state))} leaves on "
          f"{jax.device_count()} devices")
    t = time.perf_counter()
    checkpoint_integrity.fingerprints(state)
    t_fp_first = time.perf_counter() - t
    t = time.perf_counter()
    checkpoint_integrity.fingerprints(state)
    print(f"fingerprints: {time.perf_counter() - t:.3f} s (first call, with compile: "
          f"{t_fp_first:.2f} s)")
    blocking, committed = [], []
    with checkpoint.Checkpointer(args.workdir, keep_last=args.saves + 1,
                                 file_checksums=args.file_checksums) as ckpt:
        for step in range(args.saves + 1):
            t = time.perf_counter()
            ckpt.save(step, state)
            t_block = time.perf_counter() - t
            ckpt.wait_until_finished()
            t_commit = time.perf_counter() - t
            if step > 0:
                blocking.append(t_block)
                committed.append(t_commit)
            print(f"save {step}: blocked {t_block:.3f} s, committed after {t_commit:.3f} s"
                  + (" (first: compiles)" if step == 0 else ""))
        size = du(Path(args.workdir) / "checkpoints" / str(args.saves))
        print(f"median: blocked {statistics.median(blocking):.3f} s, committed "
              f"{statistics.median(committed):.3f} s; on disk {size / 2**20:.1f} MiB per step")
        for name, devices in (("same mesh", jax.devices()),
                              ("half the devices", jax.devices()[: jax.device_count() // 2])):
            target_mesh = jax.make_mesh((len(devices),), ("fsdp",), devices=devices,
                                        axis_types=(AxisType.Auto,))
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
                    target_mesh, x.sharding.spec)), state)
            t = time.perf_counter()
            ckpt.restore(None, abstract)
            print(f"restore onto {name} (verified): {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
