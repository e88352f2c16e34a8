"""Routing properties: group limit, normalised and scaled weights, bias for selection only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import routing

CFG = config_lib.ModelConfig(
    n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5
).moe()


def logits(n=64, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, CFG.n_routed_experts)) * 2


def test_group_limit_respected_and_groups_ranked_by_top2_sum():
    lg = logits()
    bias = 0.3 * jax.random.normal(jax.random.key(1), (16,))
    r = routing.route(lg, bias, CFG)
    idx = np.asarray(r.idx_Xk)
    groups = idx // (16 // 4)
    assert max(len(set(row)) for row in groups) <= CFG.topk_group
    sel = np.asarray(jax.nn.sigmoid(lg) + bias[None, :]).reshape(-1, 4, 4)
    top2 = np.sort(sel, -1)[..., -2:].sum(-1)
    best = np.argsort(-top2, -1)[:, :2]
    for row_groups, row_best in zip(groups, best):
        assert set(row_groups) <= set(row_best)


def test_weights_are_normalised_unbiased_scores_times_scale():
    lg = logits()
    bias = 0.3 * jax.random.normal(jax.random.key(1), (16,))
    r = routing.route(lg, bias, CFG)
    np.testing.assert_allclose(np.asarray(r.weights_Xk).sum(-1), 2.5, rtol=1e-6)
    s = np.asarray(jax.nn.sigmoid(lg))
    picked = np.take_along_axis(s, np.asarray(r.idx_Xk), -1)
    np.testing.assert_allclose(
        np.asarray(r.weights_Xk), 2.5 * picked / picked.sum(-1, keepdims=True), rtol=1e-6
    )


def test_bias_changes_selection_but_weights_come_from_raw_scores():
    lg = logits(256)
    bias = jnp.zeros((16,)).at[3].set(5.0)  # huge bias: expert 3 always chosen
    with_bias = routing.route(lg, bias, CFG)
    without = routing.route(lg, jnp.zeros((16,)), CFG)
    assert np.all(np.any(np.asarray(with_bias.idx_Xk) == 3, -1))
    assert not np.all(np.any(np.asarray(without.idx_Xk) == 3, -1))
    s = np.asarray(jax.nn.sigmoid(lg))
    picked = np.take_along_axis(s, np.asarray(with_bias.idx_Xk), -1)
    np.testing.assert_allclose(
        np.asarray(with_bias.weights_Xk), 2.5 * picked / picked.sum(-1, keepdims=True), rtol=1e-6
    )


def test_softmax_greedy_without_normalisation():
    cfg = dataclasses.replace(
        CFG,
        score_func=config_lib.ScoreFunc.SOFTMAX,
        topk_method=config_lib.TopkMethod.GREEDY,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
    )
    lg = logits()
    r = routing.route(lg, None, cfg)
    p = np.asarray(jax.nn.softmax(lg, -1))
    want_idx = np.argsort(-p, -1)[:, :4]
    np.testing.assert_array_equal(np.sort(np.asarray(r.idx_Xk), -1), np.sort(want_idx, -1))
    np.testing.assert_allclose(
        np.asarray(r.weights_Xk), np.take_along_axis(p, np.asarray(r.idx_Xk), -1), rtol=1e-6
    )


def test_sequence_balance_matches_loop_formula():
    B, S, E, k = 3, 10, 16, 4
    scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(2), (B, S, E)))
    got = float(routing.sequence_balance(scores, k))
    s = np.asarray(scores)
    total = 0.0
    for b in range(B):
        f = np.zeros(E)
        for t in range(S):
            for i in np.argsort(-s[b, t])[:k]:
                f[i] += E / (k * S)
        p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
        total += (f * p).sum()
    assert abs(got - total / B) < 1e-5
    uniform = jnp.ones((1, 8, E))  # perfectly spread load: f.P = 1 up to tie-breaking
    assert abs(float(routing.sequence_balance(uniform, k)) - 1.0) < 1e-6


def test_expert_load_counts_every_choice():
    idx = jnp.asarray([[0, 3], [3, 1], [3, 0]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(routing.expert_load(idx, 5)), [2, 1, 0, 3, 0])
