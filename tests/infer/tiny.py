"""The tiny MLA + MoE model the inference tests share; each file overrides what it varies."""

from __future__ import annotations

import dataclasses

from deepseek_jax.model import config as config_lib

TINY = config_lib.ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    first_k_dense_replace=1,
    intermediate_size=64,
    n_heads=4,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    mtp_depth=0,
    init_std=0.2,
)


def config(**overrides) -> config_lib.ModelConfig:
    return dataclasses.replace(TINY, **overrides)
