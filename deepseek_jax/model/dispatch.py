"""Dropless routed-expert computation on one device: sort by expert, grouped matmul, unsort.

Every (token, choice) pair is placed in a buffer sorted by expert id; a grouped matmul
(model/grouped.py, through model/precision.py: `jax.lax.ragged_dot` or the tiled one, as
`model.grouped_matmul` says) multiplies each contiguous group with its expert's weights; results go
back to their (token, choice) slots and are combined with the routing weights (in float32). No
capacity, no token dropped.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import precision

GroupedMatmul = config_lib.GroupedMatmul


class ExpertFn(Protocol):
    """The routed-expert computation of a MoE layer: y_XD = sum_k w_Xk * SwiGLU_{idx_Xk}(x_XD).

    `dropless_experts` below is the single-device implementation; `parallel.expert` builds the
    expert-parallel one (shard_map + all-to-all) for a mesh. Both are exact and dropless. The MoE
    layer receives it as an explicit argument (Transformer.__call__(..., experts=)), so the code
    that runs is the code the caller passed, never an ambient default. `grouped_matmul` is the
    layer's `MoEConfig.grouped_matmul` (how the grouped matmuls run, wherever they run) and
    `policy` its matmul policy (its config's), applied to the three grouped GEMMs.
    """

    def __call__(
        self,
        x_XD: jax.Array,
        idx_Xk: jax.Array,
        weights_Xk: jax.Array,
        w1_EDF: jax.Array,
        w3_EDF: jax.Array,
        w2_EFD: jax.Array,
        *,
        grouped_matmul: GroupedMatmul = GroupedMatmul.AUTO,
        policy: precision.MatmulPolicy = precision.MatmulPolicy.DEFAULT,
    ) -> jax.Array: ...


def sort_by_expert(idx_Xk: jax.Array, n_experts: int):
    """Returns (order_M, group_sizes_E): order_M[j] = the flat (token*k + choice) slot at sorted
    position j. Z = X*k indexes the (token, choice) rows in expert-sorted order."""
    flat = idx_Xk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.zeros((n_experts,), jnp.int32).at[flat].add(1)
    return order, group_sizes


def grouped_swiglu(
    x_ZD: jax.Array,
    group_sizes: jax.Array,
    w1_EDF: jax.Array,
    w3_EDF: jax.Array,
    w2_EFD: jax.Array,
    impl: GroupedMatmul = GroupedMatmul.AUTO,
    policy: precision.MatmulPolicy = precision.MatmulPolicy.DEFAULT,
) -> jax.Array:
    """SwiGLU of rows already sorted into contiguous expert groups (rows past the groups: 0)."""
    mm = functools.partial(
        precision.grouped_matmul, group_sizes_E=group_sizes, policy=policy, impl=impl
    )
    gate_ZF = mm(x_ZD, w1_EDF)
    up_ZF = mm(x_ZD, w3_EDF)
    return mm(jax.nn.silu(gate_ZF) * up_ZF, w2_EFD)


def combine(y_XkD: jax.Array, weights_Xk: jax.Array, dtype) -> jax.Array:
    """sum_k w_k y_k in (at least) float32, cast to the compute dtype."""
    acc = jnp.promote_types(dtype, jnp.float32)
    y = jnp.einsum("xkd,xk->xd", y_XkD.astype(acc), weights_Xk.astype(acc))
    return y.astype(dtype)


def dropless_experts(  # an ExpertFn
    x_XD: jax.Array,
    idx_Xk: jax.Array,
    weights_Xk: jax.Array,
    w1_EDF: jax.Array,
    w3_EDF: jax.Array,
    w2_EFD: jax.Array,
    *,
    grouped_matmul: GroupedMatmul = GroupedMatmul.AUTO,
    policy: precision.MatmulPolicy = precision.MatmulPolicy.DEFAULT,
) -> jax.Array:
    X, k = idx_Xk.shape
    E = w1_EDF.shape[0]
    order, group_sizes = sort_by_expert(idx_Xk, E)
    x_ZD = jnp.take(x_XD, order // k, axis=0)
    y_ZD = grouped_swiglu(
        x_ZD, group_sizes, w1_EDF, w3_EDF, w2_EFD, impl=grouped_matmul, policy=policy
    )
    inverse = jnp.argsort(order)  # position of each (token, choice) slot in the sorted buffer
    y_XkD = jnp.take(y_ZD, inverse, axis=0).reshape(X, k, -1)
    return combine(y_XkD, weights_Xk, x_XD.dtype)
