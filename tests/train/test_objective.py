"""One objective for every path: the pipelined step's loss is `losses.objective` of the model's own
logits, and a field added to the Batch reaches the objective through the pipeline intact.

Uses the pipeline harness (tests/parallel/pipeline_harness.py): its tiny MoE + MTP model, state
and batch, and its cached compiled programs; float64, so any difference is a different formula.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.batch import Batch
from deepseek_jax.model import losses
from deepseek_jax.parallel.pipeline import executor
from deepseek_jax.parallel.pipeline.schedules import Schedule
from deepseek_jax.train import optim, pipeline_step
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib
from tests.parallel import pipeline_harness as h

DTYPE = "float64"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WeightedBatch(Batch):
    """A Batch with a field no step knows about: per-token weights of an extra CE term."""

    token_weight: Any = None


def weighted_objective(out, batch, norms, weights):
    """The pre-training objective plus sum(w * nll) / tokens, reading the new field."""
    loss, metrics = losses.objective(out, batch, norms, weights)
    mask = batch.loss_mask.astype(losses.loss_dtype(out))
    x = out.logits_BSY if out.head_DY is None else out.hidden_BSD  # either forward
    extra = losses.masked_nll(x, out, batch.targets, mask * batch.token_weight, norms.tokens)
    return loss + extra, {**metrics, "weighted_lm": extra, "loss": metrics["loss"] + extra}


def weighted_batch(batch: Batch) -> WeightedBatch:
    w = np.random.default_rng(7).random(batch.inputs.shape)
    return WeightedBatch(**batch.to_dict(), token_weight=jnp.asarray(w, DTYPE))


def direct(objective, batch) -> tuple:
    """objective(...) on one plain forward of the harness model: (loss, metrics)."""
    st, _ = h.state(DTYPE)
    cfg = h.model_config(DTYPE)
    graphdef, _, _ = state_lib.abstract_model(cfg)

    @jax.jit
    def run(params, bias, batch):
        out = nnx.merge(graphdef, params, bias)(batch.inputs)
        norms = losses.norms(batch, cfg.mtp_depth, losses.loss_dtype(out))
        weights = losses.Weights(
            optim.piecewise(h.TRAIN.mtp_lambda, st.step), h.TRAIN.balance_alpha
        )
        return objective(out, batch, norms, weights)

    return jax.device_get(run(st.params, st.expert_bias, batch))


def test_pipelined_loss_is_the_objective_of_the_models_logits():
    metrics = h.compiled(Schedule.DUALPIPE, 2, DTYPE).run()[2]
    with jax.enable_x64(True):
        loss, want = direct(losses.objective, h.state(DTYPE)[1])
    assert h.max_rel(metrics["loss"], loss) <= 1e-12
    for key in ("lm_loss", "mtp_loss", "balance_loss"):
        assert h.max_rel(metrics[key], want[key]) <= 1e-12, key


@functools.cache
def pipelined_weighted():
    """loss_and_grads of the weighted objective, pipelined (1F1B on 2 ranks) and unpipelined."""
    schedule, pp = Schedule.ONE_F_ONE_B, 2
    with jax.enable_x64(True):
        st, batch = h.state(DTYPE)
        batch = weighted_batch(batch)
        cfg = h.model_config(DTYPE)
        graphdef, _, _ = state_lib.abstract_model(cfg)
        plan = h.plan_for(schedule, pp, DTYPE)
        pipe = pipeline_step.build(
            schedule,
            pp,
            h.MICROBATCHES,
            graphdef,
            cfg,
            experts=plan.experts(),
            objective=weighted_objective,
        )
        run = executor.build(pipe.stage, pipe.layout, plan.mesh)

        def pipelined(st, batch, tbl):
            loss, (metrics, _, _), grads, _ = pipeline_step.loss_and_grads(
                pipe, run, h.TRAIN, st, batch, tbl
            )
            return loss, metrics, grads

        def plain(st, batch):
            loss, (metrics, _, _), grads = step_lib.loss_and_grads(
                graphdef, h.TRAIN, st, batch, objective=weighted_objective
            )
            return loss, metrics, grads

        placed_st, placed_batch = h.placed(plan, DTYPE)
        placed_batch = jax.device_put(batch, plan.batch_sharding())
        got = (
            jax.jit(plan.wrap(pipelined))
            .lower(placed_st, placed_batch, pipe.tables())
            .compile(h.FAST_COMPILE)(placed_st, placed_batch, pipe.tables())
        )
        want = jax.jit(plain).lower(st, batch).compile(h.FAST_COMPILE)(st, batch)
        return jax.device_get(got), jax.device_get(want), batch


def test_a_new_batch_field_reaches_the_objective_on_the_pipelined_path():
    (loss, metrics, grads), (loss0, metrics0, grads0), batch = pipelined_weighted()
    assert isinstance(batch, WeightedBatch)
    # The field arrived whole in every micro-batch: its term sums to the whole-batch value ...
    with jax.enable_x64(True):
        _, direct_metrics = direct(weighted_objective, batch)
    assert metrics["weighted_lm"] > 0
    assert h.max_rel(metrics["weighted_lm"], direct_metrics["weighted_lm"]) <= 1e-12
    assert h.max_rel(metrics["weighted_lm"], metrics0["weighted_lm"]) <= 1e-12
    # ... and it drives the gradients exactly as on the unpipelined path.
    assert h.max_rel(loss, loss0) <= 1e-12
    assert h.worst(grads, grads0)[0] <= 1e-10
    # Without the term the loss differs: the field was really used.
    assert abs(float(loss) - float(metrics["loss"] - metrics["weighted_lm"])) > 1e-6
