"""Context hooks that let the parallel layer shape model internals without the model naming meshes.

- activation constraints: `constrain(x, logical_axes)` is the identity unless a parallel context
  installed a function (logical names -> `with_sharding_constraint` on the current mesh);
- the routed-expert computation: `expert_impl()` is the single-device dropless dispatch unless an
  expert-parallel implementation (shard_map + all-to-all) is installed.

Both are read while tracing, so installing them around `jax.jit(...).lower/__call__` is enough.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Sequence

import jax

ConstraintFn = Callable[[jax.Array, Sequence[str]], jax.Array]

_CONSTRAINT: contextvars.ContextVar[ConstraintFn | None] = contextvars.ContextVar(
    "deepseek_jax_activation_constraint", default=None
)
_EXPERT_IMPL: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "deepseek_jax_expert_impl", default=None
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


@contextlib.contextmanager
def expert_implementation(fn: Callable | None) -> Iterator[None]:
    token = _EXPERT_IMPL.set(fn)
    try:
        yield
    finally:
        _EXPERT_IMPL.reset(token)


def expert_impl() -> Callable | None:
    return _EXPERT_IMPL.get()
