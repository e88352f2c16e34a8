"""Multi-head latent attention (DeepSeek-V2/V3).

q = wq_b(q_norm(wq_a x)) (or wq x without the query low-rank path), split per head into
[nope | rope]; [c | k_rope] = wkv_a x with c normalised by kv_norm; [k_nope | v] = wkv_b(c) per
head; the rope key is one vector shared by all heads, computed from x (not from the latent).
Parameter names follow the official inference code (wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo).
"""

from __future__ import annotations

import jax
from flax import nnx

from deepseek_jax.model import attention, layers, rope
from deepseek_jax.model import config as config_lib


class MLA(nnx.Module):
    def __init__(self, cfg: config_lib.MLAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H = cfg.d_model, cfg.n_heads
        N, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        kw = dict(
            std=cfg.init_std,
            param_dtype=cfg.param_dtype,
            compute_dtype=cfg.compute_dtype,
            rngs=rngs,
            policy=cfg.matmul,
        )
        if cfg.q_lora_rank is None:
            self.wq = layers.Linear((D,), (H, N + R), ("embed", "heads", "qk_head"), **kw)
        else:
            Q = cfg.q_lora_rank
            self.wq_a = layers.Linear((D,), (Q,), ("embed", "q_lora"), **kw)
            self.q_norm = layers.RMSNorm(Q, cfg.norm_eps, param_dtype=cfg.param_dtype)
            self.wq_b = layers.Linear((Q,), (H, N + R), ("q_lora", "heads", "qk_head"), **kw)
        self.wkv_a = layers.Linear((D,), (C + R,), ("embed", "kv_a"), **kw)
        self.kv_norm = layers.RMSNorm(C, cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.wkv_b = layers.Linear((C,), (H, N + V), ("kv_lora", "heads", "kv_head"), **kw)
        self.wo = layers.Linear((H, V), (D,), ("heads", "v_head", "embed"), **kw)

    def query(self, x_BSD: jax.Array, cos: jax.Array, sin: jax.Array):
        """(q_nope [B, S, H, N], roped q_rope [B, S, H, R])."""
        N = self.cfg.qk_nope_head_dim
        if self.cfg.q_lora_rank is None:
            q_BSHK = self.wq(x_BSD)
        else:
            q_BSHK = self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        return q_BSHK[..., :N], rope.apply_rope(q_BSHK[..., N:], cos, sin)

    def latent(self, x_BSD: jax.Array, cos: jax.Array, sin: jax.Array):
        """(normalised latent c [B, S, C], roped shared key k_rope [B, S, R]): what a KV cache
        keeps per token (inference absorbs wkv_b instead of expanding it)."""
        C = self.cfg.kv_lora_rank
        kv_BSA = self.wkv_a(x_BSD)
        return self.kv_norm(kv_BSA[..., :C]), rope.apply_rope(kv_BSA[..., C:], cos, sin)

    def __call__(
        self,
        x_BSD: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        segment_ids_BS: jax.Array | None = None,
    ) -> jax.Array:
        """Causal self-attention; `segment_ids_BS` (packed samples) keeps it within each one."""
        N = self.cfg.qk_nope_head_dim
        q_nope_BSHN, q_rope_BSHR = self.query(x_BSD, cos, sin)
        c_BSC, k_rope_BSR = self.latent(x_BSD, cos, sin)
        kv_BSHO = self.wkv_b(c_BSC)
        k_nope_BSHN, v_BSHV = kv_BSHO[..., :N], kv_BSHO[..., N:]

        out_BSHV = attention.attend(
            self.cfg.attention,
            q_nope_BSHN,
            q_rope_BSHR,
            k_nope_BSHN,
            k_rope_BSR,
            v_BSHV,
            rope.softmax_scale(self.cfg),
            segment_ids_BT=segment_ids_BS,
        )
        return self.wo(out_BSHV)
