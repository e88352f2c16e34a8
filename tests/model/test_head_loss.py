"""The fused chunked head + CE equals the plain CE on the logits: values and gradients (h, w and
the weights), masked tokens, chunks that do not divide the token count or exceed it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import head_loss, losses

TOL = 1e-6


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def plain(h_XD, w_DY, t_X, wt_X):
    return jnp.sum(losses.token_nll(h_XD @ w_DY, t_X) * wt_X)


@pytest.mark.parametrize("chunk", [8, 37, 64])  # 8 and 64 do not divide 37; 64 > 37
def test_weighted_nll_equals_plain_values_and_grads(chunk):
    X, D, Y = 37, 16, 50
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (X, D))
    w = jax.random.normal(k[1], (D, Y)) / 4
    t = jax.random.randint(k[2], (X,), 0, Y)
    wt = jax.random.uniform(k[3], (X,)) * (jnp.arange(X) % 5 != 0)  # every 5th token masked
    fused = lambda h, w, wt: head_loss.weighted_nll(h, w, t, wt, chunk)  # noqa: E731
    want = jax.value_and_grad(lambda *a: plain(a[0], a[1], t, a[2]), argnums=(0, 1, 2))(h, w, wt)
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(h, w, wt)
    assert max_rel(got[0], want[0]) <= TOL
    for g, r in zip(got[1], want[1]):
        assert max_rel(g, r) <= TOL
    # Masked tokens get no gradient in h (their rows are exactly zero).
    assert np.all(np.asarray(got[1][0])[np.arange(X) % 5 == 0] == 0)
    assert max_rel(fused(h, w, wt), want[0]) <= TOL  # the primal (no-gradient) path


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk"):
        head_loss.weighted_nll(
            jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.zeros(4, int), jnp.ones(4), 0
        )
