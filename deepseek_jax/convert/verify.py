"""Checks an export: our checkpoint's logits against transformers' on the exported directory.

`python -m deepseek_jax.convert verify --checkpoint=<ours> --hf-dir=<to-hf output>` draws seeded
token ids, runs our model (float32 compute, no MTP) and `AutoModelForCausalLM` from the directory
(float32, eager attention: the reference numerics), and compares every logit. An export written
with `--dtype=bfloat16` has rounded weights, so its logits differ by ~1e-2; export with
`--dtype=float32` to check the mapping itself to 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.model import config as config_lib


@dataclasses.dataclass(frozen=True)
class Result:
    max_abs_diff: float  # max |ours - transformers| over every logit
    max_abs_logit: float  # the logits' scale, for reading the difference
    shape: tuple[int, int, int]  # [B, T, vocab]
    export_dtype: str  # what the export's config.json says its tensors are
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol


def _export_dtype(hf_dir: pathlib.Path) -> str:
    config = hf_dir / "config.json"
    if not config.is_file():
        raise ConversionError(f"--hf-dir: {hf_dir} has no config.json (a to-hf output has one)")
    d = json.loads(config.read_text())
    return str(d.get("torch_dtype") or d.get("dtype") or "unknown")


def _transformers_logits(hf_dir: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConversionError(
            f"verify needs torch and transformers (pip install -e '.[torch]'): {e}"
        ) from None
    transformers.logging.set_verbosity_error()  # its load report lists our MTP layers
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long))
    return out.logits.float().numpy()


def verify(
    checkpoint: pathlib.Path,
    hf_dir: pathlib.Path,
    *,
    step: int | None = None,
    batch: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    atol: float = 1e-4,
) -> Result:
    from deepseek_jax.infer import score

    checkpoint, hf_dir = pathlib.Path(checkpoint), pathlib.Path(hf_dir)
    if (checkpoint / "config.json").is_file():
        raise ConversionError(
            f"--checkpoint: {checkpoint} is a Hugging Face directory; give our checkpoint (a "
            "workdir or step directory) and the export as --hf-dir"
        )
    if batch < 1 or seq_len < 2:
        raise ConversionError(f"--batch >= 1 and --seq-len >= 2, got {batch} and {seq_len}")
    if not atol > 0:
        raise ConversionError(f"--atol: must be > 0, got {atol}")
    export_dtype = _export_dtype(hf_dir)
    cfg, arrays = score.load(checkpoint, step)
    cfg = dataclasses.replace(cfg, compute_dtype=config_lib.DType.FLOAT32)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))
    ours, _ = score.forward(cfg, arrays, tokens.astype(np.int32))
    theirs = _transformers_logits(hf_dir, tokens)
    if theirs.shape != ours.shape:
        raise ConversionError(
            f"--hf-dir: {hf_dir} gives logits {list(theirs.shape)}, ours are {list(ours.shape)}: "
            "not an export of this checkpoint"
        )
    return Result(
        max_abs_diff=float(np.max(np.abs(ours - theirs))),
        max_abs_logit=float(np.max(np.abs(ours))),
        shape=tuple(ours.shape),
        export_dtype=export_dtype,
        atol=atol,
    )
