"""The model run over a KV cache: prefill (training math), absorbed or naive decode, k+1 verify.

Like `Transformer.__call__`, every entry point takes the routed-expert function explicitly
(`experts`, default the single-device dispatch; a plan passes `plan.experts()`).

Every call processes S new tokens per row at positions length_b .. length_b + S - 1 (per-row
positions, so prompts of unequal length share a batch) and writes their cache entries there.

- Prefill (cache empty): the training MLA math -- K/V expanded from the latent, causal attention
  over the S prompt tokens -- and the cache written as a side effect.
- Absorbed decode (latent cache): scores q.k = q_nope.(W_UK c) + q_rope.k_rope = (q_nope W_UK).c +
  q_rope.k_rope, so W_UK is folded into the query and attention runs in the C-dim latent space over
  [c_kv ; k_rope] (MQA with one C+R-dim key shared by all heads); the context is a latent vector
  per head, and W_UV (then wo) is applied after the softmax. Scale (N+R)^-0.5 * mscale^2, exactly
  the training scale (rope.softmax_scale), not (C+R)^-0.5.
- Naive decode (full cache): per-head K/V of the new tokens expanded and cached, the reference.

S = 1 is a decode step; S = k+1 at length > 0 verifies k speculative drafts in one call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.infer import experts as experts_lib
from deepseek_jax.infer import kv_cache
from deepseek_jax.model import (
    attention,
    constraints,
    dispatch,
    layers,
    precision,
    rope,
    stack,
    transformer,
)
from deepseek_jax.model import block as block_lib
from deepseek_jax.model import mla as mla_lib


def masked_softmax(scores_BHST: jax.Array, start_B: jax.Array, scale: float) -> jax.Array:
    """Softmax over keys at positions <= the query's (start_b + s), in at least float32."""
    S, T = scores_BHST.shape[-2:]
    q_pos_BS = start_B[:, None] + jnp.arange(S)[None, :]
    mask_BST = jnp.arange(T)[None, None, :] <= q_pos_BS[:, :, None]
    dtype = jnp.promote_types(scores_BHST.dtype, jnp.float32)
    scores_BHST = scores_BHST.astype(dtype) * scale
    scores_BHST = jnp.where(mask_BST[:, None], scores_BHST, jnp.finfo(dtype).min)
    return jax.nn.softmax(scores_BHST, axis=-1)


def absorbed_weights(attn: mla_lib.MLA):
    """(W_UK [C, H, N], W_UV [C, H, V]): wkv_b split into its key and value halves."""
    w_CHX = attn.wkv_b.kernel[...].astype(attn.cfg.compute_dtype)
    N = attn.cfg.qk_nope_head_dim
    return w_CHX[..., :N], w_CHX[..., N:]


def _expand(attn: mla_lib.MLA, c_BSC: jax.Array):
    kv_BSHO = attn.wkv_b(c_BSC)
    N = attn.cfg.qk_nope_head_dim
    return kv_BSHO[..., :N], kv_BSHO[..., N:]


def _write_new(attn, kv, c_BSC, k_rope_BSR, start_B):
    """The cache entries of the new tokens: latent as is, or expanded per head (naive)."""
    if isinstance(kv, kv_cache.LatentKV):
        return kv_cache.LatentKV(
            kv_cache.write(kv.c_kv_LBTC, c_BSC, start_B),
            kv_cache.write(kv.k_rope_LBTR, k_rope_BSR, start_B),
        )
    k_nope_BSHN, v_BSHV = _expand(attn, c_BSC)
    H = k_nope_BSHN.shape[2]
    k_rope_BSHR = jnp.broadcast_to(
        k_rope_BSR[:, :, None, :], k_rope_BSR.shape[:2] + (H,) + k_rope_BSR.shape[-1:]
    ).astype(k_nope_BSHN.dtype)
    k_BSHK = jnp.concatenate([k_nope_BSHN, k_rope_BSHR], axis=-1)
    return kv_cache.FullKV(
        kv_cache.write(kv.k_LBTHK, k_BSHK, start_B), kv_cache.write(kv.v_LBTHV, v_BSHV, start_B)
    )


