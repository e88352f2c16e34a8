"""Causal attention core for MLA: pure functions of arrays, softmax in (at least) float32.

MLA scores are q_nope.k_nope (per head) + rope(q_rope).rope(k_rope) (one rope key shared by all
heads), scaled once. Values have their own head dim (V), so q/k and v dims differ.

Positions: query s sits at absolute position q_offset + s among the T keys (q_offset > 0 for a
chunk of a longer sequence), and sees keys t <= q_offset + s. Packed samples: `segment_ids_BT`
(optional) gives each key position a sample id; query s takes the id of key position
q_offset + s (so q_offset + S <= T), and attends only within its own sample.

`attend` picks the implementation from `AttentionConfig`: `mla_attention` (dense, here) or
`blockwise.blockwise_attention` (flash-style, linear memory); both compute the same values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.model import blockwise
from deepseek_jax.model import config as config_lib


def causal_mask(q_len: int, k_len: int, q_offset: int | jax.Array = 0) -> jax.Array:
    """[S, T] boolean: query s (at absolute position q_offset + s) sees keys t <= its position."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    return jnp.arange(k_len)[None, :] <= q_pos


def query_segments(segment_ids_BT: jax.Array, q_len: int, q_offset: int | jax.Array = 0):
    """[B, S] sample ids of the queries: those of key positions q_offset .. q_offset + S - 1."""
    return jax.lax.dynamic_slice_in_dim(segment_ids_BT, q_offset, q_len, axis=1)


def mla_attention(
    q_nope_BSHN: jax.Array,
    q_rope_BSHR: jax.Array,
    k_nope_BTHN: jax.Array,
    k_rope_BTR: jax.Array,
    v_BTHV: jax.Array,
    scale: float,
    q_offset: int | jax.Array = 0,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """Dense attention -> [B, S, H, V]."""
    S, T = q_nope_BSHN.shape[1], k_nope_BTHN.shape[1]
    scores_BHST = jnp.einsum("bshn,bthn->bhst", q_nope_BSHN, k_nope_BTHN)
    scores_BHST = scores_BHST + jnp.einsum("bshr,btr->bhst", q_rope_BSHR, k_rope_BTR)
    dtype = jnp.promote_types(scores_BHST.dtype, jnp.float32)
    scores_BHST = scores_BHST.astype(dtype) * scale
    mask_BHST = causal_mask(S, T, q_offset)[None, None]
    if segment_ids_BT is not None:
        seg_q_BS = query_segments(segment_ids_BT, S, q_offset)
        mask_BHST = mask_BHST & (seg_q_BS[:, None, :, None] == segment_ids_BT[:, None, None, :])
    scores_BHST = jnp.where(mask_BHST, scores_BHST, jnp.finfo(dtype).min)
    probs_BHST = jax.nn.softmax(scores_BHST, axis=-1).astype(v_BTHV.dtype)
    return jnp.einsum("bhst,bthv->bshv", probs_BHST, v_BTHV)


def attend(
    cfg: config_lib.AttentionConfig,
    q_nope_BSHN: jax.Array,
    q_rope_BSHR: jax.Array,
    k_nope_BTHN: jax.Array,
    k_rope_BTR: jax.Array,
    v_BTHV: jax.Array,
    scale: float,
    q_offset: int | jax.Array = 0,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """The attention core `cfg.impl` names -> [B, S, H, V]."""
    args = (q_nope_BSHN, q_rope_BSHR, k_nope_BTHN, k_rope_BTR, v_BTHV, scale, q_offset)
    if cfg.impl is config_lib.AttentionImpl.DENSE:
        return mla_attention(*args, segment_ids_BT)
    if cfg.impl is config_lib.AttentionImpl.BLOCKWISE:
        return blockwise.blockwise_attention(
            *args, segment_ids_BT, block_q=cfg.block_q, block_k=cfg.block_k
        )
    raise ValueError(f"model.attention.impl: no implementation for {cfg.impl}")
