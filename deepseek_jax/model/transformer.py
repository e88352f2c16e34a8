"""The DeepSeek-V3 model: embed -> dense stack -> MoE stack -> norm -> head (+ MTP)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model import block as block_lib
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import constraints, dispatch, layers, precision, rope, stack
from deepseek_jax.model import moe as moe_lib
from deepseek_jax.model import mtp as mtp_lib


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "logits_BSY",
        "mtp_logits_JBSY",
        "moe_stats",
        "mtp_stats",
        "hidden_BSD",
        "mtp_hidden_JBSD",
        "head_DY",
    ],
    meta_fields=["loss_chunk_tokens"],
)
@dataclasses.dataclass
class Outputs:
    """What the forward returns. With `logits=False` (the fused head + CE of model/head_loss.py)
    the logits fields are None and the head's inputs and weight are returned instead."""

    logits_BSY: jax.Array | None
    mtp_logits_JBSY: jax.Array | None  # depth k-1 row predicts token i+k+1 at position i
    moe_stats: moe_lib.MoEStats | None  # stacked over main MoE layers [Lm, ...]
    mtp_stats: moe_lib.MoEStats | None  # stacked over MTP depths [J, ...]
    hidden_BSD: jax.Array | None = None  # the head's input (after the final norm)
    mtp_hidden_JBSD: jax.Array | None = None  # the same per MTP depth (after its head_norm)
    head_DY: jax.Array | None = None  # the head kernel (the embedding transposed when tied)
    loss_chunk_tokens: int = 0  # with head_DY: tokens per chunk of the fused head + CE


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

    def rope_tables(self, batch: int, seq: int, positions_BS: jax.Array | None = None):
        """cos, sin for each token's position: 0..S-1, or `positions_BS` (packed samples, each
        restarting at 0)."""
        if positions_BS is None:
            positions = jnp.broadcast_to(jnp.arange(seq)[None, :], (batch, seq))
        else:
            positions = positions_BS
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

    def head_weight(self) -> jax.Array:
        """The head as a [D, Y] kernel in the parameter dtype (what `logits` multiplies by)."""
        return self.embed.embedding[...].T if self.head is None else self.head.kernel[...]

    def run_stack(
        self,
        stack_module,
        h_BSD,
        cos,
        sin,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
        unroll: bool = False,
        active_L: jax.Array | None = None,
        segment_ids_BS: jax.Array | None = None,
    ):
        """(h, MoEStats stacked over the layers | None). `unroll` traces every layer into one
        computation instead of a while loop (pipeline stages: see parallel/pipeline/stages.py).
        `active_L` (one flag per layer) makes a layer whose flag is 0 the identity with zero
        statistics (a pipeline stage's padding slots): its output, its balance term and hence
        its weights' gradients are exactly zero, though it is still computed (a `where`, not a
        `cond`, so the stage stays one straight-line computation the backward split can cut)."""

        def body(layer, h, on):
            out, stats = layer(h, cos, sin, experts, segment_ids_BS)
            if on is None:
                return out, stats
            keep = on > 0
            stats = jax.tree.map(lambda a: jnp.where(keep, a, jnp.zeros_like(a)), stats)
            return jnp.where(keep, out, h), stats

        return stack.scan(
            stack_module,
            h_BSD,
            body,
            active_L,
            self.cfg.remat,
            unroll=unroll,
            loop=not self.cfg.scan_layers,
        )

    def prologue(
        self,
        inputs_BS: jax.Array,
        cos,
        sin,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
        unroll: bool = False,
        segment_ids_BS: jax.Array | None = None,
    ) -> jax.Array:
        """Embedding and the dense layers: the input of the MoE stack."""
        h_BSD = constraints.constrain(self.embed(inputs_BS), block_lib.ACT_BSD)
        if self.dense_layers is not None:
            h_BSD, _ = self.run_stack(
                self.dense_layers, h_BSD, cos, sin, experts, unroll, segment_ids_BS=segment_ids_BS
            )
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
        logits: bool = True,
        segment_ids_BS: jax.Array | None = None,
    ) -> Outputs:
        """Final norm, head and the MTP modules on the MoE stack's output (moe_stats left None).

        `logits=False` stops before the head: Outputs carries the head's inputs and its weight
        for a loss that applies the head itself (head_loss.weighted_nll)."""
        h_BSD = self.norm(h_BSD)
        head = self.logits if logits else (lambda x: x)
        mtp_out, mtp_stats = None, None
        if with_mtp and self.mtp is not None:
            mtp_out, mtp_stats = self.mtp(
                h_BSD, inputs_BS, self.embed, head, cos, sin, experts, segment_ids_BS
            )
        if logits:
            return Outputs(self.logits(h_BSD), mtp_out, None, mtp_stats)
        return Outputs(
            None,
            None,
            None,
            mtp_stats,
            h_BSD,
            mtp_out,
            self.head_weight(),
            max(self.cfg.loss_chunk_tokens, 1),
        )

    def __call__(
        self,
        inputs_BS: jax.Array,
        *,
        segment_ids_BS: jax.Array | None = None,
        positions_BS: jax.Array | None = None,
        with_mtp: bool = True,
        logits: bool = True,
        experts: dispatch.ExpertFn = dispatch.dropless_experts,
    ) -> Outputs:
        """Packed samples: `segment_ids_BS` (1, 2, ... per sample, 0 on padding) keeps attention,
        in the main stack and every MTP depth, within each sample; `positions_BS` restarts RoPE
        positions per sample. Both None: one sample per row, positions 0..S-1."""
        B, S = inputs_BS.shape
        seg = segment_ids_BS
        cos, sin = self.rope_tables(B, S, positions_BS)
        h_BSD = self.prologue(inputs_BS, cos, sin, experts, segment_ids_BS=seg)
        moe_stats = None
        if self.moe_layers is not None:
            h_BSD, moe_stats = self.run_stack(
                self.moe_layers, h_BSD, cos, sin, experts, segment_ids_BS=seg
            )
        out = self.epilogue(
            h_BSD,
            inputs_BS,
            cos,
            sin,
            experts,
            with_mtp=with_mtp,
            logits=logits,
            segment_ids_BS=seg,
        )
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


def abstract_layout(cfg: config_lib.ModelConfig):
    """((params, expert_bias), (their logical axes)) as nested dicts, without allocating: shapes
    as ShapeDtypeStructs, and each variable's logical axis names (DEVELOPERS.md). The one place
    the train state's shardings and the layout checks (parallel/validate.py) read them from."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    _, params, bias = nnx.split(model, nnx.Param, layers.ExpertBias)

    def names(state):
        return nnx.to_pure_dict(
            jax.tree.map(
                lambda v: v.replace(tuple(v.get_metadata()["logical_axes"])),
                state,
                is_leaf=lambda x: isinstance(x, nnx.Variable),
            )
        )

    return (nnx.to_pure_dict(params), nnx.to_pure_dict(bias)), (names(params), names(bias))
