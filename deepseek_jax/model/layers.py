"""Basic layers: parameters with logical axes, RMSNorm, linear maps, embedding, SwiGLU MLP.

Every parameter carries `logical_axes` metadata (one name per dimension); `parallel/sharding.py`
maps those names to mesh axes. Kernels are stored [in..., out...] and cast to the compute dtype at
use; parameters stay in `param_dtype` (float32 by default) — the mixed-precision policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import precision


class ExpertBias(nnx.Variable):
    """Aux-loss-free selection bias: state, not a gradient parameter (updated after each step)."""


def param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    logical_axes: Sequence[str],
    *,
    std: float | None,
    dtype: Any,
    init_value: float = 0.0,
) -> nnx.Param:
    """A parameter ~ N(0, std) (or filled with `init_value` when std is None) with logical axes."""
    if len(shape) != len(logical_axes):
        raise ValueError(
            f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank"
        )
    if std is None:
        value = jnp.full(shape, init_value, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=tuple(logical_axes))


def accum_dtype(dtype: Any) -> Any:
    """At least float32: the dtype of norms, softmax, router and loss (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to the input dtype before the weight (as HF does)."""
    x32 = x.astype(accum_dtype(x.dtype))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    weight = weight.reshape((1,) * (x.ndim - 1) + weight.shape)
    return weight.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: Any, axis_name: str = "norm"):
        self.eps = eps
        self.weight = param(None, (dim,), (axis_name,), std=None, dtype=param_dtype, init_value=1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Linear(nnx.Module):
    """y = einsum(x, w) over the trailing `len(in_shape)` dims of x; no bias (DeepSeek has none)."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        logical_axes: Sequence[str],
        *,
        std: float,
        param_dtype: Any,
        compute_dtype: Any,
        rngs: nnx.Rngs,
        policy: precision.MatmulPolicy = precision.MatmulPolicy.DEFAULT,
    ):
        self.in_rank = len(in_shape)
        self.out_rank = len(out_shape)
        self.compute_dtype = compute_dtype
        self.policy = policy
        self.kernel = param(rngs, (*in_shape, *out_shape), logical_axes, std=std, dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.kernel[...].astype(self.compute_dtype)
        contract = (tuple(range(x.ndim - self.in_rank, x.ndim)), tuple(range(self.in_rank)))
        dims = (contract, ((), ()))
        return precision.dot_general(x.astype(self.compute_dtype), w, dims, self.policy)


class Embed(nnx.Module):
    def __init__(
        self,
        vocab: int,
        dim: int,
        *,
        std: float,
        param_dtype: Any,
        compute_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.compute_dtype = compute_dtype
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), std=std, dtype=param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output head: logits against the embedding table."""
        w = self.embedding[...].astype(self.compute_dtype)
        return jnp.einsum("...d,yd->...y", x.astype(self.compute_dtype), w)


class MLP(nnx.Module):
    """SwiGLU MLP. w1 = gate, w3 = up, w2 = down (official DeepSeek names)."""

    def __init__(self, cfg: config_lib.MLPConfig, *, rngs: nnx.Rngs, mlp_axis: str = "mlp"):
        kw = dict(
            std=cfg.init_std,
            param_dtype=cfg.param_dtype,
            compute_dtype=cfg.compute_dtype,
            rngs=rngs,
            policy=cfg.matmul,
        )
        self.w1 = Linear((cfg.d_model,), (cfg.d_ff,), ("embed", mlp_axis), **kw)
        self.w3 = Linear((cfg.d_model,), (cfg.d_ff,), ("embed", mlp_axis), **kw)
        self.w2 = Linear((cfg.d_ff,), (cfg.d_model,), (mlp_axis, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))
