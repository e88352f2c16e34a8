"""The matmul-precision policy: the one seam every weight matmul of the model goes through.

Every `layers.Linear` (attention projections, dense and shared-expert FFNs, MTP's eh_proj, and the
untied head, which always uses DEFAULT) calls `dot_general` here, and the routed experts' grouped
matmuls (single-device and expert-parallel alike, through `dispatch.grouped_swiglu`) call
`grouped_matmul`, which runs the implementation the model config chose (model/grouped.py:
ragged_dot, tiled or megablox). A policy says how the operands are represented and accumulated.
DEFAULT is what the model has always done: both operands in the layer's compute dtype, XLA's
default accumulation (float32 for bfloat16 inputs on TPU/GPU).

BF16: both operands rounded to bfloat16, float32 accumulation (`preferred_element_type`), the
result in the input's dtype. FP8_BLOCKWISE: DeepSeek-V3's recipe (model/fp8.py): E4M3 operands
with 1x128 activation and 128x128 weight scales in the forward, dgrad and wgrad GEMMs, float32
accumulation; FP8_BLOCKWISE_POW2 is the same with power-of-two scales. The policy is the model
config's `matmul_policy`, given to each layer through its small config. Embedding lookups, the
output head, the router, norms and the attention core never use it: they keep their own
precision by design (the V3 recipe keeps them in BF16/FP32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import fp8, grouped

MatmulPolicy = config_lib.MatmulPolicy  # defined with the other config enums


# The lower-precision policies share one GEMM skeleton (model/fp8.py) with a custom VJP, so the
# dgrad and wgrad GEMMs get the operand format too, not only the forward.
_FORMATS = {
    MatmulPolicy.BF16: fp8.BF16,
    MatmulPolicy.FP8_BLOCKWISE: fp8.E4M3_BLOCKWISE,
    MatmulPolicy.FP8_BLOCKWISE_POW2: fp8.E4M3_BLOCKWISE_POW2,
}


def dot_general(
    x: jax.Array, w: jax.Array, dimension_numbers, policy: MatmulPolicy = MatmulPolicy.DEFAULT
) -> jax.Array:
    """jax.lax.dot_general(x, w, dimension_numbers) under `policy`."""
    if policy is MatmulPolicy.DEFAULT:
        return jax.lax.dot_general(x, w, dimension_numbers)
    if policy in _FORMATS:
        return fp8.dot_general(x, w, dimension_numbers, _FORMATS[policy])
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
    if policy in _FORMATS:
        return fp8.grouped_matmul(
            x_ZD, w_EDF, group_sizes_E, _accumulating_f32(grouped.resolve(impl)), _FORMATS[policy]
        )
    raise ValueError(f"matmul policy {policy} has no implementation")


def _ragged_dot_f32(x_ZD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x_ZD, w_EDF, group_sizes_E, preferred_element_type=jnp.float32)


def _tiled_f32(x_ZD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    # The tiled kernel computes in its operands' dtype; the policies' operand values (bf16, or
    # E4M3 dequantized) are exact in float32, so this is their GEMM with float32 accumulation.
    f32 = jnp.float32
    return grouped.tiled(x_ZD.astype(f32), w_EDF.astype(f32), group_sizes_E)


def _megablox_f32(x_ZD: jax.Array, w_EDF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    return grouped.megablox(x_ZD, w_EDF, group_sizes_E, out_dtype=jnp.float32)


def _accumulating_f32(impl: grouped.GroupedMatmul):
    """The grouped matmul (a resolved `impl`) the lower-precision policies wrap: float32
    accumulation. Module-level functions, so the custom VJP's static argument is one object."""
    if impl is grouped.GroupedMatmul.RAGGED_DOT:
        return _ragged_dot_f32
    if impl is grouped.GroupedMatmul.TILED:
        return _tiled_f32
    if impl is grouped.GroupedMatmul.MEGABLOX:
        return _megablox_f32
    raise ValueError(f"grouped matmul {impl} has no implementation")
