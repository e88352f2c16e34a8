"""The FP8 recipe's numerics (model/fp8.py): quantizers, the GEMM against a float64 reference of
its dequantized operands, the backward GEMMs, why FP32 promotion every 128 elements matters, and
the precision policies' dispatch."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.model import fp8, grouped, precision

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def outliers(key, shape, scale=1.0):
    """Gaussian with a few channels 100x larger: what per-tile scaling is for."""
    x = scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)
    return x.at[..., ::37].multiply(100.0)


def np_quantize(x, tile, pow2=False, s=None):
    """Independent numpy quantizer: zero-pad to whole tiles, amax per tile, cut back; q from the
    given scales `s` if any."""
    x = np.asarray(x, np.float64)
    grid = [-(-n // t) for n, t in zip(x.shape, tile)]
    padded = np.zeros([g * t for g, t in zip(grid, tile)])
    padded[tuple(slice(0, n) for n in x.shape)] = x
    blocks = padded.reshape([d for g, t in zip(grid, tile) for d in (g, t)])
    amax = np.abs(blocks).max(axis=tuple(range(1, blocks.ndim, 2)))
    if s is None:
        s = np.maximum(amax / 448.0, np.finfo(np.float32).tiny).astype(np.float32)
        if pow2:
            s = np.exp2(np.ceil(np.log2(s))).astype(np.float32)
    full = np.asarray(s)
    for axis, t in enumerate(tile):
        full = np.repeat(full, t, axis=axis)
    full = full[tuple(slice(0, n) for n in x.shape)]
    q = (x.astype(np.float32) / full).astype(E4M3)
    return q, s, full


@pytest.mark.parametrize("pow2", [False, True])
def test_quantizers_match_the_definition_with_partial_edge_tiles(pow2):
    x = outliers(0, (3, 200, 300))
    for tile in [fp8.tiles_along(3, -1), fp8.tiles_along(3, 1), fp8.blocks(3)]:
        q, s = fp8.quantize(x, tile, pow2=pow2)
        q_ref, s_ref, _ = np_quantize(x, tile, pow2)
        assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
        assert s.shape == tuple(-(-n // t) for n, t in zip(x.shape, tile))
        # XLA divides by 448 as a multiply by its float32 reciprocal: at most one ulp apart.
        np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1.2e-7, atol=0)
        q_ref = np_quantize(x, tile, s=s)[0]
        np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))
        if pow2:
            assert np.all(np.log2(np.asarray(s)) == np.round(np.log2(np.asarray(s))))
    # The edge tile (columns 256..299) is scaled by its own 44 elements' amax.
    _, s = fp8.quantize(x, fp8.tiles_along(3, -1))
    np.testing.assert_allclose(s[..., 2], np.abs(x[..., 256:]).max(-1) / 448.0, rtol=1e-6)


@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_error_per_tile_is_within_2_to_the_minus_4(pow2):
    x = outliers(1, (64, 1000))
    tile = fp8.tiles_along(2, 1)
    back = np.asarray(fp8.fake_quant(x, tile, pow2=pow2), np.float64)
    err = np.abs(back - np.asarray(x, np.float64))
    for j in range(0, 1000, 128):  # relative to each tile's amax: E4M3 rounds to 3 mantissa bits
        amax = np.abs(np.asarray(x)[:, j : j + 128]).max(-1)
        assert np.all(err[:, j : j + 128].max(-1) <= 2.0**-4 * amax)
    # Elementwise too, wherever x / scale is an E4M3 normal number (>= 2^-6): half an ulp of a
    # 3-bit mantissa is at most 2^-4 of the value.
    s_full = np.repeat(np.asarray(fp8.quantize(x, tile, pow2=pow2)[1]), 128, axis=1)[:, :1000]
    normal = np.abs(np.asarray(x)) >= 2.0**-6 * s_full
    assert normal.mean() > 0.9
    assert np.all(err[normal] <= 2.0**-4 * np.abs(np.asarray(x, np.float64))[normal])
    zeros = fp8.fake_quant(jnp.zeros((2, 130)), tile)
    assert np.all(np.asarray(zeros) == 0)


def deq(t, tile):
    """The operand as the FP8 GEMM sees it (the quantizer itself is checked above), in float64."""
    return np.asarray(fp8.fake_quant(t, tile), np.float64)


def test_gemm_equals_float64_einsum_of_dequantized_operands():
    x = outliers(2, (96, 640))
    w = 0.02 * jax.random.normal(jax.random.key(3), (640, 200))
    y = np.asarray(fp8.matmul(x, w, fp8.E4M3_BLOCKWISE), np.float64)
    want = np.einsum("mk,kn->mn", deq(x, (1, 128)), deq(w, (128, 128)))
    assert np.linalg.norm(y - want) / np.linalg.norm(want) <= 1e-6
    # ... and the FP8 product is a few percent from the exact one, not more (E4M3's 3 bits).
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert 0.005 < np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.05


def test_dot_general_flattens_linear_contractions():
    x = jax.random.normal(jax.random.key(4), (2, 5, 4, 48))  # [B, S, H, V] into wo
    w = 0.1 * jax.random.normal(jax.random.key(5), (4, 48, 160))  # [H, V, D]
    dims = (((2, 3), (0, 1)), ((), ()))
    y = fp8.dot_general(x, w, dims, fp8.E4M3_BLOCKWISE)
    want = fp8.matmul(x.reshape(10, 192), w.reshape(192, 160), fp8.E4M3_BLOCKWISE).reshape(
        2, 5, 160
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    with pytest.raises(ValueError, match="trailing dims"):
        fp8.dot_general(x, w, (((2, 3), (0, 1)), ((0,), (0,))), fp8.E4M3_BLOCKWISE)


def accumulate(a, b, mantissa_bits, promote_every=None):
    """a @ b (float64 inputs) with the running sum rounded to `mantissa_bits` after every add
    (truncation, as the tensor cores' aligned adds do); with `promote_every`, the limited sum
    restarts every that many products and is added into a float64 accumulator."""

    def rnd(v):
        m, e = np.frexp(v)
        return np.ldexp(np.trunc(m * 2.0**mantissa_bits) / 2.0**mantissa_bits, e)

    K = a.shape[1]
    step = promote_every or K
    total = np.zeros((a.shape[0], b.shape[1]))
    for k0 in range(0, K, step):
        acc = np.zeros_like(total)
        for k in range(k0, min(k0 + step, K)):
            acc = rnd(acc + np.outer(a[:, k], b[k]))
        total += acc
    return total


def test_promotion_every_128_elements_rescues_a_14_bit_accumulator_at_k_4096():
    # H800 FP8 tensor cores keep ~14 bits of the running sum (V3 report §3.3.2); at K = 4096 that
    # alone costs ~percent-level error. Promoting to FP32 every 128 products bounds it.
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal((8, 4096)))  # same-sign products: the sum grows with K
    b = np.abs(rng.standard_normal((4096, 8)))
    exact = a @ b
    rel = lambda y: np.abs(y - exact).max() / np.abs(exact).max()  # noqa: E731
    without = rel(accumulate(a, b, 14))
    with_promotion = rel(accumulate(a, b, 14, promote_every=128))
    assert without > 1e-3  # the failure the recipe fixes
    assert with_promotion < without / 8


def analytic_grads(x, w, dy):
    """dL/dx and dL/dw of the FP8 GEMM: the dequantized operands of each backward GEMM."""
    dx = deq(dy, (1, 128)) @ deq(w, (128, 128)).T
    dw = deq(x, (128, 1)).T @ deq(dy, (128, 1))
    return dx, dw


def test_backward_gemms_are_fp8_with_tiles_along_their_contraction():
    x = outliers(6, (300, 256))
    w = 0.05 * jax.random.normal(jax.random.key(7), (256, 200))
    dy = outliers(8, (300, 200), scale=1e-5)  # activation gradients are small
    _, vjp = jax.vjp(lambda x, w: fp8.matmul(x, w, fp8.E4M3_BLOCKWISE), x, w)
    dx, dw = vjp(dy)
    want_dx, want_dw = analytic_grads(x, w, dy)
    for got, want in [(dx, want_dx), (dw, want_dw)]:
        got = np.asarray(got, np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-6
    exact_dx = np.asarray(dy, np.float64) @ np.asarray(w, np.float64).T
    assert np.linalg.norm(np.asarray(dx) - exact_dx) / np.linalg.norm(exact_dx) < 0.05


@pytest.mark.parametrize("impl", list(grouped.GroupedMatmul)[1:])  # every kernel but AUTO
def test_grouped_gemm_forward_and_backward_per_expert(impl):
    """Through the policy seam, on each grouped kernel the model can run."""
    sizes = [100, 0, 170, 30]
    gs = jnp.asarray(sizes, jnp.int32)
    x = outliers(9, (300, 256))
    w = 0.05 * jax.random.normal(jax.random.key(10), (4, 256, 136))
    dy = outliers(11, (300, 136), scale=1e-3)
    policy = precision.MatmulPolicy.FP8_BLOCKWISE
    y, vjp = jax.vjp(lambda x, w: precision.grouped_matmul(x, w, gs, policy, impl), x, w)
    dx, dw = vjp(dy)
    xq, dyq_f = deq(x, (1, 128)), deq(dy, (1, 128))
    xq_z, dyq_z = deq(x, (128, 1)), deq(dy, (128, 1))  # row windows of the sorted buffer
    wq = deq(w, (1, 128, 128))
    want_y, want_dx, want_dw = np.zeros((300, 136)), np.zeros((300, 256)), np.zeros(w.shape)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        want_y[rows] = xq[rows] @ wq[e]
        want_dx[rows] = dyq_f[rows] @ wq[e].T
        want_dw[e] = xq_z[rows].T @ dyq_z[rows]
        start += n
    for got, want in [(y, want_y), (dx, want_dx), (dw, want_dw)]:
        got = np.asarray(got, np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-6
    assert np.all(np.asarray(dw[1]) == 0)  # an expert without rows gets no gradient


def test_policies_dispatch_and_keep_the_input_dtype():
    x = jax.random.normal(jax.random.key(12), (4, 130), jnp.float32)
    w = jax.random.normal(jax.random.key(13), (130, 70), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    errs = {}
    for policy in precision.MatmulPolicy:
        y = precision.dot_general(x, w, dims, policy)
        assert y.dtype == jnp.float32
        errs[policy] = np.linalg.norm(np.asarray(y) - exact) / np.linalg.norm(exact)
    P = precision.MatmulPolicy
    assert errs[P.DEFAULT] < 1e-6 < errs[P.BF16] < 1e-2 < errs[P.FP8_BLOCKWISE] < 0.06
    bf16 = precision.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dims, P.BF16)
    assert bf16.dtype == jnp.bfloat16
    gs = jnp.asarray([1, 3], jnp.int32)
    w_e = jnp.stack([w, -w])
    G = grouped.GroupedMatmul
    ref = precision.grouped_matmul(x, w_e, gs, impl=G.RAGGED_DOT)
    for impl in [G.RAGGED_DOT, G.TILED]:
        for policy in [P.BF16, P.FP8_BLOCKWISE, P.FP8_BLOCKWISE_POW2]:
            y = precision.grouped_matmul(x, w_e, gs, policy, impl)
            assert y.dtype == jnp.float32
            assert np.linalg.norm(np.asarray(y - ref)) / np.linalg.norm(np.asarray(ref)) < 0.06
    for policy in [P.BF16, P.FP8_BLOCKWISE, P.FP8_BLOCKWISE_POW2]:  # same operands, f32 sums
        np.testing.assert_allclose(
            precision.grouped_matmul(x, w_e, gs, policy, G.TILED),
            precision.grouped_matmul(x, w_e, gs, policy, G.RAGGED_DOT),
            rtol=1e-5,
            atol=1e-5,
        )


def test_quantized_operands_sit_behind_an_optimization_barrier():
    """XLA:GPU (allow_excess_precision, its default) removes a bare f32 -> E4M3 -> f32 convert pair
    and with it the quantization; every quantized operand must reach its GEMM through a barrier.
    (CPU keeps the pair either way, so the optimised GPU HLO is checked by bench/fp8_step.py.)"""
    x = jax.random.normal(jax.random.key(20), (8, 256))
    w = jax.random.normal(jax.random.key(21), (256, 128))

    def f(x, w):
        def loss(x, w):
            return jnp.sum(jnp.sin(fp8.matmul(x, w, fp8.E4M3_BLOCKWISE)))

        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    text = jax.jit(f).lower(x, w).as_text()
    barriers = [ln for ln in text.splitlines() if "optimization_barrier" in ln]
    converts = [ln for ln in text.splitlines() if "convert" in ln and "-> tensor<" in ln]
    to_f8 = [ln for ln in converts if ln.rstrip().endswith("xf8E4M3FN>")]
    # x and w for the forward, dy and w for dgrad, x and dy for wgrad: six quantizations
    assert len(to_f8) == 6
    assert sum("f8E4M3FN" in ln for ln in barriers) == 6