def attend(attn: mla_lib.MLA, x_BSD, cos, sin, start_B, kv: kv_cache.LayerKV, prefill: bool):
    """One MLA layer over the cache (kv is this layer's slice: [B, T, ...]). -> (out, kv)."""
    cfg = attn.cfg
    cdt = cfg.compute_dtype
    scale = rope.softmax_scale(cfg)
    q_nope_BSHN, q_rope_BSHR = attn.query(x_BSD, cos, sin)
    c_BSC, k_rope_BSR = attn.latent(x_BSD, cos, sin)
    kv = _write_new(attn, kv, c_BSC, k_rope_BSR, start_B)
    if prefill:  # the training math over the prompt itself (start is 0)
        k_nope_BSHN, v_BSHV = _expand(attn, c_BSC)
        out_BSHV = attention.attend(
            cfg.attention, q_nope_BSHN, q_rope_BSHR, k_nope_BSHN, k_rope_BSR, v_BSHV, scale
        )
    elif isinstance(kv, kv_cache.LatentKV):
        w_uk_CHN, w_uv_CHV = absorbed_weights(attn)
        c_BTC = constraints.constrain(kv.c_kv_LBTC.astype(cdt), ("act_batch", "act_seq", None))
        k_rope_BTR = kv.k_rope_LBTR.astype(cdt)
        q_lat_BSHC = jnp.einsum("bshn,chn->bshc", q_nope_BSHN, w_uk_CHN)
        scores_BHST = jnp.einsum("bshc,btc->bhst", q_lat_BSHC, c_BTC)
        scores_BHST = scores_BHST + jnp.einsum(
            "bshr,btr->bhst", q_rope_BSHR.astype(cdt), k_rope_BTR
        )
        probs_BHST = masked_softmax(scores_BHST, start_B, scale).astype(cdt)
        ctx_BSHC = jnp.einsum("bhst,btc->bshc", probs_BHST, c_BTC)
        out_BSHV = jnp.einsum("bshc,chv->bshv", ctx_BSHC, w_uv_CHV)
    else:
        q_BSHK = jnp.concatenate([q_nope_BSHN, q_rope_BSHR.astype(q_nope_BSHN.dtype)], axis=-1)
        k_BTHK, v_BTHV = kv.k_LBTHK.astype(cdt), kv.v_LBTHV.astype(cdt)
        scores_BHST = jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BTHK)
        probs_BHST = masked_softmax(scores_BHST, start_B, scale).astype(cdt)
        out_BSHV = jnp.einsum("bhst,bthv->bshv", probs_BHST, v_BTHV)
    return attn.wo(out_BSHV), kv


def block_step(
    block: block_lib.Block, h_BSD, cos, sin, start_B, kv, prefill: bool, experts: dispatch.ExpertFn
):
    """Block.__call__ with the cached attention: h += MLA(norm h); h += FFN(norm h)."""
    h_BSD = constraints.constrain(h_BSD, block_lib.ACT_BSD)
    a_BSD, kv = attend(block.attn, block.attn_norm(h_BSD), cos, sin, start_B, kv, prefill)
    h_BSD = h_BSD + a_BSD.astype(h_BSD.dtype)
    if block.is_moe:
        y_BSD, _ = block.ffn(block.ffn_norm(h_BSD), experts)
    else:
        y_BSD = block.ffn(block.ffn_norm(h_BSD))
    h_BSD = h_BSD + y_BSD.astype(h_BSD.dtype)
    return constraints.constrain(h_BSD, block_lib.ACT_BSD), kv


def _decode_experts(cfg, tokens: int, experts: dispatch.ExpertFn) -> dispatch.ExpertFn:
    """The single-device dispatch becomes the gathered one for a few tokens; an expert-parallel
    function (a plan's) is kept as it is."""
    if (
        experts is dispatch.dropless_experts
        and cfg.matmul_policy is precision.MatmulPolicy.DEFAULT
        and experts_lib.use_gathered(tokens, cfg.num_experts_per_tok, cfg.n_routed_experts)
    ):
        return experts_lib.gathered_experts
    return experts


