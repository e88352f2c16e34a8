"""Pre-norm decoder block: h += MLA(norm(h)); h += FFN(norm(h)), FFN dense or MoE."""

from __future__ import annotations

import jax
from flax import nnx

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import constraints, dispatch, layers, mla
from deepseek_jax.model import moe as moe_lib

ACT_BSD = ("act_batch", "act_seq", "act_embed")


class Block(nnx.Module):
    def __init__(self, cfg: config_lib.BlockConfig, *, rngs: nnx.Rngs):
        D = cfg.attn.d_model
        pdt = cfg.attn.param_dtype
        self.attn_norm = layers.RMSNorm(D, cfg.norm_eps, param_dtype=pdt)
        self.attn = mla.MLA(cfg.attn, rngs=rngs)
        self.ffn_norm = layers.RMSNorm(D, cfg.norm_eps, param_dtype=pdt)
        if cfg.moe is not None:
            self.ffn = moe_lib.MoE(cfg.moe, rngs=rngs)
        else:
            self.ffn = layers.MLP(cfg.mlp, rngs=rngs)
        self.is_moe = cfg.moe is not None

    def __call__(
        self,
        h_BSD: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
        segment_ids_BS: jax.Array | None = None,
    ):
        """Returns (h, MoEStats | None); `experts` computes the routed experts of a MoE block;
        `segment_ids_BS` (packed samples) keeps attention within each sample."""
        h_BSD = constraints.constrain(h_BSD, ACT_BSD)
        attn_BSD = self.attn(self.attn_norm(h_BSD), cos, sin, segment_ids_BS)
        h_BSD = h_BSD + attn_BSD.astype(h_BSD.dtype)
        stats = None
        if self.is_moe:
            y_BSD, stats = self.ffn(self.ffn_norm(h_BSD), experts)
        else:
            y_BSD = self.ffn(self.ffn_norm(h_BSD))
        h_BSD = h_BSD + y_BSD.astype(h_BSD.dtype)
        return constraints.constrain(h_BSD, ACT_BSD), stats
