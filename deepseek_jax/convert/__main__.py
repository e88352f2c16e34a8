"""Checkpoint conversion between our orbax checkpoints and Hugging Face safetensors.

  python -m deepseek_jax.convert to-hf --checkpoint=<workdir or step dir> [--step=N] --out=<dir>
      [--dtype=bfloat16|float32] [--shard-size=5GB] [--no-mtp] [--overwrite]
  python -m deepseek_jax.convert from-hf --hf-dir=<dir> --out=<step dir> [--overwrite]
  python -m deepseek_jax.convert verify --checkpoint=<workdir or step dir> [--step=N]
      --hf-dir=<to-hf output> [--batch=2] [--seq-len=32] [--seed=0] [--atol=1e-4]

verify runs both models on seeded tokens (ours, and transformers on the export, float32) and
exits 1 if any logit differs by more than --atol.

Bad input (missing/extra tensors, wrong shapes or dtypes, corrupt files, unknown model types, an
existing output without --overwrite) prints one `error:` line naming the tensor or file and exits
with status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from deepseek_jax import errors


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deepseek_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-hf", help="our checkpoint -> Hugging Face safetensors directory")
    to.add_argument(
        "--checkpoint",
        required=True,
        type=pathlib.Path,
        help="a workdir (latest step under checkpoints/) or one step directory",
    )
    to.add_argument("--step", type=int, default=None, help="step to export from a workdir")
    to.add_argument("--out", required=True, type=pathlib.Path)
    to.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    to.add_argument("--shard-size", default="5GB", help="max bytes per shard (5GB, 500MB, 2GiB)")
    to.add_argument(
        "--no-mtp",
        action="store_true",
        help="leave out the MTP layers and write num_nextn_predict_layers=0",
    )
    to.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    frm = sub.add_parser("from-hf", help="Hugging Face / official checkpoint -> our checkpoint")
    frm.add_argument("--hf-dir", required=True, type=pathlib.Path)
    frm.add_argument(
        "--out",
        required=True,
        type=pathlib.Path,
        help="the step directory to create (state/ and config/ items, step 0)",
    )
    frm.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ver = sub.add_parser("verify", help="our checkpoint's logits vs transformers' on its export")
    ver.add_argument("--checkpoint", required=True, type=pathlib.Path)
    ver.add_argument("--step", type=int, default=None, help="step to check from a workdir")
    ver.add_argument("--hf-dir", required=True, type=pathlib.Path)
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--seq-len", type=int, default=32)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--atol", type=float, default=1e-4)
    return p


def _verify(args) -> int:
    from deepseek_jax.convert import verify

    r = verify.verify(
        args.checkpoint,
        args.hf_dir,
        step=args.step,
        batch=args.batch,
        seq_len=args.seq_len,
        seed=args.seed,
        atol=args.atol,
    )
    b, t, y = r.shape
    print(
        f"max |ours - transformers| = {r.max_abs_diff:.3g} over {b}x{t}x{y} logits "
        f"(max |logit| {r.max_abs_logit:.3g}; export dtype {r.export_dtype}; "
        f"--atol {r.atol:g}): {'ok' if r.ok else 'MISMATCH'}"
    )
    return 0 if r.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "verify":
            return _verify(args)
        if args.command == "to-hf":
            from deepseek_jax.convert import safetensors_io, to_hf

            names = to_hf.convert(
                args.checkpoint,
                args.out,
                step=args.step,
                dtype=to_hf.ExportDType(args.dtype),
                shard_size=safetensors_io.parse_size(args.shard_size),
                with_mtp=not args.no_mtp,
                overwrite=args.overwrite,
            )
            print(
                f"wrote {args.out}: config.json + {len(names)} shard(s) "
                f"({time.perf_counter() - start:.1f}s)"
            )
        else:
            from deepseek_jax.convert import from_hf

            src = from_hf.convert(args.hf_dir, args.out, overwrite=args.overwrite)
            print(
                f"wrote {args.out}: {len(src.specs)} HF tensors -> step 0 "
                f"(mtp_depth={src.cfg.mtp_depth}) ({time.perf_counter() - start:.1f}s)"
            )
    except errors.UserError as e:
        return errors.report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
