"""python -m deepseek_jax.generate: batched absorbed-MLA decode with optional MTP speculation.

  python -m deepseek_jax.generate --checkpoint=<step dir | workdir | HF dir> [--step=N]
      (--prompt=TEXT | --prompts=FILE.jsonl | --prompt-tokens=FILE.npy) --max-new-tokens=N
      [--temperature=0] [--top-k=0] [--top-p=1] [--seed=0] [--eos-id=ID]
      [--speculative=none|mtp] [--draft-tokens=k] [--decode=absorbed|naive] [--steps-per-call=8]
      [--dtype=float32|bfloat16] [--cache-dtype=...] [--out=FILE.npy|FILE.jsonl] [--overwrite]

Text prompts go through the checkpoint's tokenizer (the byte tokenizer or the tokenizer.json of
its data config; tokenizer.json inside an HF directory). --prompts is JSONL with one {"prompt":
TEXT} per line; --prompt-tokens an int .npy [B, T] (every row T tokens). With one text prompt the
tokens stream to stdout as they are decoded, after every --steps-per-call decode steps (run in
one device call each; 1 streams every token but pays a dispatch per step). --out=FILE.npy
writes int32 [B, max_new_tokens] (-1 after a row stopped); --out=FILE.jsonl one {"tokens",
"text"} per row. A row stops at EOS (the tokenizer's, or --eos-id; -1 = none). The last line
is a summary: tokens/s, and the acceptance per draft position and mean accepted length of a
speculative run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

from deepseek_jax import errors
from deepseek_jax.convert import ckpt_io, from_hf, hf_config, outdir
from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.model import config as config_lib


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deepseek_jax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, type=pathlib.Path)
    p.add_argument("--step", type=int, default=None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts", type=pathlib.Path)
    src.add_argument("--prompt-tokens", type=pathlib.Path)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eos-id", type=int, default=None)
    p.add_argument("--speculative", choices=["none", "mtp"], default="none")
    p.add_argument("--draft-tokens", type=int, default=1)
    p.add_argument("--decode", choices=["absorbed", "naive"], default="absorbed")
    p.add_argument(
        "--steps-per-call",
        type=int,
        default=8,
        help="decode steps per device call (the text streams after each call; 1 = every step)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype (parameters stay float32)",
    )
    p.add_argument(
        "--cache-dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="KV cache dtype; default bfloat16 on an accelerator, float32 on CPU",
    )
    p.add_argument("--out", type=pathlib.Path, default=None)
    p.add_argument("--overwrite", action="store_true")
    return p


def fail(msg: str):
    raise ConversionError(msg)


def model_header(checkpoint: pathlib.Path, step: int | None):
    """(config, max positions, experiment config, HF dir or None) without reading any tensor."""
    if not checkpoint.exists():
        fail(f"--checkpoint: {checkpoint} does not exist")
    if (checkpoint / "config.json").is_file():
        src = from_hf.open_source(checkpoint)
        max_pos = src.hf.get("max_position_embeddings")
        return (
            src.cfg,
            int(max_pos or hf_config.to_hf_config(src.cfg)["max_position_embeddings"]),
            {},
            checkpoint,
        )
    step_dir = ckpt_io.resolve_step_dir(checkpoint, step)
    cfg = ckpt_io.model_config(step_dir)
    return (
        cfg,
        hf_config.to_hf_config(cfg)["max_position_embeddings"],
        ckpt_io.read_config(step_dir),
        None,
    )


def tokenizer_for(experiment: dict, hf_dir: pathlib.Path | None):
    from deepseek_jax.data import config as data_config
    from deepseek_jax.data import tokenizers

    if hf_dir is not None:
        path = hf_dir / "tokenizer.json"
        if not path.is_file():
            fail(f"{hf_dir}: no tokenizer.json for a text prompt (use --prompt-tokens)")
        return tokenizers.HFTokenizer(str(path))
    data = experiment.get("data") or {}
    return tokenizers.build_tokenizer(data_config.DataConfig.from_dict(data))


def read_prompts(args, tokenizer_fn):
    """(list of int arrays, tokenizer or None)."""
    if args.prompt_tokens is not None:
        try:
            arr = np.load(args.prompt_tokens, allow_pickle=False)
        except (OSError, ValueError) as e:
            fail(f"--prompt-tokens: {args.prompt_tokens}: cannot read as .npy ({e})")
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.shape[1] < 1:
            fail(
                f"--prompt-tokens: {args.prompt_tokens}: need an integer array [batch, time], "
                f"got {arr.dtype}{list(arr.shape)}"
            )
        try:  # only to decode the output text (and default the EOS id), if there is one
            tok = tokenizer_fn()
        except (ConversionError, ValueError):
            tok = None
        return [row.astype(np.int64) for row in arr], tok
    tok = tokenizer_fn()
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        texts = []
        try:
            lines = args.prompts.read_text().splitlines()
        except OSError as e:
            fail(f"--prompts: {e}")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["prompt"])
            except (ValueError, KeyError, TypeError):
                fail(
                    f"--prompts: {args.prompts} line {i + 1}: need a JSON object with a "
                    '"prompt" string'
                )
        if not texts:
            fail(f"--prompts: {args.prompts} has no prompts")
    encoded = [np.asarray(t, np.int64) for t in tok.encode_batch(texts)]
    for i, e in enumerate(encoded):
        if len(e) == 0:
            fail(f"prompt {i} encodes to no tokens")
    return encoded, tok


def run(args) -> int:
    import jax
    import jax.numpy as jnp

    from deepseek_jax.infer import generation, kv_cache, load, sampling

    # Flag values first, then the checkpoint header, the prompts, and only then the weights.
    try:
        scfg = sampling.SamplingConfig(args.temperature, args.top_k, args.top_p)
        generation.GenerateConfig(
            max_new_tokens=args.max_new_tokens, steps_per_call=args.steps_per_call
        )
    except ValueError as e:
        fail(str(e))
    if args.speculative == "mtp" and args.draft_tokens < 1:
        fail(f"--draft-tokens: must be >= 1 with --speculative=mtp, got {args.draft_tokens}")
    on_cpu = jax.default_backend() == "cpu"
    cache_dtype = jnp.dtype(args.cache_dtype or ("float32" if on_cpu else "bfloat16"))
    if args.out is not None:
        if args.out.suffix not in (".npy", ".jsonl"):
            fail(f"--out: {args.out} must end in .npy or .jsonl")
        outdir.check_target(args.out, args.overwrite)
    cfg, max_pos, experiment, hf_dir = model_header(args.checkpoint, args.step)
    if args.speculative == "mtp" and not cfg.mtp_depth:
        fail(f"--speculative=mtp: {args.checkpoint} has no MTP weights (mtp_depth 0)")
    prompts, tok = read_prompts(args, lambda: tokenizer_for(experiment, hf_dir))
    eos = args.eos_id if args.eos_id is not None else (tok.eos_id if tok else None)
    eos = None if eos is not None and eos < 0 else eos
    gcfg = generation.GenerateConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=scfg,
        eos_id=eos,
        mode=kv_cache.DecodeMode(args.decode),
        cache_dtype=cache_dtype,
        seed=args.seed,
        draft_tokens=args.draft_tokens if args.speculative == "mtp" else 0,
        steps_per_call=args.steps_per_call,
    )
    longest = max(len(p) for p in prompts)
    if longest > max_pos:
        fail(f"prompt of {longest} tokens is longer than the model's {max_pos} positions")
    lo, hi = min(int(p.min()) for p in prompts), max(int(p.max()) for p in prompts)
    if lo < 0 or hi >= cfg.vocab_size:
        fail(f"prompt token ids span [{lo}, {hi}], outside the vocabulary [0, {cfg.vocab_size})")

    cfg, arrays, _ = load.load(args.checkpoint, args.step, with_mtp=bool(gcfg.draft_tokens))
    cfg = dataclasses.replace(cfg, compute_dtype=config_lib.DType(args.dtype))
    graphdef, state = load.build(cfg, arrays)
    gen = generation.Generator(graphdef, state, gcfg)
    stream = tok is not None and len(prompts) == 1 and args.prompt is not None
    shown = [0]

    def on_step(tokens, count):
        if stream:
            n = int(count[0])
            sys.stdout.write(tok.decode(tokens[0, shown[0] : n]))
            sys.stdout.flush()
            shown[0] = n

    if stream:
        sys.stdout.write(args.prompt)
    result = gen.generate([p.astype(np.int32) for p in prompts], on_step=on_step)
    if stream:
        sys.stdout.write("\n")
    elif args.out is None:
        for row in result.tokens:
            ids = row[row >= 0]
            print(tok.decode(ids) if tok else " ".join(map(str, ids)))
    if args.out is not None:
        with outdir.atomic_path(args.out, args.overwrite) as tmp:
            if args.out.suffix == ".npy":
                with open(tmp, "wb") as f:
                    np.save(f, result.tokens.astype(np.int32))
            else:
                with open(tmp, "w") as f:
                    for row in result.tokens:
                        ids = [int(i) for i in row if i >= 0]
                        f.write(
                            json.dumps({"tokens": ids, "text": tok.decode(ids) if tok else None})
                            + "\n"
                        )
    line = (
        f"{result.generated} tokens in {result.prefill_s + result.decode_s:.2f}s: "
        f"{result.tokens_per_s:.1f} tokens/s ({len(prompts)} rows; prefill "
        f"{result.prefill_s * 1e3:.0f} ms, then {result.steps} decode steps at "
        f"{(result.generated - len(prompts)) / max(result.decode_s, 1e-9):.1f} tokens/s)"
    )
    if result.stats:
        rates = ", ".join(f"{r:.2f}" for r in result.stats["acceptance_per_position"])
        line += (
            f"; acceptance per draft position [{rates}], mean accepted length "
            f"{result.stats['mean_accepted_length']:.2f}"
        )
    print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except errors.UserError as e:  # ConversionError, DataError, ...: one line, exit status 2
        return errors.report(e)


if __name__ == "__main__":
    sys.exit(main())
