"""RoPE on interleaved pairs and YaRN, against closed forms from the reference notes."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import rope

V3_ROPE = config_lib.RopeConfig(
    scaling=config_lib.RopeScaling.YARN,
    factor=40.0,
    original_max_position=4096,
    beta_fast=32,
    beta_slow=1,
)


def test_yarn_frequencies_v3():
    plain = rope.inv_frequencies(config_lib.RopeConfig(), 64)
    yarn = rope.inv_frequencies(V3_ROPE, 64)
    ratio = yarn / plain
    np.testing.assert_allclose(ratio[:11], 1.0, rtol=1e-6)  # low = 10: kept
    np.testing.assert_allclose(ratio[23:], 1 / 40, rtol=1e-6)  # high = 23: interpolated
    assert np.all((ratio[11:23] < 1) & (ratio[11:23] > 1 / 40))  # blended in between
    assert np.all(np.diff(ratio[10:24]) < 0)


def test_softmax_scale_matches_reference_values():
    v3 = config_lib.ModelConfig(qk_nope_head_dim=128, qk_rope_head_dim=64, rope=V3_ROPE).mla()
    assert abs(rope.softmax_scale(v3) - 0.1352338) < 1e-7
    v2 = dataclasses.replace(
        v3, rope=dataclasses.replace(V3_ROPE, mscale=0.707, mscale_all_dim=0.707)
    )
    assert abs(rope.softmax_scale(v2) - 0.1147214) < 1e-7
    plain = dataclasses.replace(v3, rope=config_lib.RopeConfig())
    assert abs(rope.softmax_scale(plain) - 192**-0.5) < 1e-9
    assert rope.cos_sin_factor(V3_ROPE) == 1.0
    assert (
        abs(
            rope.cos_sin_factor(dataclasses.replace(V3_ROPE, mscale_all_dim=0.707))
            - (0.1 * np.log(40) + 1) / (0.0707 * np.log(40) + 1)
        )
        < 1e-9
    )


def test_apply_rope_is_complex_rotation_of_adjacent_pairs():
    cfg = config_lib.RopeConfig(theta=100.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)  # [B, S, H, R]
    pos = np.broadcast_to(np.arange(5)[None], (2, 5))
    cos, sin = rope.cos_sin(cfg, 8, jnp.asarray(pos))
    got = np.asarray(rope.apply_rope(jnp.asarray(x), cos, sin))
    z = x[..., 0::2] + 1j * x[..., 1::2]
    angle = pos[..., None, None] * rope.inv_frequencies(cfg, 8)[None, None, None, :]
    want_z = z * np.exp(1j * angle)
    want = np.stack([want_z.real, want_z.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cfg = V3_ROPE
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 16)).astype(np.float32)

    def score(pq, pk):
        cq, sq = rope.cos_sin(cfg, 16, jnp.asarray([[pq]]))
        ck, sk = rope.cos_sin(cfg, 16, jnp.asarray([[pk]]))
        a = rope.apply_rope(jnp.asarray(q)[None, None], cq, sq)
        b = rope.apply_rope(jnp.asarray(k)[None, None], ck, sk)
        return float((a * b).sum())

    assert abs(score(7, 3) - score(107, 103)) < 1e-4
    assert abs(score(7, 3) - score(3, 7)) > 1e-3
