"""The official DeepSeek FP8 weight format: float8_e4m3fn values with 128x128 block scales.

A quantised weight W [M, N] is stored as q (F8_E4M3) plus `<name>_scale_inv` (float32) of shape
[ceil(M/b), ceil(N/b)], b = 128, and W[i, j] = float32(q[i, j]) * s[i // b, j // b]. Edge blocks
are partial (e.g. kv_a_proj_with_mqa is [576, 7168] with scales [5, 56]): quantisation zero-pads
to b and drops the padding, so dequantisation simply uses the block index of each element.
We dequantise ourselves because transformers 5.24 derives the block size as rows // scale_rows on
CPU, which is wrong for 576 rows (reference §4). The product is one float32 multiply, the same
operation as the official `weight_dequant` kernel, so results match it bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from deepseek_jax.convert.errors import ConversionError

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = 448.0
DEFAULT_BLOCK = 128
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: int = DEFAULT_BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return math.ceil(rows / block), math.ceil(cols / block)


def block_size(hf_config: Mapping[str, Any]) -> int | None:
    """Block size from config.json's quantization_config; None for an unquantised checkpoint."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    method, fmt = q.get("quant_method"), q.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise ConversionError(
            f"config.json: unsupported quantization_config (quant_method "
            f"{method!r}, fmt {fmt!r}); only the official fp8/e4m3 is read"
        )
    bs = q.get("weight_block_size", [DEFAULT_BLOCK, DEFAULT_BLOCK])
    if len(bs) != 2 or bs[0] != bs[1] or int(bs[0]) <= 0:
        raise ConversionError(
            f"config.json: unsupported weight_block_size {bs} (square blocks only)"
        )
    return int(bs[0])


def dequantize(q: np.ndarray, scale_inv: np.ndarray, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """float32 W = q * s per block. Works block-row by block-row so no [M, N] scale is built."""
    rows, cols = q.shape
    out = q.astype(np.float32)
    s = scale_inv.astype(np.float32, copy=False)
    for i in range(s.shape[0]):
        s_row = np.repeat(s[i], block)[:cols]
        out[i * block : (i + 1) * block] *= s_row[None, :]
    return out


def quantize(w: np.ndarray, block: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(q e4m3, scale_inv float32): per block s = amax / 448, q = e4m3(w / s).

    Used to build FP8 test and benchmark checkpoints; all-zero blocks get s = 1 (q = 0).
    """
    rows, cols = w.shape
    gr, gc = scale_shape(w.shape, block)
    w32 = w.astype(np.float32)
    padded = np.zeros((gr * block, gc * block), np.float32)
    padded[:rows, :cols] = w32
    blocks = padded.reshape(gr, block, gc, block)
    amax = np.abs(blocks).max(axis=(1, 3))
    s = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
    q = (blocks / s[:, None, :, None]).astype(E4M3)
    return q.reshape(gr * block, gc * block)[:rows, :cols].copy(), s
