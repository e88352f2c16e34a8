"""Stacked layers: parameters with a leading `layers` axis, run with jax.lax.scan.

Init vmaps the per-layer constructor over layer keys, so compile time does not grow with depth; the
forward splits the stacked module once and scans a pure body over the per-layer state. The body is
wrapped in jax.checkpoint according to the remat policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model import config as config_lib

REMAT_POLICIES = {
    config_lib.RematPolicy.FULL: None,  # save nothing but the scan carry
    config_lib.RematPolicy.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked(
    make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, axis_name: str = "layers"
) -> nnx.Module:
    """Builds `n` copies of `make(rngs)` as one module whose variables have a leading axis."""
    keys = jax.random.split(rngs.params(), n)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(make(nnx.Rngs(key))))(keys)
    for _, var in nnx.to_flat_state(state):
        var.set_metadata(logical_axes=(axis_name,) + tuple(var.get_metadata()["logical_axes"]))
    return nnx.merge(graphdef, state)


def remat(fn: Callable, policy: config_lib.RematPolicy) -> Callable:
    if policy is config_lib.RematPolicy.NONE:
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


def scan(
    module: nnx.Module,
    carry: Any,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    xs: Any = None,
    policy: config_lib.RematPolicy = config_lib.RematPolicy.NONE,
    unroll: bool = False,
    loop: bool = False,
):
    """Runs body(layer, carry, x) -> (carry, y) over the stacked layers of `module`; `unroll`
    traces every layer inline (no while loop), so XLA can schedule across layer boundaries.

    `loop`: a Python loop over slices of the stacked state instead of a scan. The same values;
    under autodiff a scan stacks every layer's residuals into [L, ...] buffers for its backward
    (and unroll=True keeps that stacking), a loop keeps them as separate arrays."""
    graphdef, state = nnx.split(module)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if not loop:
        return jax.lax.scan(remat(step, policy), carry, (state, xs), unroll=unroll)
    step = remat(step, policy)
    ys = []
    for i in range(num_layers(module)):
        carry, y = step(carry, jax.tree.map(lambda a, i=i: a[i], (state, xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def layer(module: nnx.Module, i: int) -> nnx.Module:
    """Layer i of a stacked module as an ordinary module (for tests and inspection)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda v: v[i], state))


def num_layers(module: nnx.Module) -> int:
    return jax.tree.leaves(nnx.state(module))[0].shape[0]
