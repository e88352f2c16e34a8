"""The pipelined train step: canonical state in and out, the same update as the unpipelined step.

The train state keeps the canonical (unpipelined) parameters, so checkpoints, evaluation and the
optimizer are unchanged. Each step gathers the MoE stack into the pipelined layout [P, K, Ls, ...]
(DualPipe's second copy included), runs the tick table, sums the gradients of every copy of a
stage back into the canonical [n_moe, ...] layout and calls `step.apply_update`. There is one
optimizer state and one parameter set, so the two DualPipe copies are identical after the update by
construction: the next step gathers both from the same updated array.

The loss is the objective's (`model.losses`), evaluated by the last stage on each micro-batch with
the whole batch's denominators; this file only adds up what the executor returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepseek_jax import batch as batch_lib
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import dispatch, losses
from deepseek_jax.model import moe as moe_lib
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel.pipeline import executor, schedules, stages, ticks
from deepseek_jax.train import config as train_config
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib


def microbatched(batch: batch_lib.Batch, microbatches: int) -> batch_lib.Batch:
    """Every field [B, ...] -> [M, B/M, ...]; micro-batch i holds rows i, i+M, i+2M, ... so that a
    batch sharded in contiguous row blocks over `data` gives every micro-batch an equal share of
    every block."""
    B = batch.inputs.shape[0]
    if B % microbatches:
        raise ValueError(
            f"a batch of {B} sequences is not divisible into {microbatches} micro-batches"
        )
    return jax.tree.map(
        lambda x: x.reshape(B // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1), batch
    )


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A schedule bound to a model: its op orders, table, executor layout and stage."""

    schedule: schedules.Schedule
    pp: int
    microbatches: int
    table: ticks.TickTable
    layout: executor.Layout
    stage: stages.Stage

    @property
    def num_stages(self) -> int:
        return self.layout.num_stages

    def tables(self, table: ticks.TickTable | None = None) -> dict[str, np.ndarray]:
        """The executor's tables; with uneven stages also `active` [P, K, Ls], the padding mask
        (stages.layer_counts says where the padding goes)."""
        tbl = executor.encode(self.table if table is None else table, self.layout)
        n = self.stage.cfg.n_moe_layers
        if n % self.num_stages:
            tbl["active"] = stages.active(tbl["placement"], n, self.num_stages)
        return tbl


def build(
    schedule: schedules.Schedule,
    pp: int,
    microbatches: int,
    graphdef,
    cfg: config_lib.ModelConfig,
    layout: executor.Layout | None = None,
    *,
    experts: dispatch.ExpertFn = dispatch.dropless_experts,
    objective: losses.Objective = losses.objective,
    split: parallel_config.BackwardSplit = parallel_config.BackwardSplit.EXACT,
) -> Pipeline:
    orders = schedules.build(schedule, pp, microbatches)
    table = ticks.build(orders, split)
    layout = layout or executor.Layout.of(table, num_stages=orders.num_stages)
    stage = stages.Stage(graphdef, cfg, microbatches, experts, objective)
    return Pipeline(schedules.Schedule(schedule), pp, microbatches, table, layout, stage)


def loss_and_grads(
    pipe: Pipeline,
    run: Callable,
    train_cfg: train_config.TrainConfig,
    state: state_lib.TrainState,
    batch: batch_lib.Batch,
    tbl: dict,
):
    """(loss, (metrics, moe_stats, mtp_stats), grads) as `step.loss_and_grads` returns them, plus
    the executor's `Result` (executed-op log, gradients in the pipelined layout)."""
    cfg, S = pipe.stage.cfg, pipe.num_stages
    acc = pipe.stage.acc_dtype
    mtp_lambda = optim.piecewise(train_cfg.mtp_lambda, state.step)
    weights = losses.Weights(mtp_lambda.astype(acc), train_cfg.balance_alpha)
    norms = losses.norms(batch, cfg.mtp_depth, acc, pipe.microbatches)
    mbs = microbatched(batch, pipe.microbatches)
    stack, glob = stages.split(state.params)
    bias_stack, bias_glob = stages.split(state.expert_bias)
    placement = jnp.asarray(tbl["placement"])
    res = run(
        stages.to_pipeline(stack, placement, S),
        stages.to_pipeline(bias_stack, placement, S),
        glob,
        bias_glob,
        mbs,
        norms,
        weights,
        tbl,
    )
    n = cfg.n_moe_layers  # padding slots of uneven stages are dropped here: never in the state
    grads = stages.join(stages.from_pipeline(res.d_stack, placement, S, n), res.d_glob)
    load = stages.from_pipeline(res.load, placement, S, n)
    balance = stages.from_pipeline(res.balance, placement, S, n)
    moe_stats = moe_lib.MoEStats(load, balance)
    mtp_stats = None
    if cfg.mtp_depth and cfg.mtp_is_moe:
        mtp_stats = moe_lib.MoEStats(res.epi.mtp_load, res.epi.mtp_balance)
    # The epilogues' metrics hold every term but the MoE stack's balance, which the bodies add.
    metrics = losses.with_balance(res.epi.metrics, jnp.sum(balance), weights)
    return metrics["loss"], (metrics, moe_stats, mtp_stats), grads, res


def make_train_step(
    pipe: Pipeline,
    mesh: jax.sharding.Mesh,
    train_cfg: train_config.TrainConfig,
    tx: optax.GradientTransformation,
) -> Callable:
    """train_step(state, batch, tbl) -> (state, metrics); tbl = pipe.tables()."""
    run = executor.build(pipe.stage, pipe.layout, mesh)
    graphdef = pipe.stage.graphdef

    def train_step(state: state_lib.TrainState, batch: batch_lib.Batch, tbl: dict):
        loss, aux, grads, _ = loss_and_grads(pipe, run, train_cfg, state, batch, tbl)
        return step_lib.apply_update(graphdef, train_cfg, tx, state, loss, aux, grads)

    return train_step
