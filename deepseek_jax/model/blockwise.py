"""Blockwise (flash-style) causal MLA attention: the dense core's values in linear memory.

Queries are cut into blocks of `block_q` rows, keys into blocks of `block_k`. For each query
block, a loop runs over the key blocks at or before its last position only (blocks entirely above
the causal diagonal are never computed: the trip count depends on the block, shapes stay static)
and keeps an online softmax: the running row maximum m, normaliser l and the unnormalised output.

The backward is a `jax.custom_vjp` (FlashAttention-2's): the forward saves only its inputs, the
output and the per-row logsumexp [B, H, S]; the backward recomputes each visible block's
probabilities from the logsumexp, so nothing [S, T]-sized is ever stored. One pass over the same
(query block, key block) pairs produces dq per query block and accumulates dk, dv into
full-length buffers.

A sequence not a multiple of its block is padded (queries: rows dropped after; keys: masked).
Softmax statistics and all accumulations are in promote(dtype, float32); the score and value
matmuls take the input dtype like the dense path (`attention.mla_attention`).
A query row that sees no key at all (only possible when q_offset + S > T) yields zeros here,
where the dense path averages every value; causal rows always see themselves.
Names: lower-case s and t in a shape suffix are one query block's and one key block's rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class _Static(NamedTuple):
    scale: float
    bq: int  # query block rows
    bk: int  # key block rows
    s_valid: int  # real query rows (the rest is padding)
    t_valid: int  # real key rows


def blockwise_attention(
    q_nope_BSHN: jax.Array,
    q_rope_BSHR: jax.Array,
    k_nope_BTHN: jax.Array,
    k_rope_BTR: jax.Array,
    v_BTHV: jax.Array,
    scale: float,
    q_offset: int | jax.Array = 0,
    segment_ids_BT: jax.Array | None = None,
    *,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Same arguments and result as `attention.mla_attention` -> [B, S, H, V]."""
    if block_q <= 0 or block_k <= 0:
        raise ValueError(
            f"model.attention.block_q/block_k: must be positive, got {block_q}/{block_k}"
        )
    S, T = q_nope_BSHN.shape[1], k_nope_BTHN.shape[1]
    bq, bk = min(block_q, S), min(block_k, T)
    s_pad, t_pad = -S % bq, -T % bk
    st = _Static(float(scale), bq, bk, S, T)
    q_offset = jnp.asarray(q_offset, jnp.int32)

    def pad(x, n):
        return x if n == 0 else jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))

    seg_q_BS = seg_k_BT = None
    if segment_ids_BT is not None:
        seg_q_BS = pad(jax.lax.dynamic_slice_in_dim(segment_ids_BT, q_offset, S, axis=1), s_pad)
        seg_k_BT = pad(segment_ids_BT, t_pad)
    out_BSHV = _flash(
        st,
        pad(q_nope_BSHN, s_pad),
        pad(q_rope_BSHR, s_pad),
        pad(k_nope_BTHN, t_pad),
        pad(k_rope_BTR, t_pad),
        pad(v_BTHV, t_pad),
        q_offset,
        seg_q_BS,
        seg_k_BT,
    )
    return out_BSHV[:, :S]


