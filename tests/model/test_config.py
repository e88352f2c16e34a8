"""Config validation: bad values fail at construction, naming the field."""

import pytest

from deepseek_jax import config as experiment
from deepseek_jax.model import config as config_lib


@pytest.mark.parametrize(
    "override, message",
    [
        ({"n_group": 3}, "model.n_group: n_routed_experts=8 is not divisible by n_group=3"),
        ({"topk_group": 3}, "model.topk_group: topk_group=3 > n_group=2"),
        ({"num_experts_per_tok": 5}, "model.num_experts_per_tok: top-k=5 exceeds the 4 experts"),
        ({"d_model": 0}, "model.d_model: must be positive, got 0"),
        ({"n_heads": -2}, "model.n_heads: must be positive"),
        ({"q_lora_rank": 0}, "model.q_lora_rank: must be positive or None"),
        ({"qk_rope_head_dim": 7}, "model.qk_rope_head_dim: must be even"),
        ({"score_func": "relu"}, "model.score_func: unknown value 'relu'"),
        ({"remat": "sometimes"}, "model.remat: unknown value 'sometimes'"),
        ({"grouped_matmul": "fast"}, "model.grouped_matmul: unknown value 'fast'"),
        ({"rope": {"scaling": "ntk"}}, "model.rope.scaling: unknown value 'ntk'"),
        ({"score_func": "softmax"}, "model.topk_method: noaux_tc"),
        ({"no_such_field": 1}, "model.no_such_field: unknown field"),
        ({"attention": {"impl": "flash"}}, "model.attention.impl: unknown value 'flash'"),
        ({"attention": {"block_k": 0}}, "model.attention.block_k: must be positive, got 0"),
    ],
)
def test_invalid_model_config_names_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.ModelConfig.from_dict(override)


def test_round_trip_and_enums():
    cfg = config_lib.ModelConfig.from_dict(
        {
            "rope": {"scaling": "YARN"},
            "q_lora_rank": None,
            "compute_dtype": "bfloat16",
            "grouped_matmul": "tiled",
        }
    )
    assert cfg.grouped_matmul is config_lib.GroupedMatmul.TILED
    assert cfg.moe().grouped_matmul is config_lib.GroupedMatmul.TILED
    assert cfg.rope.scaling is config_lib.RopeScaling.YARN
    assert cfg.q_lora_rank is None
    assert cfg.attention.impl is config_lib.AttentionImpl.DENSE
    assert config_lib.ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_experiment_config_files_and_overrides():
    exp = experiment.load("configs/tiny.py", {"train.steps": 7, "model.n_layers": 4})
    assert exp.train.steps == 7 and exp.model.n_layers == 4
    exp = experiment.load("configs/tiny.py", {"model.attention.impl": "blockwise"})
    assert exp.model.mla().attention.impl is config_lib.AttentionImpl.BLOCKWISE
    with pytest.raises(ValueError, match="train.steps: must be positive"):
        experiment.load("configs/tiny.py", {"train.steps": 0})
    with pytest.raises(ValueError, match="checkpoint.keep_last"):
        experiment.load("configs/tiny.py", {"checkpoint.keep_last": 0})
    for name in ["small", "deepseek_v2_lite", "deepseek_v3_671b"]:
        assert experiment.load(f"configs/{name}.py").model.n_layers > 0
