"""DeepSeek-V2-Lite (15.7B total, 2.4B active): the official shapes.

    python -m deepseek_jax.info --config=configs/deepseek_v2_lite.py

Softmax affinities, greedy top-6 of 64 routed experts + 2 shared, no query compression,
YaRN with mscale 0.707 (config_16B.json of deepseek-ai/DeepSeek-V3; V2 report p.29).
"""

from deepseek_jax import config as config_lib


def get_config():
    c = config_lib.default_config_dict()
    c.model.update(
        vocab_size=102400,
        d_model=2048,
        n_layers=27,
        first_k_dense_replace=1,
        intermediate_size=10944,
        n_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        moe_intermediate_size=1408,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        score_func="softmax",
        topk_method="greedy",
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        mtp_depth=0,
        compute_dtype="bfloat16",
        remat="full",
    )
    c.model.rope.update(
        scaling="yarn",
        factor=40.0,
        original_max_position=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=0.707,
        mscale_all_dim=0.707,
    )
    c.train.update(
        seq_len=4096, global_batch_size=4608, lr=4.2e-4, lr_final=4.2e-5, warmup_steps=2000
    )
    return c
