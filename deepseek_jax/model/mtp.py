"""Multi-token prediction: J sequential modules sharing the embedding and output head.

Depth k (1..J) at position i combines the previous depth's hidden state at i with the embedding of
token i+k and predicts token i+k+1:
    x = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])     # embedding FIRST (official weights)
    h^k = Block_k(x);  logits^k = Head(head_norm(h^k))
h^0 is the main model's hidden state *after* its final norm (what transformers, vLLM and SGLang feed
the released MTP layer); h^k for k >= 1 is the raw block output. Inputs past the end of the window
are padded with id 0 and their targets masked by the loss, never wrapped around.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model import block as block_lib
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import dispatch, layers, stack


class MTPLayer(nnx.Module):
    def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
        D, pdt = cfg.d_model, cfg.param_dtype.jnp
        self.enorm = layers.RMSNorm(D, cfg.norm_eps, param_dtype=pdt)
        self.hnorm = layers.RMSNorm(D, cfg.norm_eps, param_dtype=pdt)
        self.eh_proj = layers.Linear(
            (2 * D,),
            (D,),
            ("mtp_in", "embed"),
            std=cfg.init_std,
            param_dtype=pdt,
            compute_dtype=cfg.compute_dtype.jnp,
            rngs=rngs,
            policy=cfg.matmul_policy,
        )
        self.block = block_lib.Block(cfg.block(moe=cfg.mtp_is_moe), rngs=rngs)
        self.head_norm = layers.RMSNorm(D, cfg.norm_eps, param_dtype=pdt)


def shift_left(x_BS: jax.Array, k: int) -> jax.Array:
    """x[:, k:] followed by k zeros: what position i sees k tokens ahead (never wrapped)."""
    pad = jnp.zeros((x_BS.shape[0], min(k, x_BS.shape[1])), x_BS.dtype)
    return jnp.concatenate([x_BS[:, k:], pad], axis=1)


def shifted(x_BS: jax.Array, depth: int) -> jax.Array:
    """[J, B, S]: row k-1 holds x shifted left by k (t_{i+k} for inputs), zero-padded at the end."""
    if depth == 0:
        return jnp.zeros((0, *x_BS.shape), x_BS.dtype)
    return jnp.stack([shift_left(x_BS, k) for k in range(1, depth + 1)])


class MTP(nnx.Module):
    def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
        self.depth = cfg.mtp_depth
        self.remat = cfg.remat
        self.layers = stack.stacked(
            lambda r: MTPLayer(cfg, rngs=r), cfg.mtp_depth, rngs, axis_name="mtp_layers"
        )

    def __call__(
        self,
        h0_BSD: jax.Array,
        inputs_BS: jax.Array,
        embed: Callable[[jax.Array], jax.Array],
        head: Callable[[jax.Array], jax.Array],
        cos: jax.Array,
        sin: jax.Array,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
        segment_ids_BS: jax.Array | None = None,
    ):
        """Returns (logits [J, B, S, Y], MoEStats stacked over depths [J, ...] | None).

        With packed samples (`segment_ids_BS`) every depth attends within its sample. The shifted
        input at a sample's last k positions is the next sample's first tokens: harmless, because
        those positions' depth-k targets cross the sample and are masked by the loss, and causal
        attention inside the sample never lets an earlier position see them."""

        def body(layer: MTPLayer, h_prev_BSD, ids_BS):
            e_BSD = layer.enorm(embed(ids_BS))
            x_BSD = layer.eh_proj(jnp.concatenate([e_BSD, layer.hnorm(h_prev_BSD)], axis=-1))
            h_BSD, stats = layer.block(x_BSD, cos, sin, experts, segment_ids_BS)
            return h_BSD, (head(layer.head_norm(h_BSD)), stats)

        _, (logits_JBSY, stats) = stack.scan(
            self.layers, h0_BSD, body, shifted(inputs_BS, self.depth), self.remat
        )
        return logits_JBSY, stats
