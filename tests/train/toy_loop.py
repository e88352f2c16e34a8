"""A toy deterministic training loop that uses the checkpoint library the way the real loop will.

Run as a script by the resume/preemption tests (the device count comes from XLA_FLAGS in the
environment). State: FSDP-sharded params, AdamW state, a step counter and a typed PRNG key that
every step consumes; data: an index counter whose value is the data-iterator state. Every step
appends the data indices it consumes to `--log`, so a test can check that nothing was skipped or
repeated across a kill and a resume.

    python tests/train/toy_loop.py --workdir=DIR --steps=N [--save-every=K] [--sleep=S]
        [--coordinator=HOST:PORT --num-processes=P --process-id=I]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.train import checkpoint, preemption

DIN, DOUT, ROWS = 16, 8, 8  # ROWS: examples per process per step
optimizer = optax.adamw(1e-2)


def make_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("fsdp",), axis_types=(AxisType.Auto,))


def _init_params() -> dict[str, np.ndarray]:
    # numpy, not jax.random: threefry's CPU compile alone would cost seconds per process.
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((DIN, DOUT), dtype=np.float32),
        "b": np.zeros((DOUT,), jnp.bfloat16),
    }


def _abstract() -> dict[str, Any]:
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _init_params())
    return {
        "params": params,
        "opt_state": jax.eval_shape(optimizer.init, params),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "key": jax.eval_shape(lambda: jax.random.key(0)),
    }


def state_shardings(mesh: jax.sharding.Mesh) -> Any:
    """FSDP: the weight and its Adam moments split by rows, everything else replicated."""
    return jax.tree.map(
        lambda a: NamedSharding(mesh, P("fsdp", None) if a.shape == (DIN, DOUT) else P()),
        _abstract(),
    )


def abstract_state(mesh: jax.sharding.Mesh) -> Any:
    """What the real loop will do: shapes from eval_shape, shardings from the mesh, no arrays."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        _abstract(),
        state_shardings(mesh),
    )


def init_state(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    # make_array_from_callback builds global arrays on any number of processes.
    shardings = state_shardings(mesh)
    put = lambda value, sharding: jax.make_array_from_callback(  # noqa: E731
        np.shape(value), sharding, lambda index: np.asarray(value)[index]
    )
    params = jax.tree.map(put, _init_params(), shardings["params"])
    key_data = put(np.array([0, 42], np.uint32), shardings["key"])
    return {
        "params": params,
        "opt_state": jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params),
        "step": put(np.int32(0), shardings["step"]),
        "key": jax.jit(jax.random.wrap_key_data, out_shardings=shardings["key"])(key_data),
    }


def example(index: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(DIN, dtype=np.float32) * np.float32(0.1)
    x = np.sin(t * np.float32(index % 97 + 1)).astype(np.float32)
    y = np.cos(x[:DOUT] * np.float32(index % 13 + 1)).astype(np.float32)
    return x, y


def batch(mesh: jax.sharding.Mesh, indices: list[int]) -> tuple[jax.Array, jax.Array]:
    xs, ys = zip(*(example(i) for i in indices))
    sharding = NamedSharding(mesh, P("fsdp"))
    return (
        jax.make_array_from_process_local_data(sharding, np.stack(xs)),
        jax.make_array_from_process_local_data(sharding, np.stack(ys)),
    )


def loss_fn(params: dict, x: jax.Array, y: jax.Array, noise: jax.Array) -> jax.Array:
    pred = x @ params["w"] + params["b"].astype(jnp.float32)
    return jnp.mean((pred - y) ** 2) + noise * jnp.sum(params["w"])


def train_step(state: dict, x: jax.Array, y: jax.Array) -> dict:
    # The key's bits perturb the loss and advance every step (a cheap LCG instead of threefry,
    # which costs seconds of CPU compile): a key restored wrongly changes every later step.
    bits = jax.random.key_data(state["key"])
    noise = (bits[0] % 1024).astype(jnp.float32) * 1e-6
    grads = jax.grad(loss_fn)(state["params"], x, y, noise)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    key = jax.random.wrap_key_data(bits * jnp.uint32(1664525) + jnp.uint32(1013904223))
    return {
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "key": key,
    }


def jit_train_step(mesh: jax.sharding.Mesh) -> Any:
    # Fixed in/out shardings: one executable for fresh, restored and updated states alike.
    shardings = state_shardings(mesh)
    data = NamedSharding(mesh, P("fsdp"))
    return jax.jit(
        train_step, donate_argnums=0, in_shardings=(shardings, data, data), out_shardings=shardings
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--log", default=None)
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    args = p.parse_args(argv)
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    pid, nproc = jax.process_index(), jax.process_count()
    mesh = make_mesh()
    guard = preemption.PreemptionGuard().install()
    ckpt = checkpoint.Checkpointer(args.workdir, keep_last=2)
    step_fn = jit_train_step(mesh)
    restored = ckpt.restore(None, abstract_state(mesh))
    if restored is None:
        state, step, next_index = init_state(mesh), 0, 0
    else:
        state, step, next_index = restored.state, restored.step, restored.data["next_index"]
        print(f"[{pid}] resumed at step {step}", flush=True)
    log = open(args.log, "a") if args.log else None
    while step < args.steps:
        # Each process reads its own disjoint slice of the index stream, as per-host data would.
        indices = [(next_index + r) * nproc + pid for r in range(ROWS)]
        if log:
            log.write(f"{step} {' '.join(map(str, indices))}\n")
            log.flush()
        state = step_fn(state, *batch(mesh, indices))
        step, next_index = step + 1, next_index + ROWS
        data = {"next_index": next_index}
        if step % args.save_every == 0 or step == args.steps:
            ckpt.save(step, state, data=data, config={"steps": args.steps})
        print(f"[{pid}] step {step}", flush=True)
        if guard.should_stop(step):
            ckpt.save(step, state, data=data, config={"steps": args.steps}, wait=True)
            ckpt.close()
            print(f"[{pid}] preempted: saved step {step} ({guard.reason})", flush=True)
            return 0
        time.sleep(args.sleep)
    ckpt.close()
    if nproc == 1:
        leaves = jax.tree.leaves(
            jax.tree.map(
                lambda x: (
                    jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
                ),
                state,
            )
        )
        np.savez(f"{args.workdir}/final.npz", *[np.asarray(x) for x in leaves])
    print(f"[{pid}] done at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
