"""The routed experts' grouped matmul: TILED (several tile sizes) vs jax.lax.ragged_dot vs one
dense matmul over the same rows, forward and forward+backward, side by side in one process.

    JAX_PLATFORMS=cpu python bench/grouped_matmul.py [--rounds=5 --tiles=32,64,128,256]

Shapes (issue 12): 2048 rows 256 -> 128 over 8 experts; 8192 rows 512 -> 256 over 32 experts.
Group sizes are a multinomial draw over Dirichlet(2) expert probabilities (a skewed routing,
fixed seed). Each variant is compiled once, then the rounds alternate over all variants (one
call each per round, several for sub-10ms ones) and the medians are printed with the ratio to
the dense matmul. "xla flops" is the compiled program's cost analysis over the dense one's:
how much work XLA schedules (ragged_dot: about E times the dense work on XLA:CPU; not shown for
TILED, whose matmuls sit in a loop that the cost analysis does not count). "rows" is TILED's
padded rows over the real ones. Every variant's output and gradients are checked against
ragged_dot before timing.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import grouped

G = grouped.GroupedMatmul
CASES = [(2048, 256, 128, 8), (8192, 512, 256, 32)]


def operands(Z, D, F, E, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(Z, rng.dirichlet(np.full(E, 2.0))).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((Z, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((E, D, F)) / np.sqrt(D), jnp.float32)
    c = jnp.asarray(rng.standard_normal((Z, F)), jnp.float32)
    return x, w, jnp.asarray(sizes), c


def programs(name, E):
    """(forward, forward+backward) of one variant, jitted; the dense one uses expert 0's weight."""
    if name == "dense":
        f = lambda x, w, s: x @ w[0]  # noqa: E731
    elif name == "ragged_dot":
        f = functools.partial(grouped.matmul, impl=G.RAGGED_DOT)
    else:
        f = functools.partial(grouped.matmul, impl=G.TILED, tile=int(name.split("=")[1]))

    def loss(x, w, s, c):
        return jnp.sum(f(x, w, s) * c)

    fwd = jax.jit(lambda x, w, s, c: f(x, w, s))
    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return fwd, both


def flops(fn, *args):
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def run_case(Z, D, F, E, tiles, rounds):
    x, w, s, c = operands(Z, D, F, E)
    names = ["dense", "ragged_dot", *[f"tiled tile={t}" for t in tiles]]
    progs = {n: programs(n, E) for n in names}
    want = progs["ragged_dot"][1](x, w, s, c)
    for n in names[2:]:
        got = progs[n][1](x, w, s, c)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            assert err < 1e-5, (n, err)
    work = {n: flops(progs[n][1], x, w, s, c) for n in names[:2]}
    times = {(n, m): [] for n in names for m in (0, 1)}
    for n in names:  # warm up (compile) everything before the first timed round
        for m in (0, 1):
            jax.block_until_ready(progs[n][m](x, w, s, c))
    for _ in range(rounds):
        for n in names:
            for m in (0, 1):
                fn = progs[n][m]
                reps, t0 = 0, time.perf_counter()
                while reps == 0 or (time.perf_counter() - t0 < 0.05 and reps < 20):
                    jax.block_until_ready(fn(x, w, s, c))
                    reps += 1
                times[n, m].append((time.perf_counter() - t0) / reps)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"\n{Z} rows, {D} -> {F}, {E} experts; group sizes {np.asarray(s).tolist()}")
    print(
        f"{'variant':16s} {'fwd ms':>9s} {'x dense':>8s} {'fwd+bwd ms':>11s} {'x dense':>8s}"
        f" {'xla flops':>10s}"
    )
    for n in names:
        if n.startswith("tiled"):
            t = int(n.split("=")[1])
            used = int(np.sum(-(-np.asarray(s) // t))) * t
            n_show = f"{n} ({used / Z:.2f} rows)"
        else:
            n_show = n
        xla = f"{work[n] / work['dense']:10.2f}" if n in work else f"{'-':>10s}"
        print(
            f"{n_show:26s} {med[n, 0] * 1e3:9.2f} {med[n, 0] / med['dense', 0]:8.2f}"
            f" {med[n, 1] * 1e3:11.2f} {med[n, 1] / med['dense', 1]:8.2f} {xla}"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiles", default="32,64,128,256")
    args = p.parse_args()
    tiles = [int(t) for t in args.tiles.split(",")]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    for case in CASES:
        run_case(*case, tiles, args.rounds)


if __name__ == "__main__":
    main()
