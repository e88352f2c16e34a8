"""Per-op costs of one pipeline stage (F, B, Bi, W, F&B) and the bubble they predict per schedule.

    JAX_PLATFORMS=cpu python bench/pipeline_costs.py --config=configs/small.py --microbatch=2

Times the executor's own op branches (`pipeline_ops.Ops`, exactly what runs inside the tick loop)
on one device for a middle stage (no prologue or epilogue) of `--layers` MoE layers, jitted one op
per call, median of `--reps` runs. DualPipeV folds twice as many stages onto the same ranks, so at
a fixed model its stages are half as deep: its costs are measured on a stage of layers/2. The
costs go into `costmodel` (asynchronous = the official DualPipe's timeline, lock-step = this
executor's) for PP=4 and 8; the printout is the BENCHMARKS.md table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepseek_jax import config as config_lib
from deepseek_jax.parallel import costmodel, pipeline_ops, schedules, stages
from deepseek_jax.parallel.schedules import Schedule
from deepseek_jax.parallel.ticks import Code
from deepseek_jax.train import state as state_lib

OPS = {"F": Code.F, "B": Code.B, "Bi": Code.BI, "W": Code.W, "FB": Code.FB}


def measure(exp, layers: int, microbatch: int, reps: int) -> dict[str, float]:
    """Seconds per op for a middle stage of `layers` MoE layers (two chunks, as DualPipe holds)."""
    cfg = dataclasses.replace(exp.model, n_layers=exp.model.n_dense_layers + 2 * layers)
    graphdef, _, _ = state_lib.abstract_model(cfg)
    init = state_lib.init_state(cfg, optax.identity(), exp.train.seed)
    params, bias = init.params, init.expert_bias
    stack, glob = stages.split(params)
    stack_bias, glob_bias = stages.split(bias)
    pair = lambda t: jax.tree.map(lambda a: a.reshape(2, layers, *a.shape[1:]), t)  # noqa: E731
    seq, M = exp.train.seq_len, 2
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (M, microbatch, seq)), jnp.int32)
    mbs = {"inputs": ids, "targets": ids, "loss_mask": jnp.ones_like(ids)}
    acc = jnp.promote_types(cfg.compute_dtype.jnp, jnp.float32)
    norms = stages.Norms(jnp.asarray(M * microbatch * seq, acc),
                         jnp.full((cfg.mtp_depth,), M * microbatch * seq, acc), jnp.asarray(0.3))
    zero = jnp.zeros((2,), jnp.int32)  # both chunks are middle stages
    stage = stages.Stage(graphdef, cfg, exp.train.balance_alpha, M)
    row = {k: jnp.int32(v) for k, v in dict(c=0, m=0, mb=0, act=0, grd=0, c2=1, m2=1, mb2=1,
                                             act2=1, grd2=1).items()}
    times = {}
    for name, code in OPS.items():
        def op(stack, stack_bias, row, code=code):
            env = pipeline_ops.make_env(stack, stack_bias, glob, glob_bias, mbs, norms, zero, zero)
            carry = pipeline_ops.init_carry(stage, env, 2, 2)
            x = jax.random.normal(jax.random.key(1), carry.act.shape, carry.act.dtype)
            carry = dataclasses.replace(carry, act=x, grd=1e-3 * x)
            carry, outbox, _ = pipeline_ops.Ops(stage, env).branch(code)(carry, row)
            return carry.d_stack, outbox

        fn = jax.jit(op)
        args = (pair(stack), pair(stack_bias), row)
        jax.block_until_ready(fn(*args))
        runs = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
    return times


def table(costs_by_schedule: dict, pps=(4, 8)) -> list[dict]:
    rows = []
    for pp in pps:
        for mult in (2, 4):
            M = mult * pp
            for schedule in Schedule:
                costs = costs_by_schedule[schedule]
                plan = schedules.build(schedule, pp, M)
                s = costmodel.summarize(plan, costs)
                rows.append(dict(schedule=schedule.value, pp=pp, microbatches=M, ticks=s.ticks,
                                 lockstep=s.lockstep.makespan, lockstep_bubble=s.lockstep.bubble,
                                 asynchronous=s.asynchronous.makespan,
                                 async_bubble=s.asynchronous.bubble, formula=s.formula,
                                 work=max(s.lockstep.busy)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/small.py")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers per stage (DualPipe/1F1B)")
    ap.add_argument("--microbatch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=0, help="override train.seq_len")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    overrides = {"train.seq_len": args.seq} if args.seq else {}
    exp = config_lib.load(args.config, overrides)
    full = measure(exp, args.layers, args.microbatch, args.reps)
    half = measure(exp, args.layers // 2, args.microbatch, args.reps) if args.layers > 1 else full
    costs = {s: costmodel.Costs(**(half if s is Schedule.DUALPIPEV else full)) for s in Schedule}
    rows = table(costs)
    if args.json:
        print(json.dumps({"per_op_s": {"stage": full, "half_stage": half}, "rows": rows},
                         indent=1))
        return
    print(f"{jax.devices()[0].device_kind}; {args.config}, seq {exp.train.seq_len}, "
          f"micro-batch {args.microbatch}, {args.layers} MoE layers per stage")
    for label, t in (("stage", full), ("half stage (dualpipev)", half)):
        print(f"  {label}: " + "  ".join(f"{k}={1e3 * v:.1f}ms" for k, v in t.items())
              + f"  (Bi+W)/B={(t['Bi'] + t['W']) / t['B']:.2f}  FB/(F+B)="
              f"{t['FB'] / (t['F'] + t['B']):.2f}")
    print("| schedule | PP | M | ticks | lock-step step (s) | lock-step bubble | async step (s) "
          "| async bubble | formula idle (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['pp']} | {r['microbatches']} | {r['ticks']} | "
              f"{r['lockstep']:.3f} | {100 * r['lockstep_bubble']:.1f}% | {r['asynchronous']:.3f} "
              f"| {100 * r['async_bubble']:.1f}% | {r['formula']:.3f} |")


if __name__ == "__main__":
    main()
