"""Per-op costs of one pipeline stage (F, B, Bi, W, F&B) and the bubble they predict per schedule.

    JAX_PLATFORMS=cpu python bench/pipeline_costs.py --config=configs/small.py --microbatch=1 \
        --set train.seq_len=128 [--json]

Both backward splits are timed in one run (parallel.backward_split): `exact` (Bi stores the
residuals, W runs only the weight GEMMs; the W op is timed on residuals a real Bi wrote) and
`recompute` (Bi and W recompute the forward). F, B and F&B do not depend on the split. The
predicted table uses the exact split's costs; `--json` prints both splits' per-op ms and tables.

Times the executor's own op branches (`pipeline_ops.Ops`, exactly what runs inside the tick loop)
on one device for a middle stage (no prologue or epilogue) of `--layers` MoE layers, one jitted
op per call, its carry donated and threaded from call to call as the tick loop carries it (so an
op pays for its in-place updates of the gradient accumulators and slots, not for building or
copying out the carry); an op's cost is its fastest of `--reps` interleaved rounds. DualPipeV
folds twice as many stages onto the same ranks, so at a fixed model its stages are half as deep:
its costs are measured on a stage of layers/2. The costs go into `costmodel` (asynchronous =
the official DualPipe's timeline, lock-step = this executor's) for PP=4 and 8; the printout is
the BENCHMARKS.md table. `--costs`/`--half-costs` skip the measurement and reuse given costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepseek_jax import config as config_lib
from deepseek_jax.batch import Batch
from deepseek_jax.model import losses
from deepseek_jax.parallel.config import BackwardSplit
from deepseek_jax.parallel.pipeline import costmodel, schedules, stages
from deepseek_jax.parallel.pipeline import ops as pipeline_ops
from deepseek_jax.parallel.pipeline.schedules import Schedule
from deepseek_jax.parallel.pipeline.ticks import Code
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib

RESIDUALS: dict = {}  # (layers, split) -> what one Bi stores for its W, per micro-batch
OPS = {"F": Code.F, "B": Code.B, "Bi": Code.BI, "W": Code.W, "FB": Code.FB}


def compile_ops(
    exp, layers: int, microbatch: int, split: BackwardSplit = BackwardSplit.EXACT
) -> dict:
    """{op: (jitted fn, args)} for a middle stage of `layers` MoE layers, holding two chunks as
    DualPipe does (F&B runs the forward of chunk 0 and the backward of chunk 1)."""
    cfg = dataclasses.replace(exp.model, n_layers=exp.model.n_dense_layers + 2 * layers)
    graphdef, _, _ = state_lib.abstract_model(cfg)
    init = state_lib.init_state(cfg, optax.identity(), exp.train.seed)
    stack, glob = stages.split(init.params)
    stack_bias, glob_bias = stages.split(init.expert_bias)
    pair = lambda t: jax.tree.map(lambda a: a.reshape(2, layers, *a.shape[1:]), t)  # noqa: E731
    seq, M = exp.train.seq_len, 2
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (M, microbatch, seq)), jnp.int32)
    mbs = Batch(inputs=ids, targets=ids, loss_mask=jnp.ones_like(ids))
    acc = jnp.promote_types(cfg.compute_dtype.jnp, jnp.float32)
    norms = losses.Norms(
        jnp.asarray(M * microbatch * seq, acc),
        jnp.full((cfg.mtp_depth,), M * microbatch * seq, acc),
        M,
    )
    weights = losses.Weights(jnp.asarray(0.3, acc), exp.train.balance_alpha)
    zero = jnp.zeros((2,), jnp.int32)  # both chunks are middle stages
    stage = stages.Stage(graphdef, cfg, M)
    row = {
        k: jnp.int32(v)
        for k, v in dict(
            c=0, m=0, mb=0, act=0, grd=0, c2=1, m2=1, mb2=1, act2=1, grd2=1, wres=0
        ).items()
    }
    out, wres = {}, None
    for name, code in OPS.items():  # Bi before W: W is timed on the residuals Bi stored

        def ops_of(stack, stack_bias):
            env = pipeline_ops.make_env(
                stack, stack_bias, glob, glob_bias, mbs, norms, weights, zero, zero
            )
            return env, pipeline_ops.Ops(stage, env, split)

        def init(stack, stack_bias, wres):
            env, ops = ops_of(stack, stack_bias)
            x_bytes = microbatch * seq * cfg.d_model * jnp.dtype(cfg.compute_dtype.jnp).itemsize
            RESIDUALS[(layers, split.value)] = dict(
                residual_bytes=ops.split.residual_bytes if ops.split else 0,
                residual_arrays=len(ops.residuals),
                stage_input_bytes=x_bytes,
            )
            carry = pipeline_ops.init_carry(stage, env, 2, 2, ops.residuals, 1)
            x = jax.random.normal(jax.random.key(1), carry.act.shape, carry.act.dtype)
            return dataclasses.replace(
                carry, act=x, grd=1e-3 * x, wres=carry.wres if wres is None else wres
            )

        # The carry is donated and threaded from call to call, as the tick loop carries it:
        # an op pays for its own in-place updates of the accumulators and slots, not for
        # creating or copying out the whole carry.
        def op(carry, stack, stack_bias, row, code=code):
            _, ops = ops_of(stack, stack_bias)
            carry, outbox, _ = ops.branch(code)(carry, row)
            return carry, outbox

        stack2, bias2 = pair(stack), pair(stack_bias)
        carry = jax.jit(init)(stack2, bias2, wres if code is Code.W else None)
        fn = jax.jit(op, donate_argnums=0)
        args = [carry, stack2, bias2, row]
        args[0] = jax.block_until_ready(fn(*args))[0]  # compile and warm up
        if code is Code.BI:
            wres = jax.tree.map(jnp.copy, args[0].wres)
        out[name] = (fn, args)
    return out


def measure(compiled: dict[str, dict], reps: int) -> dict[str, dict[str, float]]:
    """Seconds per op: the minimum over `reps` rounds, each round timing every op once in turn,
    so that load from other processes on a shared machine hits all ops alike."""
    best = {size: {op: float("inf") for op in ops} for size, ops in compiled.items()}
    for _ in range(reps):
        for size, ops in compiled.items():
            for op, (fn, args) in ops.items():
                t = time.perf_counter()
                args[0] = jax.block_until_ready(fn(*args))[0]  # the next call's carry
                best[size][op] = min(best[size][op], time.perf_counter() - t)
    return best


def time_unpipelined(exp, layers: int, batch: int, reps: int) -> float:
    """Seconds per unpipelined train step of the model with 2*layers MoE layers, `batch` seqs."""
    cfg = dataclasses.replace(exp.model, n_layers=exp.model.n_dense_layers + 2 * layers)
    tx = optim.optimizer(exp.train)
    graphdef, _, _ = state_lib.abstract_model(cfg)
    fn = jax.jit(step_lib.make_train_step(graphdef, exp.train, tx), donate_argnums=0)
    state = state_lib.init_state(cfg, tx, 0)
    ids = jnp.asarray(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, exp.train.seq_len)), jnp.int32
    )
    data = Batch(inputs=ids, targets=ids, loss_mask=jnp.ones_like(ids))
    state, m = fn(state, data)
    jax.block_until_ready(m)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        state, m = fn(state, data)
        jax.block_until_ready(m)
        best = min(best, time.perf_counter() - t)
    return best


def table(costs_by_schedule: dict, pps=(4, 8)) -> list[dict]:
    rows = []
    for pp in pps:
        for mult in (2, 4):
            M = mult * pp
            for schedule in schedules.SCHEDULES:
                costs = costs_by_schedule[schedule]
                plan = schedules.build(schedule, pp, M)
                s = costmodel.summarize(plan, costs)
                rows.append(
                    dict(
                        schedule=schedule.value,
                        pp=pp,
                        microbatches=M,
                        ticks=s.ticks,
                        lockstep=s.lockstep.makespan,
                        lockstep_bubble=s.lockstep.bubble,
                        asynchronous=s.asynchronous.makespan,
                        async_bubble=s.asynchronous.bubble,
                        formula=s.formula,
                        busy=max(s.lockstep.busy),
                        act_slots=max(s.act_slots),
                        wres_slots=max(s.wres_slots),
                    )
                )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/small.py")
    ap.add_argument("--layers", type=int, default=2, help="MoE layers per stage (DualPipe/1F1B)")
    ap.add_argument("--microbatch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. --set train.seq_len=128 (repeatable)",
    )
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--unpipelined-batch",
        type=int,
        default=0,
        help="also time the unpipelined train step of the 2*layers model on this "
        "many sequences (0: skip)",
    )
    ap.add_argument(
        "--costs",
        default="",
        help="skip measuring: stage costs in seconds, "
        "'F=..,B=..,Bi=..,W=..,FB=..'; --half-costs likewise for DualPipeV",
    )
    ap.add_argument("--half-costs", default="")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--splits",
        default="exact,recompute",
        help="backward splits to time, the first gives the table",
    )
    args = ap.parse_args()
    exp = config_lib.load(args.config, config_lib.parse_overrides(args.set))
    if args.costs:
        full = dataclasses.asdict(costmodel.Costs.parse(args.costs))
        half = dataclasses.asdict(costmodel.Costs.parse(args.half_costs or args.costs))
        by_split = {}
    else:
        splits = [BackwardSplit(x) for x in args.splits.split(",")]
        compiled = {}
        for sp in splits:
            compiled[("stage", sp)] = compile_ops(exp, args.layers, args.microbatch, sp)
            if args.layers > 1:
                compiled[("half", sp)] = compile_ops(exp, args.layers // 2, args.microbatch, sp)
        times = measure(compiled, args.reps)
        by_split = {
            sp.value: {
                "stage": times[("stage", sp)],
                "half_stage": times.get(("half", sp), times[("stage", sp)]),
            }
            for sp in splits
        }
        full, half = by_split[splits[0].value]["stage"], by_split[splits[0].value]["half_stage"]
    costs = {
        s: costmodel.Costs(**(half if s is Schedule.DUALPIPEV else full))
        for s in schedules.SCHEDULES
    }
    rows = table(costs)
    plain = (
        time_unpipelined(exp, args.layers, args.unpipelined_batch, args.reps)
        if args.unpipelined_batch
        else None
    )
    if args.json:
        ms = lambda t: {k: 1e3 * v for k, v in t.items()}  # noqa: E731
        print(
            json.dumps(
                {
                    "per_op_ms": {"stage": ms(full), "half_stage": ms(half)},
                    "by_split_ms": {
                        k: {size: ms(t) for size, t in v.items()} for k, v in by_split.items()
                    },
                    "bi_plus_w_over_b": {
                        k: (v["stage"]["Bi"] + v["stage"]["W"]) / v["stage"]["B"]
                        for k, v in by_split.items()
                    },
                    "residuals_per_microbatch": {
                        f"{k[1]} {k[0]} layers": v for k, v in RESIDUALS.items()
                    },
                    "rows": rows,
                    "unpipelined_step_s": plain,
                },
                indent=1,
            )
        )
        return
    print(
        f"{jax.devices()[0].device_kind}; {args.config}, seq {exp.train.seq_len}, "
        f"micro-batch {args.microbatch}, {args.layers} MoE layers per stage"
    )
    labelled = [(f"{sp} {size}", t) for sp, v in by_split.items() for size, t in v.items()]
    for label, t in labelled or (("stage", full), ("half stage (dualpipev)", half)):
        print(
            f"  {label}: "
            + "  ".join(f"{k}={1e3 * v:.1f}ms" for k, v in t.items())
            + f"  (Bi+W)/B={(t['Bi'] + t['W']) / t['B']:.2f}  FB/(F+B)="
            f"{t['FB'] / (t['F'] + t['B']):.2f}"
        )
    for (layers, sp), v in RESIDUALS.items():
        print(
            f"  {sp}, {layers} layers: a Bi stores {v['residual_bytes'] / 2**20:.2f} MiB for "
            f"its W ({v['residual_arrays']} arrays) per micro-batch, "
            f"{v['residual_bytes'] / v['stage_input_bytes']:.1f}x the stage input"
        )
    if plain is not None:
        print(
            f"  unpipelined train step, {2 * args.layers} MoE layers + embedding, dense layers, "
            f"head, MTP and AdamW, {args.unpipelined_batch} x {exp.train.seq_len} tokens: "
            f"{1e3 * plain:.1f}ms; the two middle stages' F + B for as many tokens: "
            f"{1e3 * 2 * args.unpipelined_batch / args.microbatch * (full['F'] + full['B']):.1f}"
            "ms"
        )
    print(
        "| schedule | PP | M | ticks | busy/rank (s) | lock-step step (s) | lock-step bubble "
        "| async step (s) | async bubble | formula idle (s) | stored inputs/rank "
        "| W residual sets/rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['schedule']} | {r['pp']} | {r['microbatches']} | {r['ticks']} | "
            f"{r['busy']:.2f} | {r['lockstep']:.2f} | {100 * r['lockstep_bubble']:.1f}% | "
            f"{r['asynchronous']:.2f} | {100 * r['async_bubble']:.1f}% | {r['formula']:.2f} | "
            f"{r['act_slots']} | {r['wres_slots']} |"
        )


if __name__ == "__main__":
    main()
