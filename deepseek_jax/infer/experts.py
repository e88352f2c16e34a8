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
    w1_XkDF = jnp.take(w1_EDF, idx_Xk, axis=0)
    w3_XkDF = jnp.take(w3_EDF, idx_Xk, axis=0)
    w2_XkFD = jnp.take(w2_EFD, idx_Xk, axis=0)
    gate_XkF = jnp.einsum("xd,xkdf->xkf", x_XD, w1_XkDF)
    up_XkF = jnp.einsum("xd,xkdf->xkf", x_XD, w3_XkDF)
    y_XkD = jnp.einsum("xkf,xkfd->xkd", jax.nn.silu(gate_XkF) * up_XkF, w2_XkFD)
    return dispatch.combine(y_XkD, weights_Xk, x_XD.dtype)


def use_gathered(tokens: int, top_k: int, n_experts: int) -> bool:
    return tokens * top_k < n_experts
