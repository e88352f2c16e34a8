"""Activation sharding constraints, without the model naming a mesh.

`constrain(x, logical_axes)` marks block boundaries (and the logits) with logical axis names. It is
the identity unless a caller installed a constraint function with `activation_constraint(fn)`;
`parallel.plan.Plan.wrap` installs one that turns the names into `with_sharding_constraint` on its
mesh. Constraints only annotate: with or without them the values are the same.

The function is read from a context variable while the model is being traced, and context
variables are not part of jit's cache key. So install it inside the function that jit traces (as
`Plan.wrap` does), never around a call of an already-jitted function: a function traced once
outside the context would reuse that trace, without constraints, inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax

ConstraintFn = Callable[[jax.Array, Sequence[str]], jax.Array]

_CONSTRAINT: contextvars.ContextVar[ConstraintFn | None] = contextvars.ContextVar(
    "deepseek_jax_activation_constraint", default=None
)


@contextlib.contextmanager
def activation_constraint(fn: ConstraintFn | None) -> Iterator[None]:
    token = _CONSTRAINT.set(fn)
    try:
        yield
    finally:
        _CONSTRAINT.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str]) -> jax.Array:
    fn = _CONSTRAINT.get()
    return x if fn is None else fn(x, tuple(logical_axes))
