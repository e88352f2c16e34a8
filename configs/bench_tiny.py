"""The MaxText-tiny DeepSeek-V3 shape of the train-step benchmarks (issue 12), MTP off.

    python bench/vs_torch.py                       # ours vs transformers on this shape
    python bench/train_step.py --config=configs/bench_tiny.py --breakdown

vocab 32768, d_model 256, 4 layers (1 dense), 4 heads, MLA q_lora 64 / kv_lora 32 / nope 32 /
rope 16 / v 32, 8 routed experts top-2 + 1 shared, groups 4/2; seq 256 x batch 4, float32.
bench/vs_torch.py --variant=moe-heavy overrides vocab 258, 32 experts top-4, moe_intermediate 64.
"""

from deepseek_jax import config as config_lib


def get_config():
    c = config_lib.default_config_dict()
    c.model.update(
        vocab_size=32768,
        d_model=256,
        n_layers=4,
        first_k_dense_replace=1,
        intermediate_size=512,
        n_heads=4,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=128,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        mtp_depth=0,
    )
    c.train.update(global_batch_size=4, seq_len=256, lr=1e-3, warmup_steps=10)
    return c
