"""Routed experts for decode: gather the chosen experts' weights instead of sorting tokens.

The training dispatch (`dispatch.dropless_experts`) runs `ragged_dot` over all E experts, which
reads every expert's weights; at decode a step has a handful of tokens, so it is cheaper to read
only the X*k expert matrices the tokens chose (what transformers' loop over experts with tokens
does). Same signature and numerics (combine in float32) as the dropless dispatch; selected by
`decode` when X*k < E, i.e. small-batch decode and speculative verify, under the DEFAULT matmul
policy (any other runs the dropless dispatch, whose grouped GEMMs apply it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.model import dispatch, precision


def gathered_experts(
    x_XD,
    idx_Xk,
    weights_Xk,
    w1_EDF,
    w3_EDF,
    w2_EFD,
    *,
    grouped_matmul: dispatch.GroupedMatmul = dispatch.GroupedMatmul.AUTO,
    policy: precision.MatmulPolicy = precision.MatmulPolicy.DEFAULT,
):
    del grouped_matmul  # no grouped matmul here: one small matmul per (token, choice)
    if policy is not precision.MatmulPolicy.DEFAULT:
        # decode picks the dropless dispatch for every other policy (decode._decode_experts)
        raise ValueError(f"gathered experts compute in the compute dtype, not matmul {policy}")
    # One flat index over the X*k (token, choice) pairs, and a batched matvec over them: with
    # the index [X, k] and the expert weights [X, k, D, F], XLA:CPU fuses the gather into the
    # transposes the einsum needs and runs it element by element, ~5x slower at X = 1 and
    # growing with X (bench/decode.py --parts=experts).
    X, k = idx_Xk.shape
    idx_N = idx_Xk.reshape(X * k)
    x_ND = jnp.repeat(x_XD, k, axis=0)
    w1_NDF = jnp.take(w1_EDF, idx_N, axis=0)
    w3_NDF = jnp.take(w3_EDF, idx_N, axis=0)
    w2_NFD = jnp.take(w2_EFD, idx_N, axis=0)
    gate_NF = jnp.einsum("nd,ndf->nf", x_ND, w1_NDF)
    up_NF = jnp.einsum("nd,ndf->nf", x_ND, w3_NDF)
    y_ND = jnp.einsum("nf,nfd->nd", jax.nn.silu(gate_NF) * up_NF, w2_NFD)
    y_XkD = y_ND.reshape(X, k, -1)
    return dispatch.combine(y_XkD, weights_Xk, x_XD.dtype)


def use_gathered(tokens: int, top_k: int, n_experts: int) -> bool:
    return tokens * top_k < n_experts
