"""Blockwise (flash-style) attention = the dense core: values and gradients (causal, q_offset
static and traced, packed segments, padding for blocks that do not divide the sequence, float32
and float64); causal blocks skipped; memory linear in the sequence length (compiled analysis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.model import attention, blockwise, mla, rope
from deepseek_jax.model import config as config_lib

H, N, R, V = 3, 8, 4, 6  # q/k head dim N + R = 12 differs from v head dim 6, as in MLA
SCALE = 0.37


def inputs(B, S, T, dtype, seed=0, H=H, N=N, R=R, V=V):
    ks = jax.random.split(jax.random.key(seed), 5)
    shapes = [(B, S, H, N), (B, S, H, R), (B, T, H, N), (B, T, R), (B, T, H, V)]
    return tuple(jax.random.normal(k, s, dtype) for k, s in zip(ks, shapes))


def packed(B, T, seed=0):
    """Sorted sample ids per row (2-4 samples of random lengths), as packing produces."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)


def values_and_grads(fns, args, dtype):
    """[(out, input cotangents for a generic output cotangent w)] per fn, in one compile."""
    w = jax.random.normal(jax.random.key(7), jax.eval_shape(fns[0], *args).shape, dtype)

    def run(*a):
        results = []
        for f in fns:
            out, vjp = jax.vjp(f, *a)
            results.append((out, vjp(w)))
        return results

    return jax.jit(run)(*args)


# (S, T, q_offset, block_q, block_k, segments)
CASES = [
    (16, 16, 0, 4, 4, False),  # square blocks, several of them
    (13, 13, 0, 4, 5, False),  # blocks divide neither S nor T: padded
    (6, 16, 10, 4, 4, False),  # a chunk of queries at an offset into the keys
    (16, 16, 0, 4, 8, True),  # packed samples
    (7, 20, 9, 3, 4, True),  # offset, segments and padding together
    (8, 8, 0, 64, 64, False),  # one block larger than the sequence
]


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.float64, 1e-12)])
@pytest.mark.parametrize("S, T, q_offset, block_q, block_k, segments", CASES)
def test_blockwise_equals_dense(S, T, q_offset, block_q, block_k, segments, dtype, tol):
    with jax.enable_x64(dtype == jnp.float64):
        args = inputs(2, S, T, dtype)
        seg = packed(2, T) if segments else None

        def dense(*a):
            return attention.mla_attention(*a, SCALE, q_offset, seg)

        def blocked(*a):
            return blockwise.blockwise_attention(
                *a, SCALE, q_offset, seg, block_q=block_q, block_k=block_k
            )

        (want, want_grads), (got, got_grads) = values_and_grads([dense, blocked], args, dtype)
        assert got.dtype == want.dtype and got.shape == (2, S, H, V)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        for name, a, b in zip(["q_nope", "q_rope", "k_nope", "k_rope", "v"], got_grads, want_grads):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)


def test_traced_q_offset_one_compile():
    args = inputs(1, 4, 16, jnp.float32)

    @jax.jit
    def both(q_offset, *a):
        blocked = blockwise.blockwise_attention(*a, SCALE, q_offset, block_q=2, block_k=4)
        return blocked, attention.mla_attention(*a, SCALE, q_offset)

    for q_offset in [0, 5, 12]:
        got, want = both(jnp.int32(q_offset), *args)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_segments_equal_separate_samples():
    """Packing [a | b] gives each sample exactly what it gets alone (an independent reference for
    the segment mask of both paths)."""
    S, cut = 12, 5
    args = inputs(1, S, S, jnp.float32, seed=3)
    seg = jnp.asarray([[0] * cut + [1] * (S - cut)], jnp.int32)
    for fn in [
        lambda *a, seg=None: attention.mla_attention(*a, SCALE, 0, seg),
        lambda *a, seg=None: blockwise.blockwise_attention(*a, SCALE, 0, seg, block_q=4, block_k=4),
    ]:
        out = fn(*args, seg=seg)
        first = fn(*(x[:, :cut] for x in args))
        second = fn(*(x[:, cut:] for x in args))
        np.testing.assert_allclose(out[:, :cut], first, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[:, cut:], second, rtol=1e-5, atol=1e-6)


