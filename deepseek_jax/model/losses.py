"""The training objective, written once: next-token CE + lambda * mean_k MTP CE_k + alpha * balance.

Every term is a *sum* over the tokens (or sequences) of the batch it is given, divided by
denominators passed in (`Norms`) rather than computed from that batch. With the whole batch's
denominators (`norms(batch, ...)`) this is the usual masked mean; a pipeline evaluates it on one
micro-batch at a time with the whole batch's denominators, and the per-micro-batch values (loss
and every metric) add up to the whole-batch value. The unpipelined step (train/step.py) and the
pipeline's last stage (parallel/pipeline/stages.py) both call `objective`; nothing else computes a
loss term. It lives in model/ because both of them (and infer/, for token log-likelihoods) sit
above model/ and neither may import the other.

Depth k's MTP targets are the main targets shifted left by k; the last k positions have no target
and are masked (never wrapped). The balance statistics in `MoEStats` are means over the sequences
of one forward call, so a micro-batch's share of the whole-batch mean is 1/M of it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from deepseek_jax import batch as batch_lib
from deepseek_jax.model import head_loss, layers, transformer
from deepseek_jax.model import moe as moe_lib
from deepseek_jax.model import mtp as mtp_lib

Metrics = dict[str, jax.Array]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["tokens", "mtp_tokens"],
    meta_fields=["microbatches"],
)
@dataclasses.dataclass(frozen=True)
class Norms:
    """Whole-batch denominators."""

    tokens: jax.Array  # max(sum of loss_mask, 1): the main CE's token count
    mtp_tokens: jax.Array  # [J]: the same per MTP depth (masks shifted left by k)
    microbatches: int = 1  # calls the batch is split into (balance statistics are per call)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["mtp_lambda"], meta_fields=["balance_alpha"]
)
@dataclasses.dataclass(frozen=True)
class Weights:
    mtp_lambda: jax.Array  # this step's MTP weight (a schedule of the step)
    balance_alpha: float  # weight of the sequence-wise balance loss


class Objective(Protocol):
    """(outputs, batch, norms, weights) -> (loss, metrics), every value additive over
    micro-batches; metrics include "loss" and "balance_loss" (see `with_balance`)."""

    def __call__(
        self, out: transformer.Outputs, batch: batch_lib.Batch, norms: Norms, weights: Weights
    ) -> tuple[jax.Array, Metrics]: ...


def token_nll(logits_BSY: jax.Array, targets_BS: jax.Array) -> jax.Array:
    logits = logits_BSY.astype(jnp.promote_types(logits_BSY.dtype, jnp.float32))
    logz_BS = jax.nn.logsumexp(logits, axis=-1)
    picked_BS = jnp.take_along_axis(logits, targets_BS[..., None], axis=-1)[..., 0]
    return logz_BS - picked_BS


def masked_nll(
    x: jax.Array,
    out: transformer.Outputs,
    targets_BS: jax.Array,
    mask_BS: jax.Array,
    denom: jax.Array,
) -> jax.Array:
    """sum(mask * nll) / denom, where x is the logits [B, S, Y], or, when `out` carries the head
    (`out.head_DY`, the forward run with logits=False), the head's input [B, S, D], to which the
    fused chunked head + CE is applied without building the logits (model/head_loss.py)."""
    if out.head_DY is None:
        return jnp.sum(token_nll(x, targets_BS) * mask_BS) / denom
    D = x.shape[-1]
    return head_loss.weighted_nll(
        x.reshape(-1, D),
        out.head_DY,
        targets_BS.reshape(-1),
        (mask_BS / denom).reshape(-1),  # one weighted sum: its gradient is known in the forward
        out.loss_chunk_tokens,
        x.dtype,
    )


def loss_dtype(out: transformer.Outputs):
    """The dtype the loss is computed in (the logits', or >= float32 when they are not built)."""
    if out.head_DY is None:
        return out.logits_BSY.dtype
    return layers.accum_dtype(out.hidden_BSD.dtype)


def mtp_targets(
    targets_BS: jax.Array, mask_BS: jax.Array, depth: int, segment_ids_BS: jax.Array | None = None
):
    """[J, B, S] targets and masks: depth k predicts t_{i+k+1} = targets[i+k].

    With `segment_ids_BS` (packed, isolated samples), depth k's target at position i counts only
    if position i+k is in the same sample: the shifted mask alone would let the last k positions
    of one sample predict the next sample's first targets.
    """
    t_JBS, m_JBS = mtp_lib.shifted(targets_BS, depth), mtp_lib.shifted(mask_BS, depth)
    if segment_ids_BS is not None:
        same_JBS = mtp_lib.shifted(segment_ids_BS, depth) == segment_ids_BS[None]
        m_JBS = jnp.where(same_JBS, m_JBS, jnp.zeros((), m_JBS.dtype))
    return t_JBS, m_JBS


def norms(batch: batch_lib.Batch, mtp_depth: int, dtype, microbatches: int = 1) -> Norms:
    """The denominators of `batch` as a whole (tokens counted in `dtype`)."""
    mask_BS = batch.loss_mask.astype(dtype)
    _, m_JBS = mtp_targets(batch.targets, mask_BS, mtp_depth, batch.segment_ids)
    return Norms(
        jnp.maximum(mask_BS.sum(), 1.0), jnp.maximum(m_JBS.sum(axis=(1, 2)), 1.0), microbatches
    )


def balance_term(stats: moe_lib.MoEStats | None, norms: Norms) -> jax.Array:
    """This call's share of the whole batch's balance statistic, summed over its MoE layers."""
    if stats is None:
        return jnp.zeros(())
    return jnp.sum(stats.balance) / norms.microbatches


def with_balance(metrics: Metrics, balance: jax.Array, weights: Weights) -> Metrics:
    """Adds a balance statistic to "balance_loss" (unweighted) and alpha times it to "loss"."""
    out = dict(metrics)
    out["balance_loss"] = out["balance_loss"] + balance.astype(out["balance_loss"].dtype)
    out["loss"] = out["loss"] + (weights.balance_alpha * balance).astype(out["loss"].dtype)
    return out


def objective(
    out: transformer.Outputs, batch: batch_lib.Batch, norms: Norms, weights: Weights
) -> tuple[jax.Array, Metrics]:
    """The pre-training objective (an `Objective`)."""
    mask_BS = batch.loss_mask.astype(loss_dtype(out))
    fused = out.head_DY is not None
    main, mtp_in = (
        (out.hidden_BSD, out.mtp_hidden_JBSD) if fused else (out.logits_BSY, out.mtp_logits_JBSY)
    )
    lm = masked_nll(main, out, batch.targets, mask_BS, norms.tokens)
    metrics = {"lm_loss": lm}
    loss = lm
    if mtp_in is not None:
        depth = mtp_in.shape[0]
        t_JBS, m_JBS = mtp_targets(batch.targets, mask_BS, depth, batch.segment_ids)
        per_depth = jax.vmap(lambda x, t, m, n: masked_nll(x, out, t, m, n))(
            mtp_in, t_JBS, m_JBS, norms.mtp_tokens
        )
        mtp = jnp.mean(per_depth)  # (lambda / J) * sum_k = lambda * mean_k
        loss = loss + weights.mtp_lambda * mtp
        metrics["mtp_loss"] = mtp
        metrics["mtp_loss_per_depth"] = per_depth
    metrics.update(balance_loss=jnp.zeros((), loss.dtype), loss=loss)
    balance = jnp.zeros((), loss.dtype)
    for stats in (out.moe_stats, out.mtp_stats):
        if stats is not None:
            balance = balance + balance_term(stats, norms)
    metrics = with_balance(metrics, balance, weights)
    return metrics["loss"], metrics
