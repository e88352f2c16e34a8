"""Decode throughput: naive vs absorbed MLA, ours vs transformers, MTP speculative vs plain.

    python bench/decode.py --config=configs/small.py [--contexts=512,2048,8192] [--batches=1,8]
        [--dtypes=float32,bfloat16] [--steps=8] [--hf-context=2048] [--hf-tokens=32]
        [--spec-checkpoint=runs/smoke] [--spec-tokens=128] [--spec-reps=3] [--parts=cache,hf,spec]
        [--json=FILE] [--expert-tokens=1,2,4]
        [--set model.d_model=1024 ...]

1. cache: tokens/s of one decode step (batch B at context T) for the naive full per-head cache and
   the absorbed latent cache, side by side in one process, with the cache bytes measured from the
   allocated arrays next to the formula. The cache is filled with random entries and its length
   set to T (a decode step's cost does not depend on the values), so no 8k-token prefill is run.
2. hf: our greedy generation vs transformers `generate(do_sample=False)` on the same model
   (random weights, exported with to-hf), batch 1, one prompt of --hf-context tokens: per-token
   decode time excluding the prefill (HF: time(1 + n tokens) - time(1 token), over n).
3. spec: MTP speculative (k = 1, 2, 3) vs plain greedy at batch 1 on a trained checkpoint (the
   smoke model): acceptance per draft position, mean accepted length, end-to-end speedup.
4. experts (not in the default parts): one routed-expert layer at decode sizes (X = 1, 2, 4
   tokens, the config's expert shape), in a device loop whose expert choices depend on the
   previous output (so nothing is constant-folded): the shipped flat-index gather
   (`infer.experts.gathered_experts`), the same gather indexed [X, k], and the dropless dispatch.
Results print as a table and optionally as JSON; BENCHMARKS.md has the numbers and commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax import config as exp_config
from deepseek_jax.infer import decode, experts, generation, kv_cache, load, sampling
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import dispatch, transformer

Mode = kv_cache.DecodeMode


def random_model(cfg, seed=0):
    return nnx.split(transformer.Transformer(cfg, rngs=nnx.Rngs(seed)))


def filled_cache(cfg, B, T, mode, dtype, key):
    cache = kv_cache.init(cfg, B, T + 1, mode, dtype)
    leaves, treedef = jax.tree.flatten(cache.stacks)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype) for k, a in zip(keys, leaves)
    ]
    return kv_cache.Cache(jax.tree.unflatten(treedef, leaves), jnp.full((B,), T, jnp.int32))


def time_decode(graphdef, state, cfg, B, T, mode, dtype, steps):
    def step(s, tok, c):
        logits, _, c = decode.forward(nnx.merge(graphdef, s), tok, c)
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32)[:, None], c

    cache = filled_cache(cfg, B, T, mode, dtype, jax.random.key(1))
    nbytes = kv_cache.nbytes(cache)
    tok = jnp.zeros((B, 1), jnp.int32)
    step = jax.jit(step, donate_argnums=2)
    tok, cache = step(state, tok, cache)  # compile + warm
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    for _ in range(steps):  # the length stays T: every step costs a context of T
        tok, cache = step(state, tok, cache)
    jax.block_until_ready(tok)
    dt = (time.perf_counter() - t0) / steps
    return B / dt, nbytes // (B * (T + 1))


def part_cache(exp, args, out):
    for dtype_name in args.dtypes:
        d = config_lib.DType(dtype_name)
        cfg = dataclasses.replace(exp.model, compute_dtype=d)
        graphdef, state = random_model(cfg)
        for T in args.contexts:
            for B in args.batches:
                row = {"dtype": dtype_name, "context": T, "batch": B}
                for mode in Mode:
                    tps, per_tok = time_decode(graphdef, state, cfg, B, T, mode, d.jnp, args.steps)
                    row[f"{mode.value}_tokens_per_s"] = tps
                    row[f"{mode.value}_cache_bytes_per_token"] = per_tok
                    row[f"{mode.value}_formula"] = kv_cache.bytes_per_token(cfg, mode, d.jnp)
                row["absorbed_over_naive"] = (
                    row["absorbed_tokens_per_s"] / row["naive_tokens_per_s"]
                )
                out.setdefault("cache", []).append(row)
                print(
                    f"{dtype_name:8s} T={T:5d} B={B}: naive {row['naive_tokens_per_s']:8.1f} "
                    f"tok/s ({row['naive_cache_bytes_per_token']} B/token), absorbed "
                    f"{row['absorbed_tokens_per_s']:8.1f} tok/s "
                    f"({row['absorbed_cache_bytes_per_token']} B/token): "
                    f"x{row['absorbed_over_naive']:.2f}",
                    flush=True,
                )


def save_checkpoint(cfg, graphdef, state, step_dir):
    from deepseek_jax.convert import ckpt_io
    from deepseek_jax.model import layers, tree

    model = nnx.merge(graphdef, state)
    _, params, bias = nnx.split(model, nnx.Param, layers.ExpertBias)
    arrays = {
        k: {p: np.asarray(a) for p, a in tree.arrays(s).items()}
        for k, s in (("params", params), ("expert_bias", bias))
    }
    ckpt_io.write_step(
        step_dir,
        {"model": cfg.to_dict()},
        ckpt_io.nest(arrays["params"]),
        ckpt_io.nest(arrays["expert_bias"]),
    )


def part_hf(exp, args, out):
    import torch
    import transformers

    from deepseek_jax.convert import to_hf

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = dataclasses.replace(exp.model, mtp_depth=0)
    graphdef, state = random_model(cfg, seed=3)
    n = args.hf_tokens
    prompt = (np.arange(args.hf_context) * 31 % cfg.vocab_size).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        save_checkpoint(cfg, graphdef, state, tmp / "step")
        to_hf.convert(tmp / "step", tmp / "hf", dtype=to_hf.ExportDType.FLOAT32, with_mtp=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
        hf.eval()
        hf.generation_config.eos_token_id = None
        ids = torch.as_tensor(prompt[None], dtype=torch.long)

        def hf_gen(m):
            t0 = time.perf_counter()
            with torch.no_grad():
                o = hf.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=m,
                    min_new_tokens=m,
                    pad_token_id=0,
                )
            return time.perf_counter() - t0, o[0, len(prompt) :].numpy()

        hf_gen(2)  # warm-up
        t1, _ = hf_gen(1)
        tn, hf_tokens = hf_gen(1 + n)
        hf_tps = n / (tn - t1)
    gen = generation.Generator(graphdef, state, generation.GenerateConfig(max_new_tokens=1 + n))
    gen.generate([prompt])  # compile
    res = gen.generate([prompt])
    ours_tps = res.steps / res.decode_s
    row = {
        "context": args.hf_context,
        "new_tokens": n,
        "ours_tokens_per_s": ours_tps,
        "hf_tokens_per_s": hf_tps,
        "ours_over_hf": ours_tps / hf_tps,
        "same_tokens": bool((res.tokens[0] == hf_tokens).all()),
        "ours_prefill_s": res.prefill_s,
    }
    out["hf"] = row
    print(
        f"greedy batch 1 at context {args.hf_context}: ours {ours_tps:.1f} tok/s, "
        f"transformers {hf_tps:.1f} tok/s: x{row['ours_over_hf']:.2f}; same tokens: "
        f"{row['same_tokens']}",
        flush=True,
    )


def part_spec(exp, args, out):
    cfg, arrays, experiment = load.load(args.spec_checkpoint)
    graphdef, state = load.build(cfg, arrays)
    from deepseek_jax.data import config as data_config
    from deepseek_jax.data import tokenizers

    tok = tokenizers.build_tokenizer(data_config.DataConfig.from_dict(experiment.get("data", {})))
    texts = [
        "import os\nimport sys\n\n\ndef main(",
        "class Queue:\n    def __init__(self",
        "    for i in range(len(",
        "# Copyright 2001 Python Software Foundation\n",
    ]
    rows = []
    for temperature in args.spec_temperatures:
        scfg = sampling.SamplingConfig(temperature=temperature)
        gens = {
            k: generation.Generator(
                graphdef,
                state,
                generation.GenerateConfig(
                    max_new_tokens=args.spec_tokens,
                    draft_tokens=k,
                    sampling=scfg,
                    steps_per_call=args.steps_per_call or args.spec_tokens,
                ),
            )
            for k in range(4)
        }
        gens["host"] = generation.Generator(  # plain, one step per call: the host-loop cost
            graphdef,
            state,
            generation.GenerateConfig(
                max_new_tokens=args.spec_tokens, sampling=scfg, steps_per_call=1
            ),
        )
        for text in texts:
            prompt = tok.encode(text)
            res = {}
            for k, g in gens.items():
                g.generate([prompt])  # compile (once per generator and prompt length)
                res[k] = [g.generate([prompt]) for _ in range(args.spec_reps)]
            plain_s = np.median([r.decode_s / r.steps for r in res[0]])  # per emitted token
            host_s = np.median([r.decode_s / r.steps for r in res["host"]])
            for k in (1, 2, 3):
                r = res[k][0]
                spec_s = np.median([x.decode_s / (x.generated - 1) for x in res[k]])
                rows.append(
                    {
                        "prompt": text,
                        "temperature": temperature,
                        "k": k,
                        "speedup": plain_s / spec_s,
                        "same_as_plain": bool((r.tokens == res[0][0].tokens).all()),
                        "plain_tokens_per_s": 1 / plain_s,
                        "plain_one_step_per_call_tokens_per_s": 1 / host_s,
                        "spec_tokens_per_s": 1 / spec_s,
                        **r.stats,
                    }
                )
    out["spec"] = rows
    for temperature in args.spec_temperatures:
        for k in (1, 2, 3):
            sel = [r for r in rows if r["k"] == k and r["temperature"] == temperature]
            acc = np.mean([r["acceptance_per_position"] for r in sel], axis=0)
            length = np.mean([r["mean_accepted_length"] for r in sel])
            speed = np.mean([r["speedup"] for r in sel])
            tps = np.mean([r["spec_tokens_per_s"] for r in sel])
            plain = np.mean([r["plain_tokens_per_s"] for r in sel])
            host = np.mean([r["plain_one_step_per_call_tokens_per_s"] for r in sel])
            same = all(r["same_as_plain"] for r in sel)
            print(
                f"MTP T={temperature} k={k}: acceptance per position "
                f"{np.round(acc, 3).tolist()}, mean accepted length {length:.2f} "
                f"(1+a = {1 + acc[0]:.2f}), {tps:.0f} vs plain {plain:.0f} tokens/s: "
                f"speedup x{speed:.2f} (plain at one step per call: {host:.0f} tokens/s)"
                + (f", same tokens as plain: {same}" if temperature == 0 else ""),
                flush=True,
            )


def _gathered_2d_index(x_XD, idx_Xk, weights_Xk, w1_EDF, w3_EDF, w2_EFD):
    """The gathered experts indexed [X, k] (what infer.experts did before the flat index)."""
    gate = jnp.einsum("xd,xkdf->xkf", x_XD, jnp.take(w1_EDF, idx_Xk, axis=0))
    up = jnp.einsum("xd,xkdf->xkf", x_XD, jnp.take(w3_EDF, idx_Xk, axis=0))
    y_XkD = jnp.einsum("xkf,xkfd->xkd", jax.nn.silu(gate) * up, jnp.take(w2_EFD, idx_Xk, axis=0))
    return dispatch.combine(y_XkD, weights_Xk, x_XD.dtype)


def part_experts(exp, args, out):
    cfg = exp.model
    E, D, k = cfg.n_routed_experts, cfg.d_model, cfg.num_experts_per_tok
    F = cfg.moe_intermediate_size
    keys = jax.random.split(jax.random.key(0), 4)
    w1, w3 = (jax.random.normal(kk, (E, D, F)) * D**-0.5 for kk in keys[:2])
    w2 = jax.random.normal(keys[2], (E, F, D)) * F**-0.5
    variants = {
        "gathered_flat": experts.gathered_experts,
        "gathered_2d_index": _gathered_2d_index,
        "dropless": dispatch.dropless_experts,
    }
    n = 500
    for X in args.expert_tokens:
        x0 = jax.random.normal(keys[3], (X, D))
        row = {"tokens": X, "experts": E, "top_k": k, "d_model": D, "d_expert": F}
        ref = None
        for name, fn in variants.items():

            def loop(x, fn=fn):
                def body(i, x):
                    # choices from the running activations: a dynamic index, as in decode
                    idx = jax.lax.top_k(x[:, :E], k)[1].astype(jnp.int32)
                    return x + 0.1 * fn(x, idx, jnp.full((x.shape[0], k), 1.0 / k), w1, w3, w2)

                return jax.lax.fori_loop(0, n, body, x)

            run = jax.jit(loop)
            y = jax.block_until_ready(run(x0))
            ref = y if ref is None else ref
            np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(run(x0))
                times.append((time.perf_counter() - t0) / n * 1e6)
            row[f"{name}_us"] = float(np.median(times))
        out.setdefault("experts", []).append(row)
        print(
            f"experts X={X} (E={E} k={k} D={D} F={F}): "
            + ", ".join(f"{name} {row[f'{name}_us']:.1f} us" for name in variants),
            flush=True,
        )


def part_verify(exp, args, out):
    cfg, arrays, _ = load.load(args.spec_checkpoint)
    graphdef, state = load.build(cfg, arrays)
    B, T, start, n = 1, 512, 32, args.verify_steps
    Y = cfg.vocab_size

    def program(W, with_mtp):
        def run(params, steps):
            model = nnx.merge(graphdef, params)
            mode = kv_cache.DecodeMode.ABSORBED
            length = jnp.full((B,), start, jnp.int32)
            cache = kv_cache.init(model.cfg, B, T, mode, jnp.float32).with_length(length)
            mtp = kv_cache.init_mtp(model.cfg, B, T, mode, jnp.float32).with_length(length)

            def body(i, c):
                tok_B, cache, mtp = c
                toks_BW = (tok_B[:, None] + jnp.arange(W)[None]) % Y
                logits, h_BWD, cache = decode.forward(model, toks_BW, cache)
                nxt_B = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
                if with_mtp:
                    m_logits, _, mtp = decode.mtp_forward(model, toks_BW, h_BWD, mtp)
                    nxt_B = (nxt_B + jnp.argmax(m_logits[:, -1], -1).astype(jnp.int32)) % Y
                    mtp = mtp.with_length(mtp.length_B + 1)
                # one position per step, so every step attends to about the same context
                return nxt_B, cache.with_length(cache.length_B + 1), mtp

            return jax.lax.fori_loop(0, steps, body, (jnp.zeros((B,), jnp.int32), cache, mtp))[0]

        return jax.jit(run).lower(state, np.int32(0)).compile()

    keys = [(W, m) for W in (1, 2, 3, 4) for m in (False, True)]
    progs = {key: program(*key) for key in keys}
    times = {key: [] for key in keys}
    for _ in range(args.verify_rounds):  # alternating, so drift hits every variant alike
        for key in keys:
            t0 = time.perf_counter()
            jax.block_until_ready(progs[key](state, np.int32(n)))
            times[key].append((time.perf_counter() - t0) / n * 1e3)
    med = {key: float(np.median(v)) for key, v in times.items()}
    rows = [
        {"tokens": W, "mtp": m, "ms_per_step": med[W, m], "x_plain": med[W, m] / med[1, False]}
        for W, m in keys
    ]
    out["verify"] = rows
    for r in rows:
        what = "main + MTP" if r["mtp"] else "main"
        print(
            f"verify W={r['tokens']} {what}: {r['ms_per_step']:.4f} ms/step, "
            f"x{r['x_plain']:.2f} the plain step",
            flush=True,
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hf-context", type=int, default=2048)
    p.add_argument("--hf-tokens", type=int, default=32)
    p.add_argument("--spec-checkpoint", default="runs/smoke")
    p.add_argument("--spec-tokens", type=int, default=128)
    p.add_argument("--spec-temperatures", default="0,0.8")
    p.add_argument("--spec-reps", type=int, default=3, help="timed runs per prompt (median)")
    p.add_argument(
        "--steps-per-call",
        type=int,
        default=0,
        help="spec part: decode steps per device call (0: the whole generation in one call)",
    )
    p.add_argument("--parts", default="cache,hf,spec")
    p.add_argument("--expert-tokens", default="1,2,4", help="experts part: tokens per step")
    p.add_argument("--verify-steps", type=int, default=200, help="verify part: steps per call")
    p.add_argument("--verify-rounds", type=int, default=7, help="verify part: timed calls each")
    p.add_argument("--json", default=None)
    p.add_argument("--set", action="append", default=[], help="config override a.b=value")
    args = p.parse_args()
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    args.expert_tokens = [int(x) for x in args.expert_tokens.split(",")]
    args.spec_temperatures = [float(x) for x in args.spec_temperatures.split(",")]
    exp = exp_config.load(args.config, exp_config.parse_overrides(args.set))
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    out: dict = {"config": args.config, "backend": jax.default_backend()}
    parts = args.parts.split(",")
    if "cache" in parts:
        part_cache(exp, args, out)
    if "hf" in parts:
        part_hf(exp, args, out)
    if "spec" in parts:
        part_spec(exp, args, out)
    if "experts" in parts:
        part_experts(exp, args, out)
    if "verify" in parts:
        part_verify(exp, args, out)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
