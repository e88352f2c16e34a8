"""CPU benchmark size: ~100M total parameters, still MLA + MoE (group-limited) + MTP.

python bench/train_step.py --config=configs/small.py
"""

from deepseek_jax import config as config_lib


def get_config():
    c = config_lib.default_config_dict()
    c.model.update(
        vocab_size=258,
        d_model=512,
        n_layers=8,
        first_k_dense_replace=1,
        intermediate_size=1408,
        n_heads=8,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        n_shared_experts=1,
        moe_intermediate_size=256,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        mtp_depth=1,
    )
    c.train.update(steps=1000, global_batch_size=8, seq_len=256, lr=1e-3, warmup_steps=100)
    return c
