"""The train state and the train/eval steps on a plan's mesh.

    plan = plan_lib.make_plan(exp.parallel, exp.model, exp.train.global_batch_size)
    state = sharded.init_state(plan, exp.model, tx, seed)   # or restore into abstract_state(..)
    step = sharded.train_step(plan, exp.model, exp.train, graphdef, tx)  # pipelined or not
    state, metrics = step(state, plan.global_batch(local_batch, G))

Every step is one jit with explicit in/out shardings (the "pjit" step): the state is donated and
keeps its shardings, the batch is split over the batch axes, metrics come back replicated so every
process can read them. `train_step` picks the pipelined step when `parallel.pipeline` is set; both
run the same objective (model/losses.py) and the same update (step.apply_update).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import optax
from jax.sharding import PartitionSpec as P

from deepseek_jax.model import config as model_config
from deepseek_jax.model import losses
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel import sharding as sharding_lib
from deepseek_jax.parallel.pipeline import stages
from deepseek_jax.train import config as train_config
from deepseek_jax.train import pipeline_step
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib


def state_specs(
    plan: plan_lib.Plan, model_cfg: model_config.ModelConfig, abstract: state_lib.TrainState
) -> state_lib.TrainState:
    """PartitionSpecs of the train state: parameters and biases by the plan's rules, optimizer
    state mirroring its parameters (and split over `data` with parallel.zero=1); under a
    pipeline each rank keeps its stages' layers."""
    logical_params, logical_bias = state_lib.logical_axes(model_cfg)
    sizes = plan.sizes
    params = sharding_lib.tree_specs(plan.rules, logical_params, abstract.params, sizes, "params")
    bias = sharding_lib.tree_specs(
        plan.rules, logical_bias, abstract.expert_bias, sizes, "expert_bias"
    )
    if plan.cfg.pipeline is not parallel_config.Schedule.NONE:
        params = stages.stack_over_pipe(params, abstract.params, sizes)
        bias = stages.stack_over_pipe(bias, abstract.expert_bias, sizes, "expert_bias")
    opt = sharding_lib.mirror_specs(params, abstract.params, abstract.opt_state)
    if plan.cfg.zero == 1:  # ZeRO-1: the optimizer state is also split over `data`
        opt = sharding_lib.zero1_specs(opt, abstract.opt_state, sizes)
    return state_lib.TrainState(step=P(), params=params, expert_bias=bias, opt_state=opt)


# Both trace the model init (seconds for a large model); the loop asks several times.
@functools.lru_cache(maxsize=8)
def _abstract_state(model_cfg, tx) -> state_lib.TrainState:
    return state_lib.abstract_state(model_cfg, tx)


@functools.lru_cache(maxsize=8)
def state_shardings(
    plan: plan_lib.Plan, model_cfg: model_config.ModelConfig, tx: optax.GradientTransformation
) -> state_lib.TrainState:
    specs = state_specs(plan, model_cfg, _abstract_state(model_cfg, tx))
    return sharding_lib.named(plan.mesh, specs)


def abstract_state(
    plan: plan_lib.Plan, model_cfg: model_config.ModelConfig, tx: optax.GradientTransformation
) -> state_lib.TrainState:
    """ShapeDtypeStructs carrying the plan's shardings (checkpoint restore targets)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        _abstract_state(model_cfg, tx),
        state_shardings(plan, model_cfg, tx),
    )


def init_state(
    plan: plan_lib.Plan,
    model_cfg: model_config.ModelConfig,
    tx: optax.GradientTransformation,
    seed: int,
) -> state_lib.TrainState:
    """A jitted init whose outputs are born sharded: no device ever holds the whole model."""
    return state_lib.init_state(
        model_cfg, tx, seed, out_shardings=state_shardings(plan, model_cfg, tx)
    )


def jit_train_step(
    plan: plan_lib.Plan,
    train_step: Callable,
    model_cfg: model_config.ModelConfig,
    tx: optax.GradientTransformation,
) -> Callable:
    """(state, batch) -> (state, metrics) of `train_step` as one jit on the plan's mesh, with
    activation constraints, explicit in/out shardings and the state donated."""
    return step_lib.jit_train_step(
        plan.wrap(train_step),
        state_shardings(plan, model_cfg, tx),
        plan.batch_sharding(),
        plan.replicated(),
    )


def train_step(
    plan: plan_lib.Plan,
    model_cfg: model_config.ModelConfig,
    train_cfg: train_config.TrainConfig,
    graphdef,
    tx: optax.GradientTransformation,
    objective: losses.Objective = losses.objective,
) -> Callable:
    """The jitted train step of this plan: pipelined when `plan.cfg.pipeline` is set (its tick
    table baked in as a constant), the plain step otherwise."""
    par, experts = plan.cfg, plan.experts()
    if par.pipeline is parallel_config.Schedule.NONE:
        fn = step_lib.make_train_step(graphdef, train_cfg, tx, experts=experts, objective=objective)
        return jit_train_step(plan, fn, model_cfg, tx)
    pipe = pipeline_step.build(
        par.pipeline,
        par.pipe,
        par.num_microbatches,
        graphdef,
        model_cfg,
        experts=experts,
        objective=objective,
        split=par.backward_split,
    )
    step = pipeline_step.make_train_step(pipe, plan.mesh, train_cfg, tx)
    tbl = pipe.tables()
    return jit_train_step(plan, lambda state, batch: step(state, batch, tbl), model_cfg, tx)


def eval_step(
    plan: plan_lib.Plan,
    model_cfg: model_config.ModelConfig,
    graphdef,
    tx: optax.GradientTransformation,
) -> Callable:
    """(params, expert_bias, batch) -> replicated sums for held-out loss and bits/byte."""
    s = state_shardings(plan, model_cfg, tx)
    return jax.jit(
        plan.wrap(step_lib.make_eval_step(graphdef, plan.experts())),
        in_shardings=(s.params, s.expert_bias, plan.batch_sharding()),
        out_shardings=plan.replicated(),
    )
