"""Causal attention core for MLA: pure function of arrays, softmax in (at least) float32.

MLA scores are q_nope.k_nope (per head) + rope(q_rope).rope(k_rope) (one rope key shared by all
heads), scaled once. Values have their own head dim (V), so q/k and v dims differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(q_len: int, k_len: int, q_offset: int | jax.Array = 0) -> jax.Array:
    """[S, T] boolean: query s (at absolute position q_offset + s) sees keys t <= its position."""
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    return jnp.arange(k_len)[None, :] <= q_pos


def mla_attention(
    q_nope_BSHN: jax.Array,
    q_rope_BSHR: jax.Array,
    k_nope_BTHN: jax.Array,
    k_rope_BTR: jax.Array,
    v_BTHV: jax.Array,
    scale: float,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    scores_BHST = jnp.einsum("bshn,bthn->bhst", q_nope_BSHN, k_nope_BTHN)
    scores_BHST = scores_BHST + jnp.einsum("bshr,btr->bhst", q_rope_BSHR, k_rope_BTR)
    dtype = jnp.promote_types(scores_BHST.dtype, jnp.float32)
    scores_BHST = scores_BHST.astype(dtype) * scale
    mask_ST = causal_mask(q_nope_BSHN.shape[1], k_nope_BTHN.shape[1], q_offset)
    scores_BHST = jnp.where(mask_ST[None, None], scores_BHST, jnp.finfo(dtype).min)
    probs_BHST = jax.nn.softmax(scores_BHST, axis=-1).astype(v_BTHV.dtype)
    return jnp.einsum("bhst,bthv->bshv", probs_BHST, v_BTHV)
