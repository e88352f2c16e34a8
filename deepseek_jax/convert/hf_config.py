"""ModelConfig <-> Hugging Face config.json (DeepseekV3 / DeepseekV2).

Export writes the legacy `rope_theta`/`rope_scaling` keys that transformers 4.x, vLLM and SGLang
read, and `rope_parameters` + `rope_interleave` that transformers 5.x writes. Import falls back to
transformers' class defaults for absent keys and rejects features our model does not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepseek_jax.model import config as config_lib

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


def model_type(cfg: config_lib.ModelConfig) -> str:
    # HF's V3 router is hard-wired to sigmoid + bias + group top-2; V2-style configs need V2.
    return "deepseek_v3" if cfg.topk_method is config_lib.TopkMethod.NOAUX_TC else "deepseek_v2"


def to_hf_config(
    cfg: config_lib.ModelConfig,
    *,
    torch_dtype: str = "float32",
    max_position_embeddings: int | None = None,
) -> dict[str, Any]:
    mt = model_type(cfg)
    rope = cfg.rope
    if max_position_embeddings is None:
        max_position_embeddings = (
            int(rope.original_max_position * rope.factor)
            if rope.scaling is config_lib.RopeScaling.YARN
            else 4096
        )
    rope_scaling = None
    rope_parameters: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": "default"}
    if rope.scaling is config_lib.RopeScaling.YARN:
        rope_scaling = {
            "type": "yarn",
            "factor": rope.factor,
            "original_max_position_embeddings": rope.original_max_position,
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
            "mscale": rope.mscale,
            "mscale_all_dim": rope.mscale_all_dim,
        }
        rope_parameters = {
            **{k: v for k, v in rope_scaling.items() if k != "type"},
            "rope_theta": rope.theta,
            "rope_type": "yarn",
        }
    out = {
        "architectures": [
            "DeepseekV3ForCausalLM" if mt == "deepseek_v3" else "DeepseekV2ForCausalLM"
        ],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": cfg.n_routed_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "moe_layer_freq": 1,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": cfg.score_func.value,
        "topk_method": cfg.topk_method.value,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": rope.theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    return out


# transformers 5.24 class defaults for the keys whose absence changes the model, so a config.json
# without them means what it means to transformers (DeepseekV3Config defaults to 3 dense layers,
# 8 groups of which 4 are kept, and one MTP layer).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        first_k_dense_replace=3,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_shared_experts=1,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        num_nextn_predict_layers=1,
    ),
    "deepseek_v2": dict(
        first_k_dense_replace=0,
        n_group=None,
        topk_group=None,
        num_experts_per_tok=None,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        n_shared_experts=2,
        scoring_func="softmax",
        topk_method="greedy",
        num_nextn_predict_layers=0,
    ),
}


def _check_supported(d: Mapping[str, Any]) -> None:
    """Features our model does not have fail here rather than convert into different numerics."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json: hidden_act {act!r} is not supported (silu only)")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise ValueError(f"config.json: {key}=true is not supported (DeepSeek has no biases)")
    if d.get("rope_interleave") is False:
        raise ValueError(
            "config.json: rope_interleave=false is not supported (the official "
            "weights use interleaved RoPE pairs)"
        )
    kv_heads, heads = d.get("num_key_value_heads"), d.get("num_attention_heads")
    if kv_heads is not None and kv_heads != heads:
        raise ValueError(
            f"config.json: num_key_value_heads={kv_heads} differs from "
            f"num_attention_heads={heads}; MLA needs them equal"
        )


def from_hf_config(d: Mapping[str, Any], **overrides: Any) -> config_lib.ModelConfig:
    """ModelConfig from an HF or official config.json; unknown model types are rejected."""
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json: unsupported model_type {mt!r} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    _check_supported(d)
    defaults = _DEFAULTS[mt]

    def need(key: str):
        if key not in d or d[key] is None:
            raise ValueError(f"config.json: missing required key {key!r}")
        return d[key]

    def get(key: str):
        return d[key] if key in d else defaults[key]

    scaling = d.get("rope_scaling") or {}
    params = d.get("rope_parameters") or {}
    rope_type = scaling.get("type") or scaling.get("rope_type") or params.get("rope_type")
    src = scaling if scaling else params
    rope: dict[str, Any] = {
        "theta": float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    }
    if rope_type == "yarn":
        if "factor" not in src:
            raise ValueError("config.json: YaRN rope scaling without a 'factor'")
        rope.update(
            scaling="yarn",
            factor=float(src["factor"]),
            original_max_position=int(src.get("original_max_position_embeddings", 4096)),
            beta_fast=float(src.get("beta_fast", 32)),
            beta_slow=float(src.get("beta_slow", 1)),
            mscale=float(src.get("mscale", 1.0)),
            mscale_all_dim=float(src.get("mscale_all_dim", 0.0) or 0.0),
        )
    elif rope_type not in (None, "default"):
        raise ValueError(f"config.json: unsupported rope scaling type {rope_type!r}")
    q_lora = d.get("q_lora_rank", 1536)
    mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers"))
    fields = dict(
        vocab_size=need("vocab_size"),
        d_model=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
        first_k_dense_replace=get("first_k_dense_replace") or 0,
        intermediate_size=need("intermediate_size"),
        n_heads=need("num_attention_heads"),
        q_lora_rank=q_lora if q_lora else None,  # the official V2-Lite config says 0
        kv_lora_rank=need("kv_lora_rank"),
        qk_nope_head_dim=need("qk_nope_head_dim"),
        qk_rope_head_dim=need("qk_rope_head_dim"),
        v_head_dim=need("v_head_dim"),
        rope=rope,
        n_routed_experts=d.get("n_routed_experts") or 0,
        n_shared_experts=get("n_shared_experts") or 0,
        moe_intermediate_size=d.get("moe_intermediate_size") or 1,
        num_experts_per_tok=get("num_experts_per_tok") or 1,
        n_group=get("n_group") or 1,
        topk_group=get("topk_group") or 1,
        score_func=get("scoring_func"),
        topk_method=get("topk_method"),
        routed_scaling_factor=float(get("routed_scaling_factor")),
        norm_topk_prob=bool(get("norm_topk_prob")),
        mtp_depth=int(defaults["num_nextn_predict_layers"] if mtp is None else mtp),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        init_std=float(d.get("initializer_range", 0.006)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return config_lib.ModelConfig.from_dict(fields)
