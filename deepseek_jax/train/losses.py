"""Training objective: next-token CE + (lambda/D) sum of MTP CEs + alpha * sequence balance loss.

All cross-entropies are means over unmasked target positions (sum / count), so the value does not
depend on how the batch is split across devices. Depth k's targets are the main targets shifted left
by k; the last k positions have no target and are masked (never wrapped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.model import transformer


def token_nll(logits_BSY: jax.Array, targets_BS: jax.Array) -> jax.Array:
    logits = logits_BSY.astype(jnp.promote_types(logits_BSY.dtype, jnp.float32))
    logz_BS = jax.nn.logsumexp(logits, axis=-1)
    picked_BS = jnp.take_along_axis(logits, targets_BS[..., None], axis=-1)[..., 0]
    return logz_BS - picked_BS


def masked_mean(values_BS: jax.Array, mask_BS: jax.Array) -> jax.Array:
    return jnp.sum(values_BS * mask_BS) / jnp.maximum(jnp.sum(mask_BS), 1.0)


def shift_left(x_BS: jax.Array, k: int) -> jax.Array:
    pad = jnp.zeros((x_BS.shape[0], min(k, x_BS.shape[1])), x_BS.dtype)
    return jnp.concatenate([x_BS[:, k:], pad], axis=1)


def mtp_targets(targets_BS: jax.Array, mask_BS: jax.Array, depth: int):
    """[D, B, S] targets and masks: depth k predicts t_{i+k+1} = targets[i+k]."""
    targets = jnp.stack([shift_left(targets_BS, k) for k in range(1, depth + 1)])
    masks = jnp.stack([shift_left(mask_BS, k) for k in range(1, depth + 1)])
    return targets, masks


def objective(out: transformer.Outputs, batch: dict, mtp_lambda: jax.Array,
              balance_alpha: float) -> tuple[jax.Array, dict]:
    mask_BS = batch["loss_mask"].astype(out.logits_BSY.dtype)
    ce = masked_mean(token_nll(out.logits_BSY, batch["targets"]), mask_BS)
    metrics = {"lm_loss": ce}
    loss = ce
    if out.mtp_logits_DBSY is not None:
        depth = out.mtp_logits_DBSY.shape[0]
        t_DBS, m_DBS = mtp_targets(batch["targets"], mask_BS, depth)
        per_depth = jax.vmap(lambda lg, t, m: masked_mean(token_nll(lg, t), m))(
            out.mtp_logits_DBSY, t_DBS, m_DBS)
        mtp = jnp.mean(per_depth)  # (lambda / D) * sum_k = lambda * mean_k
        loss = loss + mtp_lambda * mtp
        metrics["mtp_loss"] = mtp
        metrics["mtp_loss_per_depth"] = per_depth
    balance = jnp.zeros((), out.logits_BSY.dtype)
    for stats in (out.moe_stats, out.mtp_stats):
        if stats is not None:
            balance = balance + jnp.sum(stats.balance)
    loss = loss + balance_alpha * balance
    metrics["balance_loss"] = balance  # unweighted; the loss adds alpha times this
    metrics["loss"] = loss
    return loss, metrics
