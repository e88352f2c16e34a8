"""The grouped matmul: TILED = MEGABLOX = ragged_dot = a float64 per-expert reference, values and
gradients, with empty experts, one expert taking every row, rows past the groups, and tiles of
many sizes. MEGABLOX (jax's Pallas TPU kernels) runs in interpret mode here, which fills memory a
kernel leaves unwritten with NaN: rows past the groups would show it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import grouped

G = grouped.GroupedMatmul
Z, D, F = 24, 8, 6
# (group sizes, tile): skewed with empty experts; one expert takes every row; rows past the groups
# (sum 17 < Z, as in the expert-parallel receive buffer); tiles of 1 row, odd, and larger than Z.
CASES = [
    ((9, 0, 5, 0, 10), 4),
    ((9, 0, 5, 0, 10), 1),
    ((9, 0, 5, 0, 10), 7),
    ((0, 0, 24, 0, 0), 4),
    ((24, 0, 0, 0, 0), 64),
    ((3, 0, 0, 6, 8), 4),
]


def operands(sizes, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    E = len(sizes)
    x = rng.standard_normal((Z, D))
    w = rng.standard_normal((E, D, F)) / np.sqrt(D)
    dy = rng.standard_normal((Z, F))
    return (
        jnp.asarray(x, dtype),
        jnp.asarray(w, dtype),
        jnp.asarray(sizes, jnp.int32),
        jnp.asarray(dy, dtype),
    )


def reference(x, w, sizes, dy):
    """float64 numpy: y = x @ w_e per group (0 past them), dx = dy w_e^T, dw_e = x_e^T dy_e."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((Z, F)), np.zeros((Z, D)), np.zeros(w.shape)
    start = 0
    for e, n in enumerate(sizes):
        rows = slice(start, start + n)
        y[rows] = x[rows] @ w[e]
        dx[rows] = dy[rows] @ w[e].T
        dw[e] = x[rows].T @ dy[rows]
        start += n
    return y, dx, dw


def value_and_grads(impl, tile):
    def f(x, w, sizes, dy):
        y, vjp = jax.vjp(lambda x, w: grouped.matmul(x, w, sizes, impl, tile=tile), x, w)
        return (y, *vjp(dy))

    return jax.jit(f)


@pytest.mark.parametrize("sizes, tile", CASES)
def test_tiled_equals_ragged_dot(sizes, tile):
    args = operands(sizes)
    tiled = value_and_grads(G.TILED, tile)(*args)
    ragged = value_and_grads(G.RAGGED_DOT, tile)(*args)
    for name, a, b in zip(("y", "dx", "dw"), tiled, ragged):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("sizes", sorted({c[0] for c in CASES}))
def test_megablox_equals_ragged_dot_and_the_float64_reference(sizes):
    args = operands(sizes, seed=2)
    got = value_and_grads(G.MEGABLOX, None)(*args)
    ragged = value_and_grads(G.RAGGED_DOT, None)(*args)
    for name, a, b, c in zip(("y", "dx", "dw"), got, ragged, reference(*args)):
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-5, err_msg=name)
    if sum(sizes) < Z:  # rows past the groups: exactly zero, in y and in dx
        assert np.all(np.asarray(got[0])[sum(sizes) :] == 0)
        assert np.all(np.asarray(got[1])[sum(sizes) :] == 0)


def test_megablox_tiles_rows_and_keeps_dtypes():
    """Rows not a multiple of the m-tile (several tiles, a partial last one); bfloat16 in and out,
    float32 accumulation: one bfloat16 rounding off the float64 reference."""
    sizes = (0, 70, 3, 0, 60)  # 133 rows over m-tiles of 32: two groups straddle tile edges
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((140, D)), rng.standard_normal((5, D, F)) / np.sqrt(D)
    dy = rng.standard_normal((140, F))
    want_y = np.zeros((140, F))
    start = 0
    for e, n in enumerate(sizes):
        want_y[start : start + n] = x[start : start + n] @ w[e]
        start += n
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2**-6)):
        xs, ws, dys = (jnp.asarray(a, dtype) for a in (x, w, dy))
        gs = jnp.asarray(sizes, jnp.int32)

        def f(x, w, gs=gs):
            return grouped.megablox(x, w, gs, tiling=(32, 128, 128))

        y, vjp = jax.vjp(f, xs, ws)
        dx, dw = vjp(dys)
        assert (y.dtype, dx.dtype, dw.dtype) == (dtype,) * 3
        np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=tol, atol=tol)
        assert np.all(np.asarray(y, np.float64)[133:] == 0)
    assert grouped.megablox(jnp.zeros((0, D)), jnp.zeros((5, D, F)), gs).shape == (0, F)


@pytest.mark.parametrize("impl", [G.TILED, G.RAGGED_DOT])
@pytest.mark.parametrize("sizes, tile", CASES[::2] + CASES[3:4])
def test_float64_reference(impl, sizes, tile):
    with jax.enable_x64(True):
        args = operands(sizes, jnp.float64, seed=1)
        got = value_and_grads(impl, tile)(*args)
        for name, a, b in zip(("y", "dx", "dw"), got, reference(*args)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, atol=1e-12, rtol=1e-12, err_msg=name)


def test_tiled_keeps_dtypes_and_accumulates_wide():
    x, w, sizes, dy = operands((9, 0, 5, 0, 10), jnp.bfloat16)
    y, dx, dw = value_and_grads(G.TILED, 4)(x, w, sizes, dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    _, _, dw_ref = reference(x, w, (9, 0, 5, 0, 10), dy)
    # dw of expert 4 sums 3 tiles; accumulated in float32, it is one bfloat16 rounding off.
    np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref, rtol=2**-7, atol=2**-7)


def test_auto_resolves_by_platform():
    assert grouped.resolve(G.AUTO, "cpu") is G.TILED
    assert grouped.resolve(G.AUTO, "gpu") is G.TILED
    assert grouped.resolve(G.AUTO, "tpu") is G.MEGABLOX
    assert grouped.resolve(G.RAGGED_DOT, "cpu") is G.RAGGED_DOT
    assert grouped.resolve(G.TILED, "tpu") is G.TILED