def _rows(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _put(x, update, start, axis=1):
    return jax.lax.dynamic_update_slice_in_dim(x, update.astype(x.dtype), start, axis=axis)


def _n_key_blocks(st: _Static, q_offset, q0, n_blocks: int):
    """Key blocks query block (first row q0) sees: those up to its last real row's position."""
    last_pos = q_offset + jnp.minimum(q0 + st.bq, st.s_valid) - 1
    return jnp.clip(last_pos // st.bk + 1, 0, n_blocks)


def _scores_and_mask(st: _Static, q, k, q_offset, seg, q0, k0, acc_dtype):
    """Scaled scores [B, H, bq, bk] in acc_dtype and where they are visible (broadcastable)."""
    qn_BsHN, qr_BsHR = q
    kn_BtHN, kr_BtR = k
    ein = functools.partial(jnp.einsum, preferred_element_type=acc_dtype)
    s_BHst = ein("bshn,bthn->bhst", qn_BsHN, kn_BtHN) + ein("bshr,btr->bhst", qr_BsHR, kr_BtR)
    q_pos = q_offset + q0 + jnp.arange(st.bq)
    k_pos = k0 + jnp.arange(st.bk)
    mask = k_pos[None, :] <= q_pos[:, None]
    if st.t_valid % st.bk:  # keys were padded: mask the padding
        mask = mask & (k_pos[None, :] < st.t_valid)
    mask = mask[None, None]
    if seg is not None:
        seg_q_Bs, seg_k_Bt = seg
        mask = mask & (seg_q_Bs[:, None, :, None] == seg_k_Bt[:, None, None, :])
    return s_BHst * st.scale, mask


def _q_block(st, qn, qr, seg_q, q0):
    q = (_rows(qn, q0, st.bq), _rows(qr, q0, st.bq))
    return q, None if seg_q is None else _rows(seg_q, q0, st.bq)


def _k_block(st, kn, kr, v, seg_k, k0):
    k = (_rows(kn, k0, st.bk), _rows(kr, k0, st.bk))
    return k, _rows(v, k0, st.bk), None if seg_k is None else _rows(seg_k, k0, st.bk)


def _forward(st: _Static, qn, qr, kn, kr, v, q_offset, seg_q, seg_k):
    """-> (out [B, S, H, V] in v's dtype, logsumexp [B, H, S]; +inf for rows seeing no key)."""
    B, S, H, _ = qn.shape
    acc_dtype = jnp.promote_types(qn.dtype, jnp.float32)
    n_q, n_k = S // st.bq, kn.shape[1] // st.bk
    low = jnp.finfo(acc_dtype).min

    def q_step(i, carry):
        out_BSHV, lse_BHS = carry
        q0 = i * st.bq
        q, sq = _q_block(st, qn, qr, seg_q, q0)

        def k_step(j, c):
            m_BHs, l_BHs, acc_BHsV = c
            k0 = j * st.bk
            k, v_BtHV, sk = _k_block(st, kn, kr, v, seg_k, k0)
            seg = None if sq is None else (sq, sk)
            s_BHst, mask = _scores_and_mask(st, q, k, q_offset, seg, q0, k0, acc_dtype)
            m_new = jnp.maximum(m_BHs, jnp.max(jnp.where(mask, s_BHst, low), axis=-1))
            p_BHst = jnp.where(mask, jnp.exp(s_BHst - m_new[..., None]), 0.0)
            corr = jnp.exp(m_BHs - m_new)
            pv_BHsV = jnp.einsum(
                "bhst,bthv->bhsv",
                p_BHst.astype(v.dtype),
                v_BtHV,
                preferred_element_type=acc_dtype,
            )
            return m_new, l_BHs * corr + p_BHst.sum(-1), acc_BHsV * corr[..., None] + pv_BHsV

        init = (
            jnp.full((B, H, st.bq), low, acc_dtype),
            jnp.zeros((B, H, st.bq), acc_dtype),
            jnp.zeros((B, H, st.bq, v.shape[-1]), acc_dtype),
        )
        m_BHs, l_BHs, acc_BHsV = jax.lax.fori_loop(
            0, _n_key_blocks(st, q_offset, q0, n_k), k_step, init
        )
        seen = l_BHs > 0
        out_BHsV = acc_BHsV / jnp.where(seen, l_BHs, 1.0)[..., None]
        lse_BHs = jnp.where(seen, m_BHs + jnp.log(jnp.where(seen, l_BHs, 1.0)), jnp.inf)
        out_BSHV = _put(out_BSHV, out_BHsV.transpose(0, 2, 1, 3), q0)
        return out_BSHV, _put(lse_BHS, lse_BHs, q0, axis=2)

    init = (
        jnp.zeros((B, S, H, v.shape[-1]), v.dtype),
        jnp.zeros((B, H, S), acc_dtype),
    )
    return jax.lax.fori_loop(0, n_q, q_step, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, qn, qr, kn, kr, v, q_offset, seg_q, seg_k):
    return _forward(st, qn, qr, kn, kr, v, q_offset, seg_q, seg_k)[0]


def _flash_fwd(st, qn, qr, kn, kr, v, q_offset, seg_q, seg_k):
    out, lse = _forward(st, qn, qr, kn, kr, v, q_offset, seg_q, seg_k)
    return out, (qn, qr, kn, kr, v, q_offset, seg_q, seg_k, out, lse)


def _flash_bwd(st, res, d_out_BSHV):
    qn, qr, kn, kr, v, q_offset, seg_q, seg_k, out_BSHV, lse_BHS = res
    acc_dtype = jnp.promote_types(qn.dtype, jnp.float32)
    n_q, n_k = qn.shape[1] // st.bq, kn.shape[1] // st.bk
    # delta = rowsum(dO * O) = sum_t p dp: the softmax backward's subtracted term, per row.
    delta_BHS = jnp.einsum(
        "bshv,bshv->bhs", d_out_BSHV.astype(acc_dtype), out_BSHV.astype(acc_dtype)
    )

    def q_step(i, carry):
        dqn, dqr, dkn, dkr, dv = carry
        q0 = i * st.bq
        q, sq = _q_block(st, qn, qr, seg_q, q0)
        do_BsHV = _rows(d_out_BSHV, q0, st.bq)
        lse_BHs = _rows(lse_BHS, q0, st.bq, axis=2)
        delta_BHs = _rows(delta_BHS, q0, st.bq, axis=2)

        def k_step(j, c):
            dqn_BsHN, dqr_BsHR, dkn, dkr, dv = c
            k0 = j * st.bk
            k, v_BtHV, sk = _k_block(st, kn, kr, v, seg_k, k0)
            seg = None if sq is None else (sq, sk)
            s_BHst, mask = _scores_and_mask(st, q, k, q_offset, seg, q0, k0, acc_dtype)
            p_BHst = jnp.where(mask, jnp.exp(s_BHst - lse_BHs[..., None]), 0.0)
            dv_BtHV = jnp.einsum(
                "bhst,bshv->bthv",
                p_BHst.astype(v.dtype),
                do_BsHV,
                preferred_element_type=acc_dtype,
            )
            dp_BHst = jnp.einsum(
                "bshv,bthv->bhst", do_BsHV, v_BtHV, preferred_element_type=acc_dtype
            )
            # d(raw score) = p (dp - delta) * scale; the 1/scale of s is folded in here.
            ds_BHst = (p_BHst * (dp_BHst - delta_BHs[..., None]) * st.scale).astype(qn.dtype)
            (qn_BsHN, qr_BsHR), (kn_BtHN, kr_BtR) = q, k
            ein = functools.partial(jnp.einsum, preferred_element_type=acc_dtype)
            dqn_BsHN = dqn_BsHN + ein("bhst,bthn->bshn", ds_BHst, kn_BtHN)
            dqr_BsHR = dqr_BsHR + ein("bhst,btr->bshr", ds_BHst, kr_BtR)
            dkn = _put(dkn, _rows(dkn, k0, st.bk) + ein("bhst,bshn->bthn", ds_BHst, qn_BsHN), k0)
            dkr = _put(dkr, _rows(dkr, k0, st.bk) + ein("bhst,bshr->btr", ds_BHst, qr_BsHR), k0)
            dv = _put(dv, _rows(dv, k0, st.bk) + dv_BtHV, k0)
            return dqn_BsHN, dqr_BsHR, dkn, dkr, dv

        init = (
            jnp.zeros(q[0].shape, acc_dtype),
            jnp.zeros(q[1].shape, acc_dtype),
            dkn,
            dkr,
            dv,
        )
        dqn_BsHN, dqr_BsHR, dkn, dkr, dv = jax.lax.fori_loop(
            0, _n_key_blocks(st, q_offset, q0, n_k), k_step, init
        )
        return _put(dqn, dqn_BsHN, q0), _put(dqr, dqr_BsHR, q0), dkn, dkr, dv

    zeros = [jnp.zeros(x.shape, acc_dtype) for x in (qn, qr, kn, kr, v)]
    grads = jax.lax.fori_loop(0, n_q, q_step, tuple(zeros))
    grads = tuple(g.astype(x.dtype) for g, x in zip(grads, (qn, qr, kn, kr, v)))
    return grads + (None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
