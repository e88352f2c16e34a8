"""Parameter/FLOP counts from abstract shapes against closed-form formulas and published figures."""

import json
import subprocess
import sys

import pytest

from deepseek_jax import config as experiment
from deepseek_jax.model import counting


def formula_total(m) -> int:
    """Closed form from the config (hf_checkpoint_format.md §1 shapes), main model, no MTP."""
    D, H = m.d_model, m.n_heads
    N, R, V, C, Q = (
        m.qk_nope_head_dim,
        m.qk_rope_head_dim,
        m.v_head_dim,
        m.kv_lora_rank,
        m.q_lora_rank,
    )
    q = D * H * (N + R) if Q is None else D * Q + Q + Q * H * (N + R)
    attn = q + D * (C + R) + C + C * H * (N + V) + H * V * D
    norms = 2 * D
    dense = 3 * D * m.intermediate_size
    E, F, S = m.n_routed_experts, m.moe_intermediate_size, m.n_shared_experts
    moe = D * E + 3 * E * D * F + 3 * D * S * F
    L, K = m.n_layers, m.first_k_dense_replace
    return 2 * m.vocab_size * D + D + K * (attn + norms + dense) + (L - K) * (attn + norms + moe)


@pytest.mark.parametrize(
    "name, total, active",
    [
        ("deepseek_v3_671b", 671.0e9, 37.5e9),
        ("deepseek_v2_lite", 15.7e9, 2.66e9),
    ],
)
def test_full_size_counts(name, total, active):
    exp = experiment.load(f"configs/{name}.py")
    c = counting.count(exp.model, exp.train.seq_len)  # eval_shape of the real model
    assert c.total_params == formula_total(exp.model)
    assert abs(c.total_params / total - 1) < 1e-3
    assert abs(c.active_params / active - 1) < 5e-3


def test_v3_figures_match_published_arithmetic():
    exp = experiment.load("configs/deepseek_v3_671b.py")
    c = counting.count(exp.model, 4096)
    assert abs(c.mtp_params / 11.61e9 - 1) < 1e-3  # README_WEIGHTS: 11.5B unique
    assert abs(c.train_flops_per_token_no_mtp / 250.4e9 - 1) < 1e-3
    assert abs(c.train_flops_per_token / 260.6e9 - 1) < 1e-3
    assert c.kv_cache_bytes_per_token == 576 * 61 * 2 == 70272
    assert c.mha_kv_cache_bytes_per_token == 2 * 128 * 128 * 61 * 2


def test_info_command_json():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_jax.info",
            "--config=configs/deepseek_v3_671b.py",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    d = json.loads(out.stdout)
    for key in [
        "total_params",
        "active_params",
        "mtp_params",
        "kv_cache_bytes_per_token",
        "mha_kv_cache_bytes_per_token",
        "train_flops_per_token",
    ]:
        assert key in d
    assert abs(d["total_params"] / 671.0e9 - 1) < 1e-3
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_jax.info",
            "--config=configs/tiny.py",
            "--config.model.n_group=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "model.n_group" in bad.stderr
