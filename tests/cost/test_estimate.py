"""The cost estimate reproduces DeepSeek-V3's reported GPU-hours (V3 report p.5 Table 1) from the
trainer's FLOP counter, and the counter's attention term matches closed forms at 4K/32K/128K.

Reported: 2,664K H800 GPU-hours for 14.8T tokens at 4K, 119K for context extension (1000 steps of
1920 x 32K, then 1000 of 480 x 128K, V3 p.23), 5K post-training: 2,788K, $5.576M at $2/h.
"""

import dataclasses

import pytest

from deepseek_jax import config as experiment
from deepseek_jax import errors
from deepseek_jax.cost import devices, estimate, phases
from deepseek_jax.model import counting
from deepseek_jax.model.config import MatmulPolicy

H800 = devices.get("h800")
PRETRAIN = [phases.Phase("pretrain", 4096, 14.8e12)]
EXTENSION = [
    phases.Phase("32k", 32768, 32768 * 1920 * 1000),
    phases.Phase("128k", 131072, 131072 * 480 * 1000),
]


@pytest.fixture(scope="module")
def v3():
    return experiment.load("configs/deepseek_v3_671b.py").model


def attention_closed_form(m, seq_len: int, layers: int) -> float:
    """Training FLOPs per token of causal MLA attention, from the head shapes alone: per layer and
    head, QK^T contracts over the nope+rope query/key dims and PV over v_head_dim, each a
    multiply-add (2) against seq_len/2 keys on average (causal), times 3 for forward + backward."""
    d_qk = m.qk_nope_head_dim + m.qk_rope_head_dim  # 128 + 64: the decoupled RoPE key included
    return 3 * 2 * (seq_len / 2) * m.n_heads * (d_qk + m.v_head_dim) * layers


@pytest.mark.parametrize(
    "seq_len, published", [(4096, 30.7e9), (32768, 245.6e9), (131072, 982.5e9)]
)
def test_attention_term_closed_form(v3, seq_len, published):
    c = counting.count(v3, seq_len)
    assert c.attention_flops_per_token == attention_closed_form(v3, seq_len, v3.n_layers)
    assert c.attention_flops_per_token == pytest.approx(published, rel=1e-3)


def test_long_context_grows_by_attention_alone_mtp_block_included(v3):
    """Between 4K and 128K only attention changes, in the 61 main layers and the MTP block."""
    short, long = counting.count(v3, 4096), counting.count(v3, 131072)
    layers = v3.n_layers + v3.mtp_depth
    growth = attention_closed_form(v3, 131072, layers) - attention_closed_form(v3, 4096, layers)
    assert long.train_flops_per_token - short.train_flops_per_token == pytest.approx(growth, 1e-12)
    assert long.train_flops_per_token_no_mtp - short.train_flops_per_token_no_mtp == pytest.approx(
        attention_closed_form(v3, 131072, 61) - attention_closed_form(v3, 4096, 61), 1e-12
    )


def test_phase_flops_are_the_trainers_counter(v3):
    est = estimate.estimate(v3, EXTENSION, H800, mfu=0.3)
    for p in est.phases:
        assert p.flops == p.phase.tokens * counting.count(v3, p.phase.seq_len).train_flops_per_token
        assert p.device_hours == pytest.approx(p.flops / (0.3 * 989.4e12 * 3600), rel=1e-12)


def test_pretraining_implied_mfu(v3):
    """2,664K GPU-hours imply 40.6-40.7% of the H800's dense BF16 peak with MTP (260.6 GFLOP/token),
    39.1% without (250.4): the facts sheet's §5.1 arithmetic."""
    inv = estimate.inverse(v3, PRETRAIN, H800, 2664e3)
    assert 0.4060 < inv["mfu"] < 0.4070
    assert inv["mfu"] == pytest.approx(14.8e12 * 260.6e9 / (2664e3 * 3600 * 989.4e12), rel=1e-3)
    assert inv["mfu_no_mtp"] == pytest.approx(0.3906, abs=5e-4)
    assert inv["flops_per_s_per_device"] == pytest.approx(402.2e12, rel=1e-3)


def test_pretraining_hours_at_the_printed_mfu(v3):
    est = estimate.estimate(v3, PRETRAIN, H800, mfu=0.4065)
    assert est.device_hours == pytest.approx(2664e3, rel=1e-3)
    assert est.device_hours / 14.8 == pytest.approx(180e3, rel=1e-3)  # per trillion tokens
    assert est.device_hours / 2048 / 24 == pytest.approx(54.2, abs=0.05)


def test_context_extension(v3):
    """At its own MFU (~25%, about 0.62x pretraining's: 32K/128K attention is harder to run at
    peak), the two phases take 119K +- 2%. Without MTP, the reference sheet's independently
    computed 24.9% gives the same within the tolerance."""
    inv = estimate.inverse(v3, EXTENSION, H800, 119e3)
    assert 0.250 < inv["mfu"] < 0.257
    est = estimate.estimate(v3, EXTENSION, H800, mfu=0.2534)
    assert est.device_hours == pytest.approx(119e3, rel=0.02)
    no_mtp = estimate.estimate(dataclasses.replace(v3, mtp_depth=0), EXTENSION, H800, mfu=0.249)
    assert no_mtp.device_hours == pytest.approx(119e3, rel=0.02)
    # one MFU for every phase under-predicts context extension by ~38%
    one_rate = estimate.estimate(v3, EXTENSION, H800, mfu=0.4065)
    assert one_rate.device_hours / 119e3 == pytest.approx(0.62, abs=0.02)


def test_total_and_dollars(v3):
    est = estimate.estimate(
        v3,
        [
            phases.Phase("pretrain", 4096, 14.8e12, 0.4065),
            *(phases.Phase(p.name, p.seq_len, p.tokens, 0.2534) for p in EXTENSION),
        ],
        H800,
        fixed=[phases.FixedHours("post-training", 5e3)],
    )
    assert est.device_hours == pytest.approx(2788e3, rel=2e-4)
    assert est.device_hours * 2 == pytest.approx(5.576e6, rel=2e-4)


def test_fp8_peak_halves_the_mfu(v3):
    bf16 = estimate.inverse(v3, PRETRAIN, H800, 2664e3)
    fp8 = estimate.inverse(v3, PRETRAIN, H800, 2664e3, devices.Peak.FP8)
    assert fp8["mfu"] == pytest.approx(bf16["mfu"] * 989.4 / 1978.9, rel=1e-9)


@pytest.mark.parametrize(
    "policy, choice, peak",
    [
        ("default", "auto", "bf16"),
        ("bf16", "auto", "bf16"),
        ("fp8_blockwise", "auto", "fp8"),
        ("fp8_blockwise_pow2", "auto", "fp8"),
        ("fp8_blockwise", "bf16", "bf16"),  # an explicit --peak wins
        ("default", "fp8", "fp8"),
    ],
)
def test_peak_follows_the_matmul_policy_unless_given(policy, choice, peak):
    got, why = estimate.peak_for(MatmulPolicy(policy), devices.PeakChoice(choice))
    assert got is devices.Peak(peak)
    assert why == (
        f"--peak=auto: model.matmul_policy={policy}" if choice == "auto" else f"--peak={choice}"
    )


def test_phase_without_mfu_is_an_error(v3):
    with pytest.raises(errors.UserError, match="--phase pretrain: no MFU"):
        estimate.estimate(v3, PRETRAIN, H800)
