"""DeepSeek-V3 (671B total, 37B active, MTP depth 1): the official shapes and training recipe.

    python -m deepseek_jax.info --config=configs/deepseek_v3_671b.py

Shapes from the V3 report p.22 and config_671B.json; recipe (AdamW 0.9/0.95, wd 0.1, clip 1.0,
init std 0.006, LR 2.2e-4 after 2K warmup, lambda 0.3, gamma 1e-3, alpha 1e-4) from p.22-23.
Step counts for the token-based phases assume 15360 x 4096 tokens per step.
"""

from deepseek_jax import config as config_lib


def get_config():
    c = config_lib.default_config_dict()
    c.model.update(
        vocab_size=129280,
        d_model=7168,
        n_layers=61,
        first_k_dense_replace=3,
        intermediate_size=18432,
        n_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=256,
        n_shared_experts=1,
        moe_intermediate_size=2048,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        score_func="sigmoid",
        topk_method="noaux_tc",
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        mtp_depth=1,
        init_std=0.006,
        compute_dtype="bfloat16",
        remat="full",
    )
    c.model.rope.update(
        scaling="yarn",
        factor=40.0,
        original_max_position=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    )
    tokens_per_step = 15360 * 4096
    c.train.update(
        seq_len=4096,
        global_batch_size=15360,
        steps=240_000,
        lr=2.2e-4,
        lr_final=2.2e-5,
        warmup_steps=2000,
        constant_steps=10_000_000_000_000 // tokens_per_step - 2000,
        decay_steps=4_300_000_000_000 // tokens_per_step,
        balance_alpha=1e-4,
    )
    c.train.mtp_lambda.update(
        values=(0.3, 0.1), boundaries=(10_000_000_000_000 // tokens_per_step,)
    )
    c.train.bias_update_rate.update(
        values=(1e-3, 0.0), boundaries=(14_300_000_000_000 // tokens_per_step,)
    )
    return c