def test_blocks_above_the_diagonal_are_not_computed():
    """NaN values in the last key block: dense attention multiplies them by probability 0 for
    every query (NaN everywhere); blockwise never reads that block for earlier query blocks."""
    args = list(inputs(1, 16, 16, jnp.float32))
    args[4] = args[4].at[:, 12:].set(jnp.nan)
    dense = attention.mla_attention(*args, SCALE)
    assert bool(jnp.isnan(dense[:, :12]).all())
    out = blockwise.blockwise_attention(*args, SCALE, block_q=4, block_k=4)
    assert bool(jnp.isfinite(out[:, :12]).all()) and bool(jnp.isnan(out[:, 12:]).all())
    g_v = jax.grad(
        lambda v: jnp.sum(blockwise.blockwise_attention(*args[:4], v, SCALE, block_q=4, block_k=4))
    )(args[4].at[:, 12:].set(0.0))
    np.testing.assert_array_equal(np.asarray(jnp.isfinite(g_v)), True)


def temp_bytes(fn, S):
    args = inputs(1, S, S, jnp.float32, H=2, N=16, R=8, V=16)
    grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=range(5))
    return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_is_linear_in_sequence_length():
    """Compiled temp memory of forward+backward at S and 4S: dense grows with S^2 (the saved
    probabilities), blockwise by the factor 4 of its O(S) buffers."""

    def dense(*a):
        return attention.mla_attention(*a, SCALE)

    def blocked(*a):
        return blockwise.blockwise_attention(*a, SCALE, block_q=128, block_k=128)

    d1, d4 = temp_bytes(dense, 512), temp_bytes(dense, 2048)
    b1, b4 = temp_bytes(blocked, 512), temp_bytes(blocked, 2048)
    assert d4 / d1 > 8, (d1, d4)
    assert b4 / b1 < 4.5, (b1, b4)
    assert b4 < 2048 * 2048 * 4, b4  # less than one [S, S] float32 plane at 4S (dense: several)


def test_attend_dispatches_on_the_config():
    args = inputs(1, 8, 8, jnp.float32)
    dense_cfg = config_lib.AttentionConfig()
    blocked_cfg = config_lib.AttentionConfig(config_lib.AttentionImpl.BLOCKWISE, 4, 2)
    np.testing.assert_array_equal(
        attention.attend(dense_cfg, *args, SCALE), attention.mla_attention(*args, SCALE)
    )
    np.testing.assert_array_equal(
        attention.attend(blocked_cfg, *args, SCALE),
        blockwise.blockwise_attention(*args, SCALE, block_q=4, block_k=2),
    )


def test_bfloat16_inputs():
    """bf16 operands, float32 statistics: the output is bf16 and within bf16 rounding of the
    float32 dense result."""
    args = inputs(1, 24, 24, jnp.float32)
    want = attention.mla_attention(*args, SCALE)
    low = [x.astype(jnp.bfloat16) for x in args]
    got = blockwise.blockwise_attention(*low, SCALE, block_q=8, block_k=8)
    g = jax.grad(lambda q: jnp.sum(blockwise.blockwise_attention(q, *low[1:], SCALE, block_q=8)))
    assert got.dtype == jnp.bfloat16 and g(low[0]).dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("impl", list(config_lib.AttentionImpl))
def test_mla_layer_with_packed_segments(impl):
    """The MLA layer over packed [a | b] with segment ids gives each sample what the layer gives
    it alone (same rope tables): no attention across samples, in either implementation."""
    cfg = config_lib.ModelConfig(
        d_model=16, n_heads=2, kv_lora_rank=8, q_lora_rank=None, v_head_dim=4, init_std=0.5,
        attention=config_lib.AttentionConfig(impl, block_q=4, block_k=4),
    ).mla()  # fmt: skip
    layer = mla.MLA(cfg, rngs=nnx.Rngs(0))
    S, cut = 10, 3
    x = jax.random.normal(jax.random.key(1), (1, S, 16))
    cos, sin = rope.cos_sin(cfg.rope, cfg.qk_rope_head_dim, jnp.arange(S)[None])
    seg = jnp.asarray([[0] * cut + [1] * (S - cut)], jnp.int32)
    out = layer(x, cos, sin, segment_ids_BS=seg)
    np.testing.assert_allclose(
        out[:, :cut], layer(x[:, :cut], cos[:, :cut], sin[:, :cut]), atol=1e-6
    )
    np.testing.assert_allclose(
        out[:, cut:], layer(x[:, cut:], cos[:, cut:], sin[:, cut:]), atol=1e-6
    )
    unpacked = layer(x, cos, sin)[:, cut:]  # the same rows attending across the boundary
    assert np.abs(out[:, cut:] - unpacked).max() > 0.1 * np.abs(unpacked).max()
