"""Optimizer and schedules: AdamW with global-norm clipping, warmup -> constant -> cosine LR."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.train import config as train_config


def learning_rate(cfg: train_config.TrainConfig) -> optax.Schedule:
    warmup = max(cfg.warmup_steps, 1)
    decay_start = cfg.warmup_steps + cfg.constant_steps
    decay_steps = cfg.decay_steps or max(cfg.steps - decay_start, 1)
    parts = [
        optax.linear_schedule(0.0, cfg.lr, warmup),
        optax.constant_schedule(cfg.lr),
        optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.lr_final / cfg.lr),
        optax.constant_schedule(cfg.lr_final),
    ]
    bounds = [cfg.warmup_steps, decay_start, decay_start + decay_steps]
    return optax.join_schedules(parts, bounds)


def piecewise(schedule: train_config.Piecewise, step: jax.Array) -> jax.Array:
    values = jnp.asarray(schedule.values, jnp.float32)
    index = jnp.searchsorted(jnp.asarray(schedule.boundaries, jnp.int32), step, side="right")
    return values[index]


def decay_mask(params):
    """Weight decay on matrices and embeddings; not on norm weights (leaf name `weight`).

    Expert-selection biases are not parameters at all (ExpertBias collection), so they never decay.
    """

    def decays(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if n != "value"]
        return names[-1] != "weight"

    return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg: train_config.TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            learning_rate(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )
