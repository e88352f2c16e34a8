"""The DeepSeek-V3 model: embed -> dense stack -> MoE stack -> norm -> head (+ MTP)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model import block as block_lib
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import constraints, dispatch, layers, precision, rope, stack
from deepseek_jax.model import moe as moe_lib
from deepseek_jax.model import mtp as mtp_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Outputs:
    logits_BSY: jax.Array
    mtp_logits_JBSY: jax.Array | None  # depth k-1 row predicts token i+k+1 at position i
    moe_stats: moe_lib.MoEStats | None  # stacked over main MoE layers [Lm, ...]
    mtp_stats: moe_lib.MoEStats | None  # stacked over MTP depths [J, ...]


class Transformer(nnx.Module):
    def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, cdt = cfg.param_dtype.jnp, cfg.compute_dtype.jnp
        self.embed = layers.Embed(
            cfg.vocab_size,
            cfg.d_model,
            std=cfg.init_std,
            param_dtype=pdt,
            compute_dtype=cdt,
            rngs=rngs,
        )
        # Optional parts are assigned once (module or None): NNX fixes an attribute's kind on
        # first assignment.
        self.dense_layers = (
            stack.stacked(
                lambda r: block_lib.Block(cfg.block(moe=False), rngs=r), cfg.n_dense_layers, rngs
            )
            if cfg.n_dense_layers
            else None
        )
        self.moe_layers = (
            stack.stacked(
                lambda r: block_lib.Block(cfg.block(moe=True), rngs=r), cfg.n_moe_layers, rngs
            )
            if cfg.n_moe_layers
            else None
        )
        self.norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pdt)
        self.head = (
            None
            if cfg.tie_embeddings
            else layers.Linear(
                (cfg.d_model,),
                (cfg.vocab_size,),
                ("embed", "vocab"),
                std=cfg.init_std,
                param_dtype=pdt,
                compute_dtype=cdt,
                rngs=rngs,
                # The head keeps the compute dtype under every matmul policy (V3 keeps it BF16).
                policy=precision.MatmulPolicy.DEFAULT,
            )
        )
        self.mtp = mtp_lib.MTP(cfg, rngs=rngs) if cfg.mtp_depth else None

    # -- the forward, written once as three pieces --------------------------------------------
    # A pipeline runs them on different stages: `prologue` on the first, slices of the MoE stack
    # (`run_stack`) on every stage, `epilogue` on the last; `__call__` is their composition.

    def rope_tables(self, batch: int, seq: int):
        positions = jnp.broadcast_to(jnp.arange(seq)[None, :], (batch, seq))
        return rope.cos_sin(
            self.cfg.rope,
            self.cfg.qk_rope_head_dim,
            positions,
            layers.accum_dtype(self.cfg.compute_dtype.jnp),
        )

    def logits(self, h_BSD: jax.Array) -> jax.Array:
        """Output head on an already-normalised hidden state; float32 (or wider) logits."""
        out = self.embed.attend(h_BSD) if self.head is None else self.head(h_BSD)
        out = constraints.constrain(out, ("act_batch", "act_seq", "act_vocab"))
        return out.astype(layers.accum_dtype(out.dtype))

    def run_stack(
        self,
        stack_module,
        h_BSD,
        cos,
        sin,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
        unroll: bool = False,
    ):
        """(h, MoEStats stacked over the layers | None). `unroll` traces every layer into one
        computation instead of a while loop (pipeline stages: see parallel/pipeline/stages.py)."""

        def body(layer, h, _):
            return layer(h, cos, sin, experts)

        return stack.scan(stack_module, h_BSD, body, None, self.cfg.remat, unroll=unroll)

    def prologue(
        self,
        inputs_BS: jax.Array,
        cos,
        sin,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
        unroll: bool = False,
    ) -> jax.Array:
        """Embedding and the dense layers: the input of the MoE stack."""
        h_BSD = constraints.constrain(self.embed(inputs_BS), block_lib.ACT_BSD)
        if self.dense_layers is not None:
            h_BSD, _ = self.run_stack(self.dense_layers, h_BSD, cos, sin, experts, unroll)
        return h_BSD

    def epilogue(
        self,
        h_BSD: jax.Array,
        inputs_BS: jax.Array,
        cos,
        sin,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
        *,
        with_mtp: bool = True,
    ) -> Outputs:
        """Final norm, head and the MTP modules on the MoE stack's output (moe_stats left None)."""
        h_BSD = self.norm(h_BSD)
        logits_BSY = self.logits(h_BSD)
        mtp_logits, mtp_stats = None, None
        if with_mtp and self.mtp is not None:
            mtp_logits, mtp_stats = self.mtp(
                h_BSD, inputs_BS, self.embed, self.logits, cos, sin, experts
            )
        return Outputs(logits_BSY, mtp_logits, None, mtp_stats)

    def __call__(
        self,
        inputs_BS: jax.Array,
        *,
        with_mtp: bool = True,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
    ) -> Outputs:
        B, S = inputs_BS.shape
        cos, sin = self.rope_tables(B, S)
        h_BSD = self.prologue(inputs_BS, cos, sin, experts)
        moe_stats = None
        if self.moe_layers is not None:
            h_BSD, moe_stats = self.run_stack(self.moe_layers, h_BSD, cos, sin, experts)
        out = self.epilogue(h_BSD, inputs_BS, cos, sin, experts, with_mtp=with_mtp)
        return dataclasses.replace(out, moe_stats=moe_stats)

    # -- aux-loss-free balancing -----------------------------------------------------------------
    def update_expert_bias(
        self,
        moe_stats: moe_lib.MoEStats | None,
        mtp_stats: moe_lib.MoEStats | None,
        gamma: jax.Array,
    ) -> None:
        """b_i += gamma * sign(mean load - load_i) per MoE layer, from this batch's loads.

        Mutates the ExpertBias variables; call on a merged copy inside the step and take
        `nnx.state(model, layers.ExpertBias)` afterwards. MTP MoE layers are balanced the same way.
        Stacked stats carry a leading layer axis: load_E is [L, E].
        """
        pairs = []
        if self.moe_layers is not None and moe_stats is not None:
            pairs.append((self.moe_layers.ffn.gate, moe_stats.load_E))
        if self.mtp is not None and mtp_stats is not None:
            pairs.append((self.mtp.layers.block.ffn.gate, mtp_stats.load_E))
        for gate, load_LE in pairs:
            if gate.bias is None:
                continue
            delta_LE = jnp.sign(load_LE.mean(-1, keepdims=True) - load_LE)
            gate.bias[...] = gate.bias[...] + gamma * delta_LE
