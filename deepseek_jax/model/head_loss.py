"""The output head fused with the cross-entropy, over chunks of tokens: no [tokens, vocab] logits.

`weighted_nll(h_XD, w_DY, targets_X, weights_X, chunk)` = sum_x weights_x * nll_x, where
nll_x = logsumexp(h_x w) - (h_x w)[targets_x], the value `losses.token_nll` gives on the head's
logits. The plain path builds the logits [X, Y] (float32), keeps them (or their softmax) for the
backward, and autodiff adds a second [X, Y] array (the softmax minus the one-hot) there: at vocab
32K that is most of the memory traffic of a small model's step.

Here a `lax.scan` over chunks of `chunk` tokens computes, per chunk, the logits [c, Y], their
logsumexp, the picked logit, and, because the value is a weighted *sum* (the weights are an input,
so d loss / d logits = weights * (softmax - one-hot) is known in the forward), the chunk's
gradients: dh = (weights * (p - onehot)) w^T and dw += h^T (weights * (p - onehot)). The
backward only scales the stored dh [X, D] and dw [D, Y] by the incoming cotangent. Three matmuls
per chunk, as the plain path (no recompute), and the largest live temporary is [c, Y]. Outside a
gradient (eval) only the values are computed.

Numerics: per token the same dot products and the same logsumexp as the plain path; sums over
tokens run chunk by chunk (float32 accumulation of dw), so results equal the plain path to
float32 rounding. The token count need not divide by `chunk`: the tail chunk is zero-padded with
weight 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_jax.model import layers, precision


def _logits(h_cD, w_DY, compute_dtype):
    # What layers.Linear + Transformer.logits do: operands in the compute dtype, logits in >= f32.
    out = precision.dot_general(
        h_cD.astype(compute_dtype), w_DY.astype(compute_dtype), (((1,), (0,)), ((), ()))
    )
    return out.astype(layers.accum_dtype(out.dtype))


def _chunked(x, chunk: int):
    """[X, ...] -> [n, chunk, ...], zero-padded at the end."""
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _chunk_nll(h_cD, w_DY, t_c, compute_dtype):
    logits_cY = _logits(h_cD, w_DY, compute_dtype)
    logz_c = jax.nn.logsumexp(logits_cY, axis=-1)
    picked_c = jnp.take_along_axis(logits_cY, t_c[:, None], axis=-1)[:, 0]
    return logits_cY, logz_c, logz_c - picked_c


def _forward(h_XD, w_DY, t_X, wt_X, chunk, compute_dtype, with_grads: bool):
    X = h_XD.shape[0]
    acc = layers.accum_dtype(compute_dtype)
    xs = (_chunked(h_XD, chunk), _chunked(t_X, chunk), _chunked(wt_X, chunk))

    def body(carry, x):
        total, dw_DY = carry
        h_cD, t_c, wt_c = x
        logits_cY, logz_c, nll_c = _chunk_nll(h_cD, w_DY, t_c, compute_dtype)
        total = total + jnp.sum(wt_c.astype(acc) * nll_c)
        if not with_grads:
            return (total, dw_DY), (nll_c, None)
        p_cY = jnp.exp(logits_cY - logz_c[:, None])
        onehot_cY = jax.nn.one_hot(t_c, logits_cY.shape[-1], dtype=p_cY.dtype)
        # d(sum wt * nll) / d logits, cast as autodiff casts it back through the f32 upcast.
        g_cY = (wt_c.astype(acc)[:, None] * (p_cY - onehot_cY)).astype(compute_dtype)
        wc_DY = w_DY.astype(compute_dtype)
        dh_cD = precision.dot_general(g_cY, wc_DY, (((1,), (1,)), ((), ())))
        dw_DY = dw_DY + precision.dot_general(
            h_cD.astype(compute_dtype), g_cY, (((0,), (0,)), ((), ()))
        ).astype(dw_DY.dtype)
        return (total, dw_DY), (nll_c, dh_cD.astype(h_XD.dtype))

    dw0 = jnp.zeros(w_DY.shape, jnp.promote_types(w_DY.dtype, jnp.float32))
    (total, dw_DY), (nll_nc, dh_ncD) = jax.lax.scan(body, (jnp.zeros((), acc), dw0), xs)
    nll_X = nll_nc.reshape(-1)[:X]
    dh_XD = None if dh_ncD is None else dh_ncD.reshape(-1, h_XD.shape[-1])[:X]
    return total, nll_X, dh_XD, dw_DY.astype(w_DY.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_nll(h_XD, w_DY, t_X, wt_X, chunk, compute_dtype):
    return _forward(h_XD, w_DY, t_X, wt_X, chunk, compute_dtype, with_grads=False)[0]


def _fwd(h_XD, w_DY, t_X, wt_X, chunk, compute_dtype):
    total, nll_X, dh_XD, dw_DY = _forward(
        h_XD, w_DY, t_X, wt_X, chunk, compute_dtype, with_grads=True
    )
    return total, (nll_X, dh_XD, dw_DY, t_X, wt_X)


def _bwd(chunk, compute_dtype, res, g):
    nll_X, dh_XD, dw_DY, t_X, wt_X = res
    del chunk, compute_dtype
    d_wt = (g * nll_X).astype(wt_X.dtype)
    d_t = jnp.zeros(t_X.shape, jax.dtypes.float0)  # integer input: no cotangent
    return (g * dh_XD).astype(dh_XD.dtype), (g * dw_DY).astype(dw_DY.dtype), d_t, d_wt


_weighted_nll.defvjp(_fwd, _bwd)


def weighted_nll(
    h_XD: jax.Array,
    w_DY: jax.Array,
    targets_X: jax.Array,
    weights_X: jax.Array,
    chunk: int,
    compute_dtype=jnp.float32,
) -> jax.Array:
    """sum_x weights_x * nll(head(h_x), targets_x), in >= float32, chunk tokens at a time.

    h_XD: the head's input (after the final norm); w_DY: the head kernel [D, Y] (the embedding
    table transposed when tied). Differentiable in h, w and the weights.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if h_XD.ndim != 2 or w_DY.ndim != 2 or h_XD.shape[1] != w_DY.shape[0]:
        raise ValueError(f"h {h_XD.shape} and w {w_DY.shape} are not [X, D] and [D, Y]")
    chunk = min(chunk, h_XD.shape[0])
    return _weighted_nll(h_XD, w_DY, targets_X, weights_X, chunk, jnp.dtype(compute_dtype))
