"""Blockwise vs dense attention: train-step memory at two sequence lengths, core time by length.

    python bench/attention_memory.py --config=configs/small.py [--seqs=2048,8192] [--batch=8]
        [--time-seqs=512,1024,2048,4096] [--dense-time-max=4096] [--rounds=3]

(1) Memory: the config's jitted train step (donated state, as the trainer runs it) compiled at
each sequence length with `model.attention.impl` dense and blockwise; XLA's compiled memory
analysis (`.lower(...).compile().memory_analysis()`: arguments + outputs + temporaries - aliased,
and the temporaries alone), a static figure from buffer assignment: nothing is run, so lengths
whose dense step would not fit in RAM are measured too. The issue-12 goal:
peak(blockwise, 4s) <= 1.2 x 4 x peak(blockwise, s), i.e. no S^2 term.
(2) Time: the attention core alone (forward + backward, jitted, batch 1, the config's heads and
head dims) at each length, dense and blockwise alternating in every round, the median of
`--rounds` per cell; the ratio is side by side in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp

from deepseek_jax import config as config_lib
from deepseek_jax.batch import Batch
from deepseek_jax.model import attention, rope
from deepseek_jax.model import config as model_config
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib

GiB = 2**30


def abstract_batch(batch: int, seq: int) -> Batch:
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return Batch(
        inputs=tok,
        targets=tok,
        loss_mask=jax.ShapeDtypeStruct((batch, seq), jnp.float32),
        target_bytes=tok,
    )


def step_memory(exp, impl: model_config.AttentionImpl, batch: int, seq: int) -> dict:
    model = dataclasses.replace(
        exp.model, attention=dataclasses.replace(exp.model.attention, impl=impl)
    )
    train = dataclasses.replace(exp.train, global_batch_size=batch, seq_len=seq)
    tx = optim.optimizer(train)
    graphdef, _, _ = state_lib.abstract_model(model)
    fn = jax.jit(step_lib.make_train_step(graphdef, train, tx), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = fn.lower(state_lib.abstract_state(model, tx), abstract_batch(batch, seq)).compile()
    mem = compiled.memory_analysis()
    # XLA:CPU's peak_memory_in_bytes is only the arguments (checked: below the temporaries), so
    # the peak is the sum of what buffer assignment allocates: arguments + outputs + temporaries,
    # less the outputs aliased onto donated arguments.
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return {
        "impl": impl.value,
        "seq": seq,
        "batch": batch,
        "peak_GiB": round(peak / GiB, 3),
        "temp_GiB": round(mem.temp_size_in_bytes / GiB, 3),
        "argument_GiB": round(mem.argument_size_in_bytes / GiB, 3),
        "compile_s": round(time.perf_counter() - t0, 1),
    }


def core_inputs(cfg: model_config.MLAConfig, seq: int):
    H, N, R, V = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    shapes = [(1, seq, H, N), (1, seq, H, R), (1, seq, H, N), (1, seq, R), (1, seq, H, V)]
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return [jax.random.normal(k, s, cfg.compute_dtype) for k, s in zip(keys, shapes)]


def core_step(cfg: model_config.MLAConfig, impl: model_config.AttentionImpl):
    acfg = dataclasses.replace(cfg.attention, impl=impl)
    scale = rope.softmax_scale(cfg)

    def loss(*a):
        return jnp.sum(attention.attend(acfg, *a, scale).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=range(5)))


def time_core(cfg, seqs, dense_max: int, rounds: int) -> list[dict]:
    rows = []
    impls = [model_config.AttentionImpl.DENSE, model_config.AttentionImpl.BLOCKWISE]
    for seq in seqs:
        args = core_inputs(cfg, seq)
        run = {i: core_step(cfg, i) for i in impls if i is not impls[0] or seq <= dense_max}
        for fn in run.values():
            jax.block_until_ready(fn(*args))  # compile + warm up
        times = {i: [] for i in run}
        for _ in range(rounds):
            for i, fn in run.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[i].append(time.perf_counter() - t0)
        med = {i.value: statistics.median(t) for i, t in times.items()}
        row = {"seq": seq, **{f"{k}_ms": round(v * 1e3, 1) for k, v in med.items()}}
        if "dense" in med:
            row["blockwise/dense"] = round(med["blockwise"] / med["dense"], 2)
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--seqs", default="2048,8192")
    p.add_argument("--batch", type=int, default=None, help="default: the config's batch")
    p.add_argument("--time-seqs", default="512,1024,2048,4096")
    p.add_argument("--dense-time-max", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    exp = config_lib.load(args.config)
    batch = args.batch or exp.train.global_batch_size
    seqs = [int(s) for s in args.seqs.split(",")]
    out = {
        "config": args.config,
        "backend": jax.default_backend(),
        "attention": dataclasses.asdict(exp.model.attention) | {"impl": "(both)"},
    }
    if not args.skip_memory:
        mem = [
            step_memory(exp, impl, batch, seq)
            for impl in model_config.AttentionImpl
            for seq in seqs
        ]
        out["step_memory"] = mem
        peak = {(m["impl"], m["seq"]): m["peak_GiB"] for m in mem}
        lo, hi = seqs[0], seqs[-1]
        for impl in model_config.AttentionImpl:
            out[f"{impl.value}_peak_ratio_{hi}/{lo}"] = round(
                peak[impl.value, hi] / peak[impl.value, lo], 2
            )
        out["goal_blockwise_ratio_max"] = round(1.2 * hi / lo, 2)
    mla = exp.model.mla()
    out["core_time_fwd_bwd"] = time_core(
        mla, [int(s) for s in args.time_seqs.split(",")], args.dense_time_max, args.rounds
    )
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
