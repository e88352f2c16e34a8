"""Our jitted train step against the transformers DeepseekV3ForCausalLM training step, side by side.

    python bench/vs_torch.py [--variant=tiny|moe-heavy] [--rounds=3] [--steps=5] [--threads=N]
        [--set model.field=value ...]

The shape is configs/bench_tiny.py (the MaxText-tiny DeepSeek-V3 shape, MTP off, seq 256 x batch
4, float32); `--variant=moe-heavy` makes it vocab 258, 32 routed experts top-4, moe_intermediate 64.
Both frameworks train the same model config on the same token batch with the same objective
(mean next-token CE), AdamW (same betas, eps, weight decay off the norm weights) and global-norm
clipping. Torch runs eager, `attn_implementation="sdpa"`, transformers' default experts kernel
(printed). Our step also does the aux-loss-free bias update, as in training.

Rounds alternate ours, torch, ours, torch, ... and each run is its own subprocess (the two
runtimes never share a process, so neither's thread pool disturbs the other). Both get the same
thread count (`--threads`, default all cores): each worker is pinned to the first N cores
(sched_setaffinity, before either runtime starts; XLA:CPU sizes its pool from the affinity mask)
and torch.set_num_threads(N). A run compiles/warms up with
two steps, then times `--steps` steps; a round's number is the median step time of its run, and
the result is the median over rounds. The last line is JSON for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "bench_tiny.py"
VARIANTS = {
    "tiny": {},
    "moe-heavy": {
        "model.vocab_size": 258,
        "model.n_routed_experts": 32,
        "model.num_experts_per_tok": 4,
        "model.moe_intermediate_size": 64,
    },
}
WARMUP = 2

sys.path.insert(0, str(ROOT / "bench"))
import torch_profile  # noqa: E402  (bench/, next to this script)


def experiment(variant: str, sets: list[str]):
    sys.path.insert(0, str(ROOT))
    from deepseek_jax import config as config_lib

    overrides = dict(VARIANTS[variant])
    overrides.update(config_lib.parse_overrides(sets))
    return config_lib.load(str(CONFIG), overrides)


def batch_arrays(exp, seed: int = 0):
    import numpy as np

    t = exp.train
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, exp.model.vocab_size, (t.global_batch_size, t.seq_len + 1))
    return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)


def timed(step, steps: int) -> list[float]:
    times = []
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        step()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return times


def jax_breakdown(exp, steps: int) -> dict:
    sys.argv = sys.argv[:1]
    import train_step  # bench/ is this script's directory

    return train_step.breakdown(exp, steps)


def run_jax(exp, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from deepseek_jax.batch import Batch
    from deepseek_jax.train import optim
    from deepseek_jax.train import state as state_lib
    from deepseek_jax.train import step as step_lib

    inputs, targets = batch_arrays(exp)
    batch = Batch(
        inputs=jnp.asarray(inputs),
        targets=jnp.asarray(targets),
        loss_mask=jnp.ones(inputs.shape, jnp.float32),
        target_bytes=jnp.ones(inputs.shape, jnp.int32),
    )
    tx = optim.optimizer(exp.train)
    graphdef, _, _ = state_lib.abstract_model(exp.model)
    fn = jax.jit(step_lib.make_train_step(graphdef, exp.train, tx), donate_argnums=0)
    holder = {"state": state_lib.init_state(exp.model, tx, 0)}
    losses = []

    def step():
        holder["state"], metrics = fn(holder["state"], batch)
        losses.append(float(metrics["lm_loss"]))  # blocks until the step is done

    return {"step_s": timed(step, steps), "first_loss": losses[0], "backend": jax.default_backend()}


def hf_model(exp):
    import torch
    import transformers

    from deepseek_jax.convert import hf_config

    d = hf_config.to_hf_config(exp.model)
    d["num_nextn_predict_layers"] = 0
    d["use_cache"] = False
    hf_cfg = transformers.DeepseekV3Config(
        **{k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM._from_config(
        hf_cfg, attn_implementation="sdpa", dtype=torch.float32
    )
    model.train()
    return model


def run_torch(exp, steps: int, threads: int, profile: bool = False) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    t = exp.train
    model = hf_model(exp)
    if profile:
        torch_profile.instrument(model)

    def scope(cat):
        return torch.profiler.record_function(f"cat:{cat}") if profile else contextlib.nullcontext()

    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # norm weights, as ours
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.b1, t.b2),
        eps=t.eps,
    )
    inputs, targets = (torch.as_tensor(a, dtype=torch.long) for a in batch_arrays(exp))
    losses = []

    def step():
        logits = model(input_ids=inputs).logits
        with scope("head + CE"):
            flat = logits.float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(flat, targets.reshape(-1))
        loss.backward()
        with scope("optimizer (clip + AdamW)"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss))

    if profile:
        timed(step, 0)  # warm
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        wall = time.perf_counter() - t0
        ms = torch_profile.breakdown(prof.events(), steps)
        return {"ms_per_step": ms, "wall_ms_per_step": 1e3 * wall / steps}

    return {
        "step_s": timed(step, steps),
        "first_loss": losses[0],
        "experts_implementation": model.config._experts_implementation,
        "attn_implementation": model.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
    }


def worker(args) -> None:
    os.sched_setaffinity(0, range(args.threads))
    exp = experiment(args.variant, args.set)
    if args.worker == "jax":
        out = jax_breakdown(exp, args.steps) if args.breakdown else run_jax(exp, args.steps)
    else:
        out = run_torch(exp, args.steps, args.threads, profile=args.breakdown)
    print("RESULT " + json.dumps(out), flush=True)


def spawn(framework: str, args) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # one CPU device, whatever the caller simulates
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, f"--worker={framework}", f"--variant={args.variant}"]
    cmd += [f"--steps={args.steps}", f"--threads={args.threads}"]
    cmd += [f"--set={s}" for s in args.set] + (["--breakdown"] if args.breakdown else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{framework} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def print_breakdowns(args) -> None:
    """One profiled run of each (after warm-up): ms per step by part, ours, torch, ratio."""
    import step_profile

    res = {fw: spawn(fw, args) for fw in ("jax", "torch")}
    print(f"{'part (ms per step)':30s} {'ours':>9s} {'torch':>9s} {'ours/torch':>10s}")
    rows = {}
    for cat in step_profile.CATEGORIES:
        ours, theirs = (
            res["jax"]["ms_per_step"].get(cat, 0.0),
            res["torch"]["ms_per_step"].get(cat, 0.0),
        )
        rows[cat] = {"ours_ms": round(ours, 1), "torch_ms": round(theirs, 1)}
        ratio = f"{ours / theirs:10.2f}" if theirs > 0 else f"{'-':>10s}"
        print(f"{cat:30s} {ours:9.1f} {theirs:9.1f} {ratio}")
    sums = {fw: sum(r["ms_per_step"].values()) for fw, r in res.items()}
    walls = {fw: r["wall_ms_per_step"] for fw, r in res.items()}
    print(f"{'sum of op times':30s} {sums['jax']:9.1f} {sums['torch']:9.1f}")
    print(f"{'step wall (profiled)':30s} {walls['jax']:9.1f} {walls['torch']:9.1f}")
    out = {
        "bench": "vs_torch_breakdown",
        "variant": args.variant,
        "overrides": args.set,
        "rows": rows,
        "op_sum_ms": {k: round(v, 1) for k, v in sums.items()},
        "wall_ms": {k: round(v, 1) for k, v in walls.items()},
        "jax_top_other_ms": {
            k: round(v, 1) for k, v in res["jax"].get("top_other_ms_per_step", {}).items()
        },
    }
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=sorted(VARIANTS), default="tiny")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--set", action="append", default=[], help="model.x=value override (both)")
    p.add_argument("--breakdown", action="store_true", help="profile both, print ms by part")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.breakdown:
        return print_breakdowns(args)

    exp = experiment(args.variant, args.set)
    tokens = exp.train.global_batch_size * exp.train.seq_len
    rounds = {"jax": [], "torch": []}
    info = {}
    for r in range(args.rounds):
        for fw in ("jax", "torch"):
            res = spawn(fw, args)
            med = statistics.median(res["step_s"])
            rounds[fw].append(med)
            info[fw] = res
            print(
                f"round {r + 1} {fw:5s}: median {med:.3f} s/step "
                f"({tokens / med:.0f} tokens/s; steps {[round(s, 3) for s in res['step_s']]}; "
                f"first loss {res['first_loss']:.4f})",
                flush=True,
            )
    med = {fw: statistics.median(v) for fw, v in rounds.items()}
    ratio = med["torch"] / med["jax"]  # = tokens/s ours / tokens/s torch
    print(
        f"{args.variant}: ours {med['jax']:.3f} s/step ({tokens / med['jax']:.0f} tokens/s), "
        f"torch {med['torch']:.3f} s/step ({tokens / med['torch']:.0f} tokens/s), "
        f"ours/torch tokens/s = {ratio:.2f}x"
    )
    out = {
        "bench": "vs_torch",
        "variant": args.variant,
        "overrides": args.set,
        "tokens_per_step": tokens,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "jax_step_s_by_round": [round(x, 4) for x in rounds["jax"]],
        "torch_step_s_by_round": [round(x, 4) for x in rounds["torch"]],
        "jax_step_s": round(med["jax"], 4),
        "torch_step_s": round(med["torch"], 4),
        "jax_tokens_per_s": round(tokens / med["jax"], 1),
        "torch_tokens_per_s": round(tokens / med["torch"], 1),
        "ratio_tokens_per_s": round(ratio, 3),
        "torch_experts_implementation": info["torch"]["experts_implementation"],
        "torch_attn_implementation": info["torch"]["attn_implementation"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
