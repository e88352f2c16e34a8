"""The pipelined train step: canonical state in and out, the same update as the unpipelined step.

The train state keeps the canonical (unpipelined) parameters, so checkpoints, evaluation and the
optimizer are unchanged. Each step gathers the MoE stack into the pipelined layout [P, K, Ls, ...]
(DualPipe's second copy included), runs the tick table, sums the gradients of every copy of a
stage back into the canonical [n_moe, ...] layout and calls `step.apply_update`. There is one
optimizer state and one parameter set, so the two DualPipe copies are identical after the update by
construction: the next step gathers both from the same updated array.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import moe as moe_lib
from deepseek_jax.parallel import pipeline, schedules, stages, ticks
from deepseek_jax.parallel.schedules import Schedule
from deepseek_jax.train import config as train_config
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib


def microbatched(batch: dict, microbatches: int) -> dict:
    """[B, s] -> [M, B/M, s]; micro-batch i holds rows i, i+M, i+2M, ... so that a batch sharded
    in contiguous row blocks over `data` gives every micro-batch an equal share of every block."""
    B = batch["inputs"].shape[0]
    if B % microbatches:
        raise ValueError(f"a batch of {B} sequences is not divisible into {microbatches} "
                         "micro-batches")
    out = {}
    for k in ("inputs", "targets", "loss_mask"):
        x = batch[k]
        out[k] = x.reshape(B // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return out


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A schedule bound to a model: its plan, table, executor layout and stage description."""

    schedule: Schedule
    pp: int
    microbatches: int
    table: ticks.TickTable
    layout: pipeline.Layout
    stage: stages.Stage

    @property
    def num_stages(self) -> int:
        return self.layout.num_stages

    def tables(self, table: ticks.TickTable | None = None) -> dict[str, np.ndarray]:
        return pipeline.encode(self.table if table is None else table, self.layout)


def build(schedule: Schedule, pp: int, microbatches: int, graphdef,
          cfg: config_lib.ModelConfig, train_cfg: train_config.TrainConfig,
          layout: pipeline.Layout | None = None) -> Pipeline:
    plan = schedules.build(schedule, pp, microbatches)
    table = ticks.build(plan)
    layout = layout or pipeline.Layout.of(table, num_stages=plan.num_stages)
    stage = stages.Stage(graphdef, cfg, train_cfg.balance_alpha, microbatches)
    return Pipeline(Schedule(schedule), pp, microbatches, table, layout, stage)


def loss_and_grads(pipe: Pipeline, run: Callable, train_cfg: train_config.TrainConfig,
                   state: state_lib.TrainState, batch: dict, tbl: dict):
    """(loss, (metrics, moe_stats, mtp_stats), grads) as `step.loss_and_grads` returns them, plus
    the executor's `Result` (executed-op log, gradients in the pipelined layout)."""
    cfg, S = pipe.stage.cfg, pipe.num_stages
    mtp_lambda = optim.piecewise(train_cfg.mtp_lambda, state.step)
    acc = jnp.promote_types(cfg.compute_dtype.jnp, jnp.float32)
    norms = stages.norms(batch, cfg.mtp_depth, mtp_lambda.astype(acc), acc)
    mbs = microbatched(batch, pipe.microbatches)
    stack, glob = stages.split(state.params)
    bias_stack, bias_glob = stages.split(state.expert_bias)
    placement = jnp.asarray(tbl["placement"])
    res = run(stages.to_pipeline(stack, placement, S),
              stages.to_pipeline(bias_stack, placement, S), glob, bias_glob, mbs, norms, tbl)
    grads = stages.join(stages.from_pipeline(res.d_stack, placement, S), res.d_glob)
    load = stages.from_pipeline(res.load, placement, S)
    balance = stages.from_pipeline(res.balance, placement, S)
    moe_stats = moe_lib.MoEStats(load, balance)
    epi = res.epi
    mtp_stats = None
    if cfg.mtp_depth and cfg.mtp_is_moe:
        mtp_stats = moe_lib.MoEStats(epi.mtp_load, epi.mtp_balance)
    balance_total = jnp.sum(balance) + jnp.sum(epi.mtp_balance)
    loss = epi.lm + train_cfg.balance_alpha * balance_total
    metrics = {"lm_loss": epi.lm}
    if cfg.mtp_depth:
        mtp = jnp.mean(epi.mtp)
        loss = loss + norms.mtp_lambda * mtp
        metrics.update(mtp_loss=mtp, mtp_loss_per_depth=epi.mtp)
    metrics.update(balance_loss=balance_total, loss=loss)
    return loss, (metrics, moe_stats, mtp_stats), grads, res


def make_train_step(pipe: Pipeline, mesh: jax.sharding.Mesh,
                    train_cfg: train_config.TrainConfig, tx: optax.GradientTransformation
                    ) -> Callable:
    """train_step(state, batch, tbl) -> (state, metrics); tbl = pipe.tables()."""
    run = pipeline.executor(pipe.stage, pipe.layout, mesh)
    graphdef = pipe.stage.graphdef

    def train_step(state: state_lib.TrainState, batch: dict, tbl: dict):
        loss, aux, grads, _ = loss_and_grads(pipe, run, train_cfg, state, batch, tbl)
        return step_lib.apply_update(graphdef, train_cfg, tx, state, loss, aux, grads)

    return train_step


def jit_train_step(plan, exp, graphdef, tx: optax.GradientTransformation) -> Callable:
    """The jitted pipelined step (state, batch) -> (state, metrics) of an experiment whose
    parallel.pipeline is set, on `plan`'s mesh with its shardings and model hooks (activation
    constraints, expert parallelism) installed; the table is baked in as a constant."""
    par = exp.parallel
    pipe = build(Schedule(par.pipeline.value), par.stage, par.num_microbatches, graphdef,
                 exp.model, exp.train)
    step = make_train_step(pipe, plan.mesh, exp.train, tx)
    tbl = pipe.tables()
    return plan.jit_train_step(lambda state, batch: step(state, batch, tbl), exp.model, tx)
