"""Throughput and MFU of the jitted train step, compile time vs depth, and where the time goes.

    python bench/train_step.py --config=configs/small.py [--steps=10] [--depths=4,32]
        [--parts=mfu,compile,breakdown] [--set model.loss_chunk_tokens=512 ...] [--json=FILE]

In one process: (1) the peak matmul FLOP/s of this machine, from a large jnp.dot in the compute
dtype; (2) tokens/s of the train step on the config, and model FLOP/s = tokens/s x training FLOPs
per token (deepseek_jax.model.counting: 6 x matmul-active params + causal attention + MTP), whose
ratio to (1) is the MFU; (3) compile time of the same step at two depths (MoE layers scanned, so it
should barely grow); (4) `breakdown`: ms per step by part of the model (head + CE, attention, MoE
routing / sort / grouped matmul / combine, FFN, norms + RoPE, optimizer, other) from a
jax.profiler trace of the compiled step (bench/step_profile.py says how). Ratios are measured side
by side; absolute times drift on shared machines.
The JSON it prints (and writes to --json=FILE) is what the cost estimate's `--mfu=measured
--bench_json=FILE` reads (deepseek_jax/cost/estimate.py, docs/cost.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import config as config_lib
from deepseek_jax.batch import Batch
from deepseek_jax.model import counting
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib

try:
    from bench import step_profile
except ImportError:  # run as a script: bench/ is on sys.path
    import step_profile


def matmul_peak(dtype, n: int = 2048, seconds: float = 2.0) -> float:
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(x, x).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(x, x).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def synthetic_batch(exp, seed=0):
    t = exp.train
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, exp.model.vocab_size, (t.global_batch_size, t.seq_len + 1))
    return Batch(
        inputs=jnp.asarray(seq[:, :-1], jnp.int32),
        targets=jnp.asarray(seq[:, 1:], jnp.int32),
        loss_mask=jnp.ones((t.global_batch_size, t.seq_len), jnp.float32),
        target_bytes=jnp.ones((t.global_batch_size, t.seq_len), jnp.int32),
    )


def build(exp):
    tx = optim.optimizer(exp.train)
    graphdef, _, _ = state_lib.abstract_model(exp.model)
    fn = jax.jit(step_lib.make_train_step(graphdef, exp.train, tx), donate_argnums=0)
    return tx, fn


def compile_seconds(exp) -> float:
    tx, fn = build(exp)
    abstract = state_lib.abstract_state(exp.model, tx)
    t0 = time.perf_counter()
    fn.lower(abstract, synthetic_batch(exp)).compile()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--depths", default="4,32")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--parts", default="mfu,compile", help="any of mfu,compile,breakdown")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="FIELD=VALUE config override")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    exp = config_lib.load(args.config, config_lib.parse_overrides(args.set))
    m = exp.model
    counts = counting.count(m, exp.train.seq_len)
    tokens = exp.train.global_batch_size * exp.train.seq_len
    out = {
        "config": args.config,
        "overrides": args.set,
        "commit": git_commit(),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
    }
    if "mfu" in parts:
        out.update(measure_mfu(exp, counts, tokens, args.steps))
    if "compile" in parts:
        depth_rows = {}
        for depth in [int(d) for d in args.depths.split(",")]:
            deep = dataclasses.replace(exp, model=dataclasses.replace(m, n_layers=depth))
            depth_rows[depth] = compile_seconds(deep)
        out["compile_s_by_layers"] = {k: round(v, 2) for k, v in depth_rows.items()}
    if "breakdown" in parts:
        out["breakdown"] = breakdown(exp, args.profile_steps)
        print_breakdown(out["breakdown"])
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


def git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def breakdown(exp, steps: int) -> dict:
    """ms per step by category from a profiler trace of the compiled step (bench/step_profile)."""
    tx, fn = build(exp)
    batch = synthetic_batch(exp)
    holder = {"state": state_lib.init_state(exp.model, tx, 0)}
    compiled = fn.lower(holder["state"], batch).compile()

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    run()
    run()  # warm
    return step_profile.breakdown(compiled, run, steps)


def print_breakdown(b: dict) -> None:
    for cat, ms in b["ms_per_step"].items():
        print(f"  {cat:30s} {ms:9.1f} ms")
    print(
        f"  {'sum of op times':30s} {b['op_ms_sum']:9.1f} ms "
        f"(step wall under the profiler {b['wall_ms_per_step']:.1f} ms)"
    )


def measure_mfu(exp, counts, tokens: int, steps: int) -> dict:
    m = exp.model
    peak = matmul_peak(m.compute_dtype.jnp)
    tx, fn = build(exp)
    state = state_lib.init_state(m, tx, 0)
    batch = synthetic_batch(exp)
    t0 = time.perf_counter()
    state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    tps = tokens / step_s
    model_flops = tps * counts.train_flops_per_token
    return {
        "total_params": counts.total_params,
        "active_params": counts.active_params,
        "mtp_params": counts.mtp_params,
        "train_flops_per_token": counts.train_flops_per_token,
        "seq_len": exp.train.seq_len,
        "tokens_per_step": tokens,
        "first_step_s (compile+run)": round(first, 2),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tps, 1),
        "model_flops_per_s": model_flops,
        "matmul_peak_flops_per_s": peak,
        "mfu": model_flops / peak,
    }


if __name__ == "__main__":
    main()