def _rope(cfg, start_B, S):
    positions_BS = start_B[:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
    return rope.cos_sin(
        cfg.rope, cfg.qk_rope_head_dim, positions_BS, layers.accum_dtype(cfg.compute_dtype.jnp)
    )


def forward(
    model: transformer.Transformer,
    tokens_BS: jax.Array,
    cache: kv_cache.Cache,
    *,
    prefill: bool = False,
    experts: dispatch.ExpertFn = dispatch.dropless_experts,
):
    """-> (logits [B, S, Y], post-norm hidden [B, S, D], cache with the new entries written).

    The cache length is not advanced: the caller knows how many of the S tokens stand (prompt
    lengths after a prefill, the accepted prefix after a verify).
    """
    cfg = model.cfg
    start_B = cache.length_B
    cos, sin = _rope(cfg, start_B, tokens_BS.shape[1])
    h_BSD = constraints.constrain(model.embed(tokens_BS), block_lib.ACT_BSD)
    stacks = {}
    experts = _decode_experts(cfg, tokens_BS.size, experts)
    for name, module in (("dense", model.dense_layers), ("moe", model.moe_layers)):
        if module is None:
            continue

        def body(layer, h, kv):
            return block_step(layer, h, cos, sin, start_B, kv, prefill, experts)

        h_BSD, stacks[name] = stack.scan(module, h_BSD, body, cache.stacks[name])
    h_BSD = model.norm(h_BSD)
    return model.logits(h_BSD), h_BSD, kv_cache.Cache(stacks, cache.length_B)


def mtp_forward(
    model: transformer.Transformer,
    tokens_BS: jax.Array,
    h_prev_BSD: jax.Array,
    cache: kv_cache.Cache,
    *,
    module: int = 0,
    prefill: bool = False,
    experts: dispatch.ExpertFn = dispatch.dropless_experts,
):
    """MTP module `module` over its own layer of the MTP cache: position p takes emb(t_{p+1}) and
    the main model's post-norm hidden h_p (or, drafting further, the previous draft's normalised
    output) and predicts t_{p+2}. -> (logits [B, S, Y], normalised hidden [B, S, D], cache)."""
    layer = stack.layer(model.mtp.layers, module)
    start_B = cache.length_B
    cos, sin = _rope(model.cfg, start_B, tokens_BS.shape[1])
    e_BSD = layer.enorm(model.embed(tokens_BS))
    x_BSD = layer.eh_proj(jnp.concatenate([e_BSD, layer.hnorm(h_prev_BSD)], axis=-1))
    kv = jax.tree.map(lambda a: a[module], cache.stacks["mtp"])
    experts = _decode_experts(model.cfg, tokens_BS.size, experts)
    g_BSD, kv = block_step(layer.block, x_BSD, cos, sin, start_B, kv, prefill, experts)
    hn_BSD = layer.head_norm(g_BSD)
    stacks = {"mtp": jax.tree.map(lambda a, u: a.at[module].set(u), cache.stacks["mtp"], kv)}
    return model.logits(hn_BSD), hn_BSD, kv_cache.Cache(stacks, cache.length_B)


def last(x_BS: jax.Array, index_B: jax.Array) -> jax.Array:
    """x[b, index_b] for each row (x is [B, S, ...])."""
    idx = index_B.reshape((-1,) + (1,) * (x_BS.ndim - 1))
    return jnp.take_along_axis(x_BS, idx, axis=1)[:, 0]


def prefill(
    model: transformer.Transformer,
    tokens_BP: jax.Array,
    lengths_B: jax.Array,
    cache: kv_cache.Cache,
    experts: dispatch.ExpertFn = dispatch.dropless_experts,
):
    """Right-padded prompts (row b real up to lengths_b) into an empty cache.

    -> (logits of each row's last prompt token [B, Y], hidden [B, P, D], cache of length lengths).
    Pad positions are written too; they lie at or past the length, so they are never attended to
    and the first decode steps overwrite them.
    """
    empty = cache.with_length(jnp.zeros_like(lengths_B))
    logits_BPY, h_BPD, cache = forward(model, tokens_BP, empty, prefill=True, experts=experts)
    return last(logits_BPY, lengths_B - 1), h_BPD, cache.with_length(lengths_B)
