"""The matmul-precision policy: the one seam every weight matmul of the model goes through.

Every `layers.Linear` (attention projections, dense and shared-expert FFNs, MTP's eh_proj, the
untied head) calls `dot_general` here, and the routed experts' grouped matmuls (single-device and
expert-parallel alike, through `dispatch.grouped_swiglu`) call `grouped_matmul`, which runs the
implementation the model config chose (model/grouped.py: ragged_dot or tiled). A policy says how the
operands are represented and accumulated. DEFAULT is what the model has always done: both operands
in the layer's compute dtype, XLA's default accumulation (float32 for bfloat16 inputs on TPU/GPU).

Lower-precision policies (bfloat16 operands with float32 accumulation; DeepSeek's FP8 recipe with
1x128 activation and 128x128 weight scaling) are added here as members of `MatmulPolicy`, so that
no layer changes. Embedding lookups, the router, norms and the attention core never come through
here: they stay in their own precision by design.
"""

from __future__ import annotations

import enum

import jax

from deepseek_jax.model import grouped


class MatmulPolicy(enum.Enum):
    DEFAULT = "default"  # operands in the compute dtype, XLA's default accumulation


def dot_general(
    x: jax.Array, w: jax.Array, dimension_numbers, policy: MatmulPolicy = MatmulPolicy.DEFAULT
) -> jax.Array:
    """jax.lax.dot_general(x, w, dimension_numbers) under `policy`."""
    if policy is MatmulPolicy.DEFAULT:
        return jax.lax.dot_general(x, w, dimension_numbers)
    raise ValueError(f"matmul policy {policy} has no implementation")


def grouped_matmul(
    x_ZD: jax.Array,
    w_EDF: jax.Array,
    group_sizes_E: jax.Array,
    policy: MatmulPolicy = MatmulPolicy.DEFAULT,
    impl: grouped.GroupedMatmul = grouped.GroupedMatmul.AUTO,
) -> jax.Array:
    """Rows of x grouped by expert (contiguous groups) times their expert's weights, by `impl`."""
    if policy is MatmulPolicy.DEFAULT:
        return grouped.matmul(x_ZD, w_EDF, group_sizes_E, impl)
    raise ValueError(f"matmul policy {policy} has no implementation")
