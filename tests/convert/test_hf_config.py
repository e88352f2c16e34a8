"""config.json -> ModelConfig: transformers' defaults for absent keys, official keys, rejections."""

from __future__ import annotations

import pytest

from deepseek_jax.convert import hf_config
from deepseek_jax.model import config as config_lib
from tests.convert import helpers

OFFICIAL_V3 = {  # the official DeepSeek-V3 config.json, sizes shrunk
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "qk_nope_head_dim": 16,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


def test_official_config():
    cfg = hf_config.from_hf_config(OFFICIAL_V3)
    assert cfg.rope == helpers.YARN and cfg.mtp_depth == 1 and cfg.first_k_dense_replace == 3
    assert (cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (8, 4, 8)
    assert cfg.topk_method is config_lib.TopkMethod.NOAUX_TC


def test_absent_keys_mean_transformers_defaults():
    import transformers

    d = transformers.DeepseekV3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=16,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        v_head_dim=16,
        qk_nope_head_dim=16,
    ).to_dict()
    for key in (
        "first_k_dense_replace",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "num_nextn_predict_layers",
        "num_mtp_layers",
        "routed_scaling_factor",
    ):
        d.pop(key, None)
    cfg = hf_config.from_hf_config(d)
    assert (cfg.first_k_dense_replace, cfg.n_group, cfg.topk_group) == (3, 8, 4)
    assert cfg.norm_topk_prob and cfg.routed_scaling_factor == 2.5 and cfg.mtp_depth == 1
    assert cfg.rope.scaling is config_lib.RopeScaling.NONE  # HF's default is plain RoPE


@pytest.mark.parametrize("name", sorted(helpers.CONFIGS))
def test_round_trip(name):
    cfg = helpers.CONFIGS[name]
    assert hf_config.from_hf_config(hf_config.to_hf_config(cfg)) == cfg


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"model_type": "llama"}, "unsupported model_type 'llama'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"rope_interleave": False}, "rope_interleave=false"),
        ({"num_key_value_heads": 1}, "num_key_value_heads=1"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling type 'linear'"),
        ({"rope_scaling": {"type": "yarn"}}, "without a 'factor'"),
        ({"hidden_size": None}, "missing required key 'hidden_size'"),
    ],
)
def test_rejects(change, needle):
    with pytest.raises(ValueError, match="config.json") as err:
        hf_config.from_hf_config({**OFFICIAL_V3, **change})
    assert needle in str(err.value)
