"""The `--phase` / `--add_hours` syntax."""

import pytest

from deepseek_jax import errors
from deepseek_jax.cost import phases


@pytest.mark.parametrize(
    "spec, want",
    [
        ("4096:14.8e12", phases.Phase("seq 4096", 4096, 14.8e12)),
        ("4096:14.8T:0.4", phases.Phase("seq 4096", 4096, 14.8e12, 0.4)),
        ("pretrain:4096:14.8T:1", phases.Phase("pretrain", 4096, 14.8e12, 1.0)),
        ("ext-32k:32768:1920x1000:0.25", phases.Phase("ext-32k", 32768, 32768 * 1920e3, 0.25)),
        ("131072:62.9B", phases.Phase("seq 131072", 131072, 62.9e9)),
        ("8192:500k", phases.Phase("seq 8192", 8192, 5e5)),
    ],
)
def test_parse(spec, want):
    got = phases.parse_phase(spec)
    assert got.name == want.name and got.seq_len == want.seq_len and got.mfu == want.mfu
    assert got.tokens == pytest.approx(want.tokens, rel=1e-12)


@pytest.mark.parametrize(
    "spec, why",
    [
        ("4096", "expected"),
        ("a:b:c:d:e", "expected"),
        ("4K:14.8T", "SEQ_LEN must be a positive integer"),
        ("0:14.8T", "SEQ_LEN must be a positive integer"),
        ("4096:-5", "tokens must be > 0"),
        ("4096:many", "tokens 'many' is not a number"),
        ("4096:1920x-3", "steps must be > 0"),
        ("4096:14.8T:0", r"MFU must be in \(0, 1\]"),
        ("4096:14.8T:40", r"MFU must be in \(0, 1\]"),
        ("4096:14.8T:nan", "not finite"),
    ],
)
def test_malformed_phase_names_the_flag(spec, why):
    with pytest.raises(errors.UserError, match=rf"^--phase={spec}: .*{why}"):
        phases.parse_phase(spec)


def test_fixed_hours():
    assert phases.parse_fixed("post-training:5e3") == phases.FixedHours("post-training", 5e3)
    assert phases.parse_fixed("sft:5K").hours == 5e3
    for bad in ("5e3", "post:-1", ":5", "post:x"):
        with pytest.raises(errors.UserError, match=rf"^--add_hours={bad}: "):
            phases.parse_fixed(bad)
