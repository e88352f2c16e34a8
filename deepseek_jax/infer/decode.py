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


def masked_softmax(
    old_BHST: jax.Array, new_BHSU: jax.Array, start_B: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    """One softmax, in at least float32, over the cached keys before each row's start (t < start_b)
    and the S new keys up to the query's own (u <= s): the cache's entries at and past start_b
    are stale, and the new tokens' entries are written only after the forward."""
    S, T = old_BHST.shape[-2:]
    old_BT = jnp.arange(T)[None, :] < start_B[:, None]
    new_SU = jnp.arange(S)[None, :] <= jnp.arange(S)[:, None]
    dtype = jnp.promote_types(old_BHST.dtype, jnp.float32)
    lo = jnp.finfo(dtype).min
    old_BHST = jnp.where(old_BT[:, None, None, :], old_BHST.astype(dtype) * scale, lo)
    new_BHSU = jnp.where(new_SU, new_BHSU.astype(dtype) * scale, lo)
    probs = jax.nn.softmax(jnp.concatenate([old_BHST, new_BHSU], axis=-1), axis=-1)
    return probs[..., :T], probs[..., T:]


def absorbed_weights(attn: mla_lib.MLA):
    """(W_UK [C, H, N], W_UV [C, H, V]): wkv_b split into its key and value halves."""
    w_CHX = attn.wkv_b.kernel[...].astype(attn.cfg.compute_dtype)
    N = attn.cfg.qk_nope_head_dim
    return w_CHX[..., :N], w_CHX[..., N:]


def _expand(attn: mla_lib.MLA, c_BSC: jax.Array):
    kv_BSHO = attn.wkv_b(c_BSC)
    N = attn.cfg.qk_nope_head_dim
    return kv_BSHO[..., :N], kv_BSHO[..., N:]


def _entries(attn, kv, c_BSC, k_rope_BSR) -> kv_cache.LayerKV:
    """The new tokens' cache entries [B, S, ...] in the cache dtype: the latent as is, or expanded
    per head (naive)."""
    if isinstance(kv, kv_cache.LatentKV):
        dt = kv.c_kv_LBTC.dtype
        return kv_cache.LatentKV(c_BSC.astype(dt), k_rope_BSR.astype(dt))
    k_nope_BSHN, v_BSHV = _expand(attn, c_BSC)
    H = k_nope_BSHN.shape[2]
    k_rope_BSHR = jnp.broadcast_to(
        k_rope_BSR[:, :, None, :], k_rope_BSR.shape[:2] + (H,) + k_rope_BSR.shape[-1:]
    ).astype(k_nope_BSHN.dtype)
    k_BSHK = jnp.concatenate([k_nope_BSHN, k_rope_BSHR], axis=-1)
    dt = kv.k_LBTHK.dtype
    return kv_cache.FullKV(k_BSHK.astype(dt), v_BSHV.astype(dt))


def attend(attn: mla_lib.MLA, x_BSD, cos, sin, start_B, kv: kv_cache.LayerKV, prefill: bool):
    """One MLA layer over the cache (kv is this layer's slice: [B, T, ...], read only).

    -> (out, the new tokens' entries [B, S, ...]). The new tokens attend to the cache before
    start_b and to each other, through their entries as the cache stores them (rounded to its
    dtype), so a verify of S tokens sees what S single steps would; the caller writes the
    entries of every layer once, after the forward (kv_cache.write), instead of updating each
    layer's slice in place (XLA:CPU copied the slice around every such update)."""
    cfg = attn.cfg
    cdt = cfg.compute_dtype
    scale = rope.softmax_scale(cfg)
    q_nope_BSHN, q_rope_BSHR = attn.query(x_BSD, cos, sin)
    c_BSC, k_rope_BSR = attn.latent(x_BSD, cos, sin)
    new = _entries(attn, kv, c_BSC, k_rope_BSR)
    if prefill:  # the training math over the prompt itself (start is 0)
        k_nope_BSHN, v_BSHV = _expand(attn, c_BSC)
        out_BSHV = attention.attend(
            cfg.attention, q_nope_BSHN, q_rope_BSHR, k_nope_BSHN, k_rope_BSR, v_BSHV, scale
        )
    elif isinstance(kv, kv_cache.LatentKV):
        w_uk_CHN, w_uv_CHV = absorbed_weights(attn)
        c_BTC = constraints.constrain(kv.c_kv_LBTC.astype(cdt), ("act_batch", "act_seq", None))
        k_rope_BTR = kv.k_rope_LBTR.astype(cdt)
        c_BUC, k_rope_BUR = new.c_kv_LBTC.astype(cdt), new.k_rope_LBTR.astype(cdt)
        q_rope_BSHR = q_rope_BSHR.astype(cdt)
        q_lat_BSHC = jnp.einsum("bshn,chn->bshc", q_nope_BSHN, w_uk_CHN)
        old_BHST = jnp.einsum("bshc,btc->bhst", q_lat_BSHC, c_BTC) + jnp.einsum(
            "bshr,btr->bhst", q_rope_BSHR, k_rope_BTR
        )
        new_BHSU = jnp.einsum("bshc,buc->bhsu", q_lat_BSHC, c_BUC) + jnp.einsum(
            "bshr,bur->bhsu", q_rope_BSHR, k_rope_BUR
        )
        p_old_BHST, p_new_BHSU = masked_softmax(old_BHST, new_BHSU, start_B, scale)
        ctx_BSHC = jnp.einsum("bhst,btc->bshc", p_old_BHST.astype(cdt), c_BTC) + jnp.einsum(
            "bhsu,buc->bshc", p_new_BHSU.astype(cdt), c_BUC
        )
        out_BSHV = jnp.einsum("bshc,chv->bshv", ctx_BSHC, w_uv_CHV)
    else:
        q_BSHK = jnp.concatenate([q_nope_BSHN, q_rope_BSHR.astype(q_nope_BSHN.dtype)], axis=-1)
        k_BTHK, v_BTHV = kv.k_LBTHK.astype(cdt), kv.v_LBTHV.astype(cdt)
        k_BUHK, v_BUHV = new.k_LBTHK.astype(cdt), new.v_LBTHV.astype(cdt)
        p_old_BHST, p_new_BHSU = masked_softmax(
            jnp.einsum("bshk,bthk->bhst", q_BSHK, k_BTHK),
            jnp.einsum("bshk,buhk->bhsu", q_BSHK, k_BUHK),
            start_B,
            scale,
        )
        out_BSHV = jnp.einsum("bhst,bthv->bshv", p_old_BHST.astype(cdt), v_BTHV) + jnp.einsum(
            "bhsu,buhv->bshv", p_new_BHSU.astype(cdt), v_BUHV
        )
    return attn.wo(out_BSHV), new


def block_step(
    block: block_lib.Block, h_BSD, cos, sin, start_B, kv, prefill: bool, experts: dispatch.ExpertFn
):
    """Block.__call__ with the cached attention: h += MLA(norm h); h += FFN(norm h).
    -> (h, the new tokens' cache entries)."""
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

        h_BSD, new = stack.scan(module, h_BSD, body, cache.stacks[name])
        stacks[name] = kv_cache.write(cache.stacks[name], new, start_B)
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
    g_BSD, new = block_step(layer.block, x_BSD, cos, sin, start_B, kv, prefill, experts)
    hn_BSD = layer.head_norm(g_BSD)
    new = jax.tree.map(lambda a: a[None], new)
    stacks = {"mtp": kv_cache.write(cache.stacks["mtp"], new, start_B, layer=module)}
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
