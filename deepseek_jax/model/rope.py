"""Rotary position embedding on interleaved pairs, with YaRN.

The official checkpoints store the rope dims as interleaved pairs (2i, 2i+1) (a complex number per
pair), so we rotate pairs in place and never permute rows. YaRN follows
hf_checkpoint_format.md §2.3-2.4: blended inverse frequencies between floor/ceil correction dims, a
cos/sin factor mscale(s, mscale)/mscale(s, mscale_all_dim), and a softmax-scale correction
mscale(s, mscale_all_dim)^2 applied in attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import config as config_lib


def _correction_dim(n_rot: float, dim: int, base: float, orig_len: int) -> float:
    return dim * math.log(orig_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: config_lib.RopeConfig, dim: int) -> np.ndarray:
    """Per-pair inverse frequencies, float32 [dim/2]."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(cfg.theta) ** exponent
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if cfg.scaling is config_lib.RopeScaling.NONE:
        return inv_freq
    low = math.floor(_correction_dim(cfg.beta_fast, dim, cfg.theta, cfg.original_max_position))
    high = math.ceil(_correction_dim(cfg.beta_slow, dim, cfg.theta, cfg.original_max_position))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # 1: keep the original frequency (high-frequency pairs)
    interp = (np.float32(1.0) / (np.float32(cfg.factor) * pos_freqs)).astype(np.float32)
    return (interp * (1 - keep) + inv_freq * keep).astype(np.float32)


def cos_sin_factor(cfg: config_lib.RopeConfig) -> float:
    if cfg.scaling is config_lib.RopeScaling.NONE:
        return 1.0
    if cfg.mscale and cfg.mscale_all_dim:
        return config_lib.yarn_mscale(cfg.factor, cfg.mscale) / config_lib.yarn_mscale(
            cfg.factor, cfg.mscale_all_dim
        )
    return config_lib.yarn_mscale(cfg.factor, 1.0)


def softmax_scale(cfg: config_lib.MLAConfig) -> float:
    """(nope+rope)^-0.5, times mscale(s, mscale_all_dim)^2 under YaRN."""
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope.scaling is config_lib.RopeScaling.YARN and cfg.rope.mscale_all_dim:
        scale *= config_lib.yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2
    return scale


def cos_sin(cfg: config_lib.RopeConfig, dim: int, positions_S: jax.Array, dtype=jnp.float32):
    """cos, sin of shape [..., S, dim/2] for integer positions.

    The frequencies are computed in float32 as HF does (bit-compatible tables); `dtype` (float32
    or wider) is the precision of the angles and the rotation.
    """
    inv_freq = jnp.asarray(inv_frequencies(cfg, dim)).astype(dtype)
    inv_freq = inv_freq.reshape((1,) * positions_S.ndim + inv_freq.shape)
    angles = positions_S.astype(dtype)[..., None] * inv_freq
    factor = cos_sin_factor(cfg)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x_SR: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of the last dim by the angles in cos/sin.

    x has shape [..., S, (heads,) R]; cos/sin are [..., S, R/2] and broadcast over a heads dim
    when x has one more dim than cos.
    """
    dtype = x_SR.dtype
    x = x_SR.astype(jnp.promote_types(cos.dtype, jnp.float32))
    if x.ndim == cos.ndim + 1:  # [B, S, H, R] with cos [B, S, R/2]
        cos, sin = cos[..., None, :], sin[..., None, :]
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_odd * cos + x_even * sin
    return jnp.stack([out_even, out_odd], axis=-1).reshape(x.shape).astype(dtype)
