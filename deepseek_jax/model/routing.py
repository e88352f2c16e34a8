"""DeepSeekMoE routing as pure functions of arrays (float32 or wider throughout).

V3 (noaux_tc): s = sigmoid(x Wg); the correction bias b is added to s only to *choose* experts;
groups of E/G consecutive experts are scored by the sum of their top-2 biased scores and the best
`topk_group` groups are kept; top-k over the kept experts; the weights are the unbiased s of the
chosen experts, normalised to sum 1 (norm_topk_prob) and times routed_scaling_factor.
V2 (softmax): greedy top-k, or groups scored by their max (group_limited_greedy); no bias.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax.model import config as config_lib


@dataclasses.dataclass(frozen=True)
class Routing:
    idx_Xk: jax.Array  # int32 chosen experts per token
    weights_Xk: jax.Array  # float32 combine weights (normalised, scaled)
    scores_XE: jax.Array  # float32 unbiased affinities s


def affinities(logits_XE: jax.Array, score_func: config_lib.ScoreFunc) -> jax.Array:
    logits_XE = logits_XE.astype(jnp.promote_types(logits_XE.dtype, jnp.float32))
    if score_func is config_lib.ScoreFunc.SIGMOID:
        return jax.nn.sigmoid(logits_XE)
    return jax.nn.softmax(logits_XE, axis=-1)


def group_mask(select_XE: jax.Array, cfg: config_lib.MoEConfig) -> jax.Array:
    """Boolean [X, E]: True for experts in the `topk_group` best groups of each token."""
    X, E = select_XE.shape
    G = cfg.n_group
    grouped_XGe = select_XE.reshape(X, G, E // G)
    if cfg.topk_method is config_lib.TopkMethod.NOAUX_TC:
        group_score_XG = jax.lax.top_k(grouped_XGe, 2)[0].sum(-1)
    else:
        group_score_XG = grouped_XGe.max(-1)
    _, keep_Xg = jax.lax.top_k(group_score_XG, cfg.topk_group)
    keep_XG = jnp.any(jax.nn.one_hot(keep_Xg, G, dtype=jnp.bool_), axis=1)
    return jnp.repeat(keep_XG, E // G, axis=1)


def route(logits_XE: jax.Array, bias_E: jax.Array | None, cfg: config_lib.MoEConfig) -> Routing:
    scores_XE = affinities(logits_XE, cfg.score_func)
    select_XE = scores_XE
    if cfg.use_bias:
        select_XE = scores_XE + bias_E.astype(scores_XE.dtype)[None, :]
    if cfg.topk_method is not config_lib.TopkMethod.GREEDY and cfg.n_group > 1:
        select_XE = jnp.where(group_mask(select_XE, cfg), select_XE, -jnp.inf)
    _, idx_Xk = jax.lax.top_k(select_XE, cfg.top_k)
    weights_Xk = jnp.take_along_axis(scores_XE, idx_Xk, axis=-1)
    if cfg.norm_topk_prob:
        weights_Xk = weights_Xk / (weights_Xk.sum(-1, keepdims=True) + 1e-20)
    weights_Xk = weights_Xk * cfg.routed_scaling_factor
    return Routing(idx_Xk.astype(jnp.int32), weights_Xk, scores_XE)


def expert_load(idx_Xk: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert (float32 [E]) — the load the bias update balances."""
    return jnp.zeros((n_experts,), jnp.float32).at[idx_Xk.reshape(-1)].add(1.0)


def sequence_balance(scores_BSE: jax.Array, top_k: int) -> jax.Array:
    """Sequence-wise balance statistic sum_i f_i P_i, averaged over sequences (paper eqs. 17-20).

    f_i = E/(k T) * #tokens of the sequence whose top-k of the *unbiased* scores contains i;
    P_i = mean over the sequence of the normalised affinity s_i / sum_j s_j. The caller multiplies
    by alpha. Selection here is by the raw scores, as the paper's formula states, so the bias never
    enters a gradient.
    """
    B, S, E = scores_BSE.shape
    _, idx_BSk = jax.lax.top_k(scores_BSE, top_k)
    counts_BE = jax.nn.one_hot(idx_BSk, E, dtype=scores_BSE.dtype).sum(axis=(1, 2))
    f_BE = jax.lax.stop_gradient(counts_BE * (E / (top_k * S)))
    p_BE = (scores_BSE / scores_BSE.sum(-1, keepdims=True)).mean(axis=1)
    return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))
