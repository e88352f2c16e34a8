"""Optimizer and schedules: AdamW with global-norm clipping, warmup -> constant -> cosine LR.

AdamW's moments are stored in `train.adam_moment_dtype`: float32 is optax.adamw itself; bfloat16
(DeepSeek-V3's recipe, half the optimizer memory) is `scale_by_adam_stored_as`, since optax
offers a dtype for the first moment only.
"""

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


def scale_by_adam_stored_as(
    moment_dtype, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """optax.scale_by_adam with mu and nu stored in `moment_dtype` (e.g. bfloat16).

    Each step widens the stored moments to float32, runs optax's own Adam update on them (so the
    arithmetic is optax's, bit for bit when moment_dtype is float32) and rounds the new moments
    to `moment_dtype` (round to nearest even) for storage. The update is computed from the
    float32 moments before rounding.
    """
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def store(tree):
        return jax.tree.map(lambda m: m.astype(moment_dtype), tree)

    def widen(tree):
        return jax.tree.map(lambda m: m.astype(jnp.promote_types(m.dtype, jnp.float32)), tree)

    def init_fn(params):
        state = adam.init(params)
        return state._replace(mu=store(state.mu), nu=store(state.nu))

    def update_fn(updates, state, params=None):
        wide = state._replace(mu=widen(state.mu), nu=widen(state.nu))
        updates, new = adam.update(updates, wide, params)
        return updates, new._replace(mu=store(new.mu), nu=store(new.nu))

    return optax.GradientTransformation(init_fn, update_fn)


def adamw(cfg: train_config.TrainConfig) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on `decay_mask`, moments in cfg.adam_moment_dtype."""
    lr = learning_rate(cfg)
    if cfg.adam_moment_dtype is train_config.MomentDType.FLOAT32:
        return optax.adamw(
            lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    # optax.adamw's own chain, with the moments stored in the configured dtype.
    return optax.chain(
        scale_by_adam_stored_as(jnp.dtype(cfg.adam_moment_dtype.value), cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, decay_mask),
        optax.scale_by_learning_rate(lr),
    )


def optimizer(cfg: train_config.TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw(cfg))
