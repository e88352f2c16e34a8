"""Typed model configuration.

`ModelConfig` is the one source of truth for the architecture. Field names follow the Hugging Face
`DeepseekV3Config` where one exists, so checkpoint conversion is a rename. Layers never see the
whole config: they get the small derived views (`MLAConfig`, `MoEConfig`, `MLPConfig`,
`BlockConfig`).
`validate()` runs at construction and names the offending field.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from deepseek_jax import dataclass_dict


class ScoreFunc(enum.Enum):
    """Expert affinity: sigmoid (V3) or softmax (V2)."""

    SIGMOID = "sigmoid"
    SOFTMAX = "softmax"


class TopkMethod(enum.Enum):
    """How experts are selected (HF `topk_method`).

    NOAUX_TC: V3. Correction bias added for selection only; groups scored by their top-2 sum.
    GREEDY: plain top-k, no group limit (V2-Lite).
    GROUP_LIMITED_GREEDY: V2. Groups scored by their maximum affinity.
    """

    NOAUX_TC = "noaux_tc"
    GREEDY = "greedy"
    GROUP_LIMITED_GREEDY = "group_limited_greedy"


class RopeScaling(enum.Enum):
    NONE = "none"
    YARN = "yarn"


class RematPolicy(enum.Enum):
    """What a scanned layer keeps for the backward pass.

    NONE: keep everything (no remat). FULL: keep only the layer input, recompute the rest.
    DOTS: keep matmul outputs without batch dimensions (jax's dots_with_no_batch_dims_saveable).
    """

    NONE = "none"
    FULL = "full"
    DOTS = "dots"


class AttentionImpl(enum.Enum):
    """How the MLA attention core is computed (the same math; `model.attention.impl`).

    DENSE: materialises the [B, H, S, T] scores (and keeps the probabilities for the backward).
    BLOCKWISE: flash-style online softmax over key blocks, blocks above the causal diagonal
    skipped; the backward recomputes each block from the saved logsumexp, so activation memory is
    linear in the sequence length (model/blockwise.py).
    """

    DENSE = "dense"
    BLOCKWISE = "blockwise"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The attention core's implementation and, for BLOCKWISE, its block sizes (queries, keys).
    A sequence shorter than a block uses one block; one that is not a multiple is padded."""

    impl: AttentionImpl = AttentionImpl.DENSE
    block_q: int = 512
    block_k: int = 512


class MatmulPolicy(enum.Enum):
    """How the weight GEMMs compute (model/precision.py implements each)."""

    DEFAULT = "default"  # operands in the compute dtype, XLA's default accumulation
    BF16 = "bf16"  # bfloat16 operands, float32 accumulation
    FP8_BLOCKWISE = "fp8_blockwise"  # E4M3, 1x128 / 128x128 float32 scales amax/448
    FP8_BLOCKWISE_POW2 = "fp8_blockwise_pow2"  # the same with scales rounded up to powers of two


class GroupedMatmul(enum.Enum):
    """How the routed experts' grouped matmuls run (model/grouped.py says what each costs where).

    AUTO: MEGABLOX on TPU, TILED elsewhere (CPU, GPU). RAGGED_DOT: jax.lax.ragged_dot. TILED:
    rows padded per expert to whole tiles, one matmul per tile (a scan), exact, with its own
    gradient. MEGABLOX: jax's Pallas TPU grouped GEMM (gmm / tgmm), interpreted off TPU.
    """

    AUTO = "auto"
    RAGGED_DOT = "ragged_dot"
    TILED = "tiled"
    MEGABLOX = "megablox"


class DType(enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT64 = "float64"

    @property
    def jnp(self) -> Any:
        return jnp.dtype(self.value)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    scaling: RopeScaling = RopeScaling.NONE
    factor: float = 40.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    d_model: int
    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    norm_eps: float
    init_std: float
    param_dtype: Any
    compute_dtype: Any
    attention: AttentionConfig = AttentionConfig()
    matmul: MatmulPolicy = MatmulPolicy.DEFAULT

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    d_model: int
    d_ff: int
    init_std: float
    param_dtype: Any
    compute_dtype: Any
    matmul: MatmulPolicy = MatmulPolicy.DEFAULT


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    d_model: int
    n_routed_experts: int
    n_shared_experts: int
    d_expert: int
    top_k: int
    n_group: int
    topk_group: int
    score_func: ScoreFunc
    topk_method: TopkMethod
    routed_scaling_factor: float
    norm_topk_prob: bool
    init_std: float
    param_dtype: Any
    compute_dtype: Any
    grouped_matmul: GroupedMatmul = GroupedMatmul.AUTO
    matmul: MatmulPolicy = MatmulPolicy.DEFAULT

    @property
    def use_bias(self) -> bool:
        return self.topk_method is TopkMethod.NOAUX_TC


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    attn: MLAConfig
    mlp: MLPConfig | None  # dense FFN (first_k_dense_replace layers)
    moe: MoEConfig | None  # MoE FFN (the rest)
    norm_eps: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 3
    first_k_dense_replace: int = 1
    intermediate_size: int = 128  # dense FFN hidden size
    # MLA
    n_heads: int = 4
    q_lora_rank: int | None = 32  # None: direct q projection (V2-Lite)
    kv_lora_rank: int = 16
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope: RopeConfig = RopeConfig()
    attention: AttentionConfig = AttentionConfig()  # how the core is computed, not what
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 32
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    score_func: ScoreFunc = ScoreFunc.SIGMOID
    topk_method: TopkMethod = TopkMethod.NOAUX_TC
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # MTP
    mtp_depth: int = 1  # HF num_nextn_predict_layers
    # Misc
    norm_eps: float = 1e-6
    init_std: float = 0.006
    tie_embeddings: bool = False
    param_dtype: DType = DType.FLOAT32
    compute_dtype: DType = DType.FLOAT32
    remat: RematPolicy = RematPolicy.NONE
    # False: the layer stacks run as a Python loop over slices of the same stacked parameters,
    # not a lax.scan: no per-layer residuals stacked for the backward (-16% step time on the
    # 4-layer moe-heavy CPU bench, BENCHMARKS.md issue 12), but compile time grows with depth.
    scan_layers: bool = True
    grouped_matmul: GroupedMatmul = GroupedMatmul.AUTO  # the routed experts' grouped matmul
    # Training loss: tokens per chunk of the fused head + cross-entropy (model/head_loss.py), which
    # never builds the [tokens, vocab] logits; 0 builds them and differentiates the plain CE.
    # 1024: the fastest of 128..1024 on the vocab-32K CPU benchmark (BENCHMARKS.md, issue 12).
    loss_chunk_tokens: int = 1024
    # How the weight GEMMs (Linears but the head, routed experts) compute: model/precision.py.
    matmul_policy: MatmulPolicy = MatmulPolicy.DEFAULT

    def __post_init__(self):
        self.validate()

    # -- derived views -------------------------------------------------------------------------
    @property
    def n_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.n_layers)

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def mtp_is_moe(self) -> bool:
        # HF/official: layer index n_layers + k is MoE iff it is >= first_k_dense_replace.
        return self.n_layers >= self.first_k_dense_replace and self.n_routed_experts > 0

    def mla(self) -> MLAConfig:
        return MLAConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            rope=self.rope,
            norm_eps=self.norm_eps,
            init_std=self.init_std,
            param_dtype=self.param_dtype.jnp,
            compute_dtype=self.compute_dtype.jnp,
            attention=self.attention,
            matmul=self.matmul_policy,
        )

    def dense_mlp(self) -> MLPConfig:
        return MLPConfig(
            self.d_model,
            self.intermediate_size,
            self.init_std,
            self.param_dtype.jnp,
            self.compute_dtype.jnp,
            self.matmul_policy,
        )

    def moe(self) -> MoEConfig:
        return MoEConfig(
            d_model=self.d_model,
            n_routed_experts=self.n_routed_experts,
            n_shared_experts=self.n_shared_experts,
            d_expert=self.moe_intermediate_size,
            top_k=self.num_experts_per_tok,
            n_group=self.n_group,
            topk_group=self.topk_group,
            score_func=self.score_func,
            topk_method=self.topk_method,
            routed_scaling_factor=self.routed_scaling_factor,
            norm_topk_prob=self.norm_topk_prob,
            init_std=self.init_std,
            param_dtype=self.param_dtype.jnp,
            compute_dtype=self.compute_dtype.jnp,
            grouped_matmul=self.grouped_matmul,
            matmul=self.matmul_policy,
        )

    def block(self, moe: bool) -> BlockConfig:
        return BlockConfig(
            attn=self.mla(),
            mlp=None if moe else self.dense_mlp(),
            moe=self.moe() if moe else None,
            norm_eps=self.norm_eps,
        )

    # -- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(field: str, msg: str):
            raise ValueError(f"model.{field}: {msg}")

        positive = [
            "vocab_size",
            "d_model",
            "n_layers",
            "intermediate_size",
            "n_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        for name in [
            "first_k_dense_replace",
            "n_shared_experts",
            "mtp_depth",
            "n_routed_experts",
            "loss_chunk_tokens",
        ]:
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail("q_lora_rank", f"must be positive or None, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even (RoPE pairs), got {self.qk_rope_head_dim}")
        if self.norm_eps <= 0:
            fail("norm_eps", f"must be positive, got {self.norm_eps}")
        if self.init_std <= 0:
            fail("init_std", f"must be positive, got {self.init_std}")
        if self.rope.theta <= 0:
            fail("rope.theta", f"must be positive, got {self.rope.theta}")
        if self.rope.scaling is RopeScaling.YARN:
            if self.rope.factor < 1:
                fail("rope.factor", f"must be >= 1 for YaRN, got {self.rope.factor}")
            if self.rope.original_max_position <= 0:
                fail(
                    "rope.original_max_position",
                    f"must be positive, got {self.rope.original_max_position}",
                )
        for name in ["block_q", "block_k"]:
            if getattr(self.attention, name) <= 0:
                fail(f"attention.{name}", f"must be positive, got {getattr(self.attention, name)}")
        if self.n_moe_layers > 0 or self.mtp_depth > 0:
            if self.n_moe_layers > 0 and self.n_routed_experts <= 0:
                fail(
                    "n_routed_experts",
                    "must be positive when there are MoE layers "
                    f"(n_layers={self.n_layers} > first_k_dense_replace="
                    f"{self.first_k_dense_replace})",
                )
        if self.n_routed_experts > 0:
            for name in ["moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"]:
                if getattr(self, name) <= 0:
                    fail(name, f"must be positive, got {getattr(self, name)}")
            if self.n_routed_experts % self.n_group:
                fail(
                    "n_group",
                    f"n_routed_experts={self.n_routed_experts} is not divisible by "
                    f"n_group={self.n_group}",
                )
            if self.topk_group > self.n_group:
                fail("topk_group", f"topk_group={self.topk_group} > n_group={self.n_group}")
            reachable = self.topk_group * (self.n_routed_experts // self.n_group)
            if self.topk_method is TopkMethod.GREEDY:
                reachable = self.n_routed_experts
            if self.num_experts_per_tok > reachable:
                fail(
                    "num_experts_per_tok",
                    f"top-k={self.num_experts_per_tok} exceeds the {reachable} experts the group "
                    f"limit allows (topk_group={self.topk_group} of n_group={self.n_group} "
                    f"groups of {self.n_routed_experts // self.n_group})",
                )
            if self.topk_method is TopkMethod.NOAUX_TC and self.score_func is not ScoreFunc.SIGMOID:
                fail("topk_method", "noaux_tc (bias-corrected selection) needs score_func=sigmoid")
            if (
                self.topk_method is TopkMethod.NOAUX_TC
                and self.n_group > 1
                and self.n_routed_experts // self.n_group < 2
            ):
                fail(
                    "n_group",
                    "noaux_tc scores groups by their top-2 sum, so each group needs "
                    f">= 2 experts; got {self.n_routed_experts // self.n_group}",
                )
            if self.routed_scaling_factor <= 0:
                fail("routed_scaling_factor", f"must be positive, got {self.routed_scaling_factor}")

    # -- construction from plain dicts (config files, HF config.json) -------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds from a plain mapping; unknown keys and bad enum values fail naming the field."""
        return dataclass_dict.from_dict(cls, d, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict.to_dict(self)


def yarn_mscale(scale: float, mscale: float) -> float:
    """YaRN attention-entropy factor 0.1*m*ln(s)+1 (1 for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
