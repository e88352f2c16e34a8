"""The train and eval steps as pure functions of (state, batch).

One train step: loss and grads (the objective of model/losses.py), clipped AdamW update, then the
aux-loss-free bias update from this batch's expert loads, outside the gradient. A step whose loss
or gradient norm is not finite changes nothing (params, optimizer state, biases) and reports
skipped=1. The sharded step (train/sharded.py) jits `make_train_step` with the plan's expert
function; the pipelined step (train/pipeline_step.py) computes loss and gradients with the
pipeline executor and shares `apply_update`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_jax import batch as batch_lib
from deepseek_jax.model import dispatch, layers, losses
from deepseek_jax.train import config as train_config
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib


def loss_fn(
    graphdef,
    train_cfg: train_config.TrainConfig,
    params,
    expert_bias,
    batch: batch_lib.Batch,
    mtp_lambda: jax.Array,
    experts: dispatch.ExpertFn = dispatch.dropless_experts,
    objective: losses.Objective = losses.objective,
):
    model = nnx.merge(graphdef, params, expert_bias)
    out = model(
        batch.inputs,
        segment_ids_BS=batch.segment_ids,
        positions_BS=batch.positions,
        experts=experts,
        logits=model.cfg.loss_chunk_tokens == 0,
    )
    norms = losses.norms(batch, model.cfg.mtp_depth, losses.loss_dtype(out))
    weights = losses.Weights(mtp_lambda, train_cfg.balance_alpha)
    loss, metrics = objective(out, batch, norms, weights)
    return loss, (metrics, out.moe_stats, out.mtp_stats)


def loss_and_grads(
    graphdef,
    train_cfg,
    state: state_lib.TrainState,
    batch: batch_lib.Batch,
    experts: dispatch.ExpertFn = dispatch.dropless_experts,
    objective: losses.Objective = losses.objective,
):
    mtp_lambda = optim.piecewise(train_cfg.mtp_lambda, state.step)
    grad_fn = jax.value_and_grad(
        lambda p: loss_fn(
            graphdef, train_cfg, p, state.expert_bias, batch, mtp_lambda, experts, objective
        ),
        has_aux=True,
    )
    (loss, aux), grads = grad_fn(state.params)
    return loss, aux, grads


def moe_metrics(moe_stats, mtp_stats, expert_bias) -> dict:
    """Per-MoE-layer load statistics (main layers first, then MTP depths)."""
    loads = [s.load_E for s in (moe_stats, mtp_stats) if s is not None]
    if not loads:
        return {}
    load_LE = jnp.concatenate(loads, axis=0)
    frac_LE = load_LE / jnp.maximum(load_LE.sum(-1, keepdims=True), 1.0)
    out = {
        "expert_load": frac_LE,
        "load_max_over_mean": load_LE.max(-1) / jnp.maximum(load_LE.mean(-1), 1e-9),
    }
    biases = [v for v in jax.tree.leaves(expert_bias)]
    if biases:
        out["bias_norm"] = jnp.concatenate([jnp.linalg.norm(b, axis=-1) for b in biases])
    return out


def apply_update(
    graphdef, train_cfg, tx, state: state_lib.TrainState, loss, aux, grads
) -> tuple[state_lib.TrainState, dict]:
    metrics, moe_stats, mtp_stats = aux
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gamma = optim.piecewise(train_cfg.bias_update_rate, state.step)
    model = nnx.merge(graphdef, state.params, state.expert_bias)
    model.update_expert_bias(moe_stats, mtp_stats, gamma)
    expert_bias = nnx.to_pure_dict(nnx.state(model, layers.ExpertBias))

    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep_if_bad(new, old):
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_state = state_lib.TrainState(
        step=state.step + 1,
        params=keep_if_bad(params, state.params),
        expert_bias=keep_if_bad(expert_bias, state.expert_bias),
        opt_state=keep_if_bad(opt_state, state.opt_state),
    )
    metrics = dict(metrics)
    metrics.update(
        grad_norm=grad_norm,
        lr=optim.learning_rate(train_cfg)(state.step),
        skipped=(~ok).astype(jnp.int32),
        loss_finite=jnp.isfinite(loss),
        grad_finite=jnp.isfinite(grad_norm),
    )
    metrics.update(moe_metrics(moe_stats, mtp_stats, state.expert_bias))
    return new_state, metrics


def make_train_step(
    graphdef,
    train_cfg: train_config.TrainConfig,
    tx: optax.GradientTransformation,
    *,
    experts: dispatch.ExpertFn = dispatch.dropless_experts,
    objective: losses.Objective = losses.objective,
) -> Callable:
    def train_step(state: state_lib.TrainState, batch: batch_lib.Batch):
        loss, aux, grads = loss_and_grads(graphdef, train_cfg, state, batch, experts, objective)
        return apply_update(graphdef, train_cfg, tx, state, loss, aux, grads)

    return train_step


def make_eval_step(graphdef, experts: dispatch.ExpertFn = dispatch.dropless_experts) -> Callable:
    """Sums for held-out loss and bits per byte (main next-token loss only)."""

    def eval_step(params, expert_bias, batch: batch_lib.Batch) -> dict[str, Any]:
        out = nnx.merge(graphdef, params, expert_bias)(
            batch.inputs,
            segment_ids_BS=batch.segment_ids,
            positions_BS=batch.positions,
            with_mtp=False,
            experts=experts,
        )
        mask = batch.loss_mask.astype(jnp.float32)
        nll = losses.token_nll(out.logits_BSY, batch.targets) * mask
        return {
            "nll_sum": nll.sum(),
            "tokens": mask.sum(),
            "bytes": (batch.target_bytes * mask).sum(),
        }

    return eval_step


def jit_train_step(
    fn: Callable,
    state_shardings: Any = None,
    batch_shardings: Any = None,
    metrics_shardings: Any = None,
):
    """jax.jit of a train step with the state donated; with shardings, the sharded ("pjit") step:
    explicit in/out shardings (train/sharded.py passes them; metrics replicated)."""
    kw = {}
    if state_shardings is not None:
        kw = dict(
            in_shardings=(state_shardings, batch_shardings),
            out_shardings=(state_shardings, metrics_shardings),
        )
    return jax.jit(fn, donate_argnums=0, **kw)
