"""Forward pass over a token file: writes the logits and prints the mean next-token NLL.

  python -m deepseek_jax.score --checkpoint=<step dir, workdir, or HF dir> [--step=N]
      --tokens=<file.npy int [B, T]> --out=<logits.npy> [--dtype=float32|bfloat16] [--overwrite]

The checkpoint is one of our step directories (or a workdir: its latest step) or a Hugging Face /
official directory read directly (FP8 dequantised as in from-hf); the library is
deepseek_jax/infer/score.py.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from deepseek_jax import errors
from deepseek_jax.infer import score as score_lib
from deepseek_jax.model import config as config_lib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deepseek_jax.score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, type=pathlib.Path)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--tokens", required=True, type=pathlib.Path)
    p.add_argument("--out", required=True, type=pathlib.Path)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype (parameters stay float32)",
    )
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        nll = score_lib.score(
            args.checkpoint,
            args.tokens,
            args.out,
            step=args.step,
            dtype=config_lib.DType(args.dtype),
            overwrite=args.overwrite,
        )
    except errors.UserError as e:
        return errors.report(e)
    print(f"mean next-token NLL: {nll:.6f} (perplexity {np.exp(nll):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
