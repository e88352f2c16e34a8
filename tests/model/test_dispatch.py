"""Dropless dispatch equals a per-expert reference loop, values and gradients, with either grouped
matmul."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import dispatch

IMPLS = pytest.mark.parametrize(
    "impl", [dispatch.GroupedMatmul.TILED, dispatch.GroupedMatmul.RAGGED_DOT]
)


def loop_reference(x, idx, w, w1, w3, w2):
    """For each expert: gather its tokens, run its SwiGLU, scatter-add weighted outputs."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(w1.shape[0]):
        hit = idx == e  # [X, k]
        gate = jnp.sum(jnp.where(hit, w, 0.0), axis=-1)  # a token picks an expert at most once
        y = (jax.nn.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]
        out = out + gate[:, None] * y
    return out


def setup(X=40, D=8, F=6, E=5, k=2, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (X, D))
    # distinct experts per token, skewed usage, expert E-1 never used
    rng = np.random.default_rng(seed)
    idx = np.stack(
        [rng.choice(E - 1, k, replace=False, p=[0.55, 0.25, 0.15, 0.05]) for _ in range(X)]
    ).astype(np.int32)
    w = jax.random.uniform(ks[2], (X, k))
    w1 = jax.random.normal(ks[3], (E, D, F)) / 3
    w3 = jax.random.normal(ks[4], (E, D, F)) / 3
    w2 = jax.random.normal(ks[0], (E, F, D)) / 3
    return x, jnp.asarray(idx), w, w1, w3, w2


@IMPLS
def test_dropless_equals_loop(impl):
    args = setup()
    experts = functools.partial(dispatch.dropless_experts, grouped_matmul=impl)
    np.testing.assert_allclose(experts(*args), loop_reference(*args), atol=1e-5, rtol=1e-5)


@IMPLS
def test_dropless_gradients_equal_loop(impl):
    x, idx, w, w1, w3, w2 = setup(seed=1)
    experts = functools.partial(dispatch.dropless_experts, grouped_matmul=impl)

    def loss(fn):
        return lambda x, w, w1, w3, w2: jnp.sum(fn(x, idx, w, w1, w3, w2) ** 2)

    g_dropless = jax.grad(loss(experts), argnums=(0, 1, 2, 3, 4))(x, w, w1, w3, w2)
    g_loop = jax.grad(loss(loop_reference), argnums=(0, 1, 2, 3, 4))(x, w, w1, w3, w2)
    for a, b in zip(g_dropless, g_loop):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(g_dropless[2][4]) == 0)  # the unused expert gets no gradient


def test_sort_by_expert_groups_are_contiguous():
    idx = jnp.asarray([[2, 0], [1, 2], [2, 1]], jnp.int32)
    order, sizes = dispatch.sort_by_expert(idx, 4)
    np.testing.assert_array_equal(np.asarray(sizes), [1, 2, 3, 0])
    np.testing.assert_array_equal(
        np.asarray(idx).reshape(-1)[np.asarray(order)], [0, 1, 1, 2, 2, 2]
    )
