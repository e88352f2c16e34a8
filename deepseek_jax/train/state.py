"""Train state and its (possibly sharded) initialisation.

The functional boundary: the model is split once into (graphdef, params, expert_bias); the state
holds them as plain nested dicts (`nnx.merge` accepts those), plus the optimizer state and the step,
so checkpoints and shardings are keyed by clean paths like params/moe_layers/attn/wq_b/kernel.
`init_fn` is a pure function of a key, so callers can `jax.jit(init_fn, out_shardings=...)` and a
model too large for one device is created already sharded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import layers, transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped non-finite steps included)
    params: Any  # nested dict of nnx.Param values
    expert_bias: Any  # nested dict of layers.ExpertBias values (updated outside the gradient)
    opt_state: Any


def split(model: transformer.Transformer):
    """(graphdef, params, expert_bias) with the two collections as plain nested dicts."""
    graphdef, params, bias = nnx.split(model, nnx.Param, layers.ExpertBias)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(bias)


def abstract_model(cfg: config_lib.ModelConfig):
    """(graphdef, abstract params, abstract expert_bias) without allocating anything."""
    return split(nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0))))


def logical_axes(cfg: config_lib.ModelConfig) -> tuple[Any, Any]:
    """Nested dicts, shaped like (params, expert_bias), of each variable's logical axis names."""
    return transformer.abstract_layout(cfg)[1]


def init_fn(
    cfg: config_lib.ModelConfig, tx: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    _, params, bias = split(transformer.Transformer(cfg, rngs=nnx.Rngs(params=key)))
    return TrainState(jnp.zeros((), jnp.int32), params, bias, tx.init(params))


def abstract_state(cfg: config_lib.ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    return jax.eval_shape(lambda k: init_fn(cfg, tx, k), jax.random.key(0))


def init_state(
    cfg: config_lib.ModelConfig,
    tx: optax.GradientTransformation,
    seed: int,
    out_shardings: Any = None,
) -> TrainState:
    fn = jax.jit(lambda k: init_fn(cfg, tx, k), out_shardings=out_shardings)
    return fn(jax.random.key(seed))
