"""The GRPO objective: advantages, k3, the value and gradient at mu = 1, clipping at mu = 2, and
parity with TRL's GRPOTrainer loss (trl 1.16, CPU) on identical log-probs, masks, advantages."""

from __future__ import annotations

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import errors
from deepseek_jax.post import grpo


def test_advantages_normalise_per_group_and_equal_groups_are_exactly_zero():
    r = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1])
    a = np.asarray(grpo.group_advantages(r, 4))
    g = np.asarray(r[:4])
    np.testing.assert_allclose(a[:4], (g - g.mean()) / (g.std(ddof=1) + 1e-4), rtol=1e-6)
    assert (a[4:] == 0).all() and np.isfinite(a).all()
    with pytest.raises(errors.UserError, match="group_size must be >= 2"):
        grpo.group_advantages(r, 1)


def test_k3_is_nonnegative_and_its_monte_carlo_mean_is_the_kl():
    rng = np.random.default_rng(0)
    lp = rng.normal(size=10_000).astype(np.float32)
    near = lp + rng.normal(size=lp.shape).astype(np.float32) * 1e-7
    for ref in (near, rng.normal(size=lp.shape).astype(np.float32) * 5):
        assert (np.asarray(grpo.k3(jnp.asarray(lp), jnp.asarray(ref))) >= 0).all()
    with jax.enable_x64(True):
        p = np.asarray([0.1, 0.2, 0.3, 0.15, 0.25])
        q = np.asarray([0.3, 0.1, 0.1, 0.3, 0.2])
        x = np.random.default_rng(1).choice(5, size=200_000, p=p)
        k = np.asarray(grpo.k3(jnp.log(p[x]), jnp.log(q[x])))
        kl = float((p * np.log(p / q)).sum())
        assert abs(k.mean() - kl) < 3 * k.std() / np.sqrt(k.size)


def toy(seed=0, G=4, T=3, V=2):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=(G, T, V))  # logits are the parameters
    tokens = rng.integers(0, V, size=(G, T))
    ref_logits = rng.normal(size=(G, T, V))
    mask = np.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float64)[:G, :T]
    rewards = rng.random(G)
    return theta, tokens, ref_logits, mask, rewards


def test_mu1_value_is_beta_mean_kl_and_gradient_is_the_analytic_policy_gradient():
    with jax.enable_x64(True):
        theta, tokens, ref_logits, mask, rewards = toy()
        cfg = grpo.GRPOConfig(group_size=4, beta=0.04)
        adv = grpo.group_advantages(jnp.asarray(rewards), 4)
        ref = grpo.token_logps(jnp.asarray(ref_logits), jnp.asarray(tokens))

        def f(theta):
            lp = grpo.token_logps(theta, jnp.asarray(tokens))
            return grpo.loss(lp, None, ref, adv, jnp.asarray(mask), cfg)[0]

        value, grad = jax.value_and_grad(f)(jnp.asarray(theta))
        lp = np.asarray(grpo.token_logps(jnp.asarray(theta), jnp.asarray(tokens)))
        d = np.asarray(ref) - lp
        kl = np.exp(d) - d - 1
        n = mask.sum(1)
        np.testing.assert_allclose(value, 0.04 * ((kl * mask).sum(1) / n).mean(), atol=1e-12)
        # d loss / d log pi_t = (-A_i + beta (1 - pi_ref/pi)) mask / (G |o_i|);
        # d log pi(a) / d theta = onehot(a) - softmax(theta)
        dlp = (-np.asarray(adv)[:, None] + 0.04 * (1 - np.exp(d))) * mask / (4 * n[:, None])
        p = np.exp(theta - np.log(np.exp(theta).sum(-1, keepdims=True)))
        want = dlp[..., None] * (np.eye(2)[tokens] - p)
        np.testing.assert_allclose(np.asarray(grad), want, atol=1e-12)
        assert np.abs(want).max() > 1e-3


def test_mu2_clipped_tokens_get_zero_gradient():
    with jax.enable_x64(True):
        theta, tokens, _, mask, _ = toy(1)
        mask = np.ones_like(mask)
        adv = jnp.asarray([1.0, -1.0, 1.0, -1.0])
        lp0 = np.asarray(grpo.token_logps(jnp.asarray(theta), jnp.asarray(tokens)))
        # ratio e^0.5 on outputs 0, 1 and e^-0.5 on 2, 3: clipped where the sign pushes further
        old = lp0 - np.asarray([0.5, 0.5, -0.5, -0.5])[:, None]
        cfg = grpo.GRPOConfig(group_size=4, beta=0.0, epsilon=0.2)

        def f(theta):
            lp = grpo.token_logps(theta, jnp.asarray(tokens))
            return grpo.loss(lp, jnp.asarray(old), None, adv, jnp.asarray(mask), cfg)

        grad, metrics = jax.grad(f, has_aux=True)(jnp.asarray(theta))
        g = np.abs(np.asarray(grad)).sum(axis=(1, 2))
        assert g[0] == 0 and g[3] == 0  # rho > 1+eps with A > 0; rho < 1-eps with A < 0
        assert g[1] > 0 and g[2] > 0  # the other side of each is not clipped
        assert float(metrics["clip_fraction"]) == 0.5


def test_config_errors_name_the_field():
    for kwargs, match in [
        ({"group_size": 1}, "grpo.group_size"),
        ({"beta": -0.1}, "grpo.beta must be >= 0"),
        ({"epsilon": 0.0}, "grpo.epsilon must be > 0"),
        ({"iterations": 0}, "grpo.iterations"),
    ]:
        with pytest.raises(errors.UserError, match=match):
            grpo.GRPOConfig(**kwargs)
    preset = grpo.GRPOConfig.r1_zero()
    assert (preset.group_size, preset.beta, preset.temperature) == (16, 0.001, 1.0)
    assert (grpo.GRPOConfig().beta, grpo.GRPOConfig().epsilon) == (0.04, 0.2)


def trl_loss(logp, old, ref, adv, mask, beta, epsilon):
    """TRL's own GRPOTrainer._compute_loss (loss_type "grpo"), its model forward replaced by the
    given per-token log-probs; returns (loss, metrics)."""
    torch = pytest.importorskip("torch")
    trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    B, T = logp.shape
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
    metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    this = types.SimpleNamespace(
        loss_type="grpo",
        importance_sampling_level="token",
        beta=beta,
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        model=types.SimpleNamespace(training=False),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
        accelerator=types.SimpleNamespace(
            gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x
        ),
        current_gradient_accumulation_steps=1,
        _metrics=metrics,
        _get_per_token_logps_and_entropies=lambda *a, **k: (t(logp), t(np.zeros((B, T))), None),
    )
    inputs = {
        "prompt_ids": torch.zeros((B, 1), dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": torch.zeros((B, T), dtype=torch.long),
        "completion_mask": t(mask),
        "advantages": t(adv),
        "old_per_token_logps": t(old),
        "ref_per_token_logps": t(ref),
    }
    loss = trainer.GRPOTrainer._compute_loss(this, None, inputs)
    return float(loss), metrics["eval"]


def test_per_token_and_total_loss_equal_trls():
    rng = np.random.default_rng(3)
    B, T, beta, eps = 4, 5, 0.04, 0.2
    logp = np.log(rng.uniform(0.05, 1.0, (B, T)))
    old = logp + rng.normal(size=(B, T)) * 0.3  # mu > 1: some ratios outside the clip range
    ref = logp + rng.normal(size=(B, T)) * 0.5
    adv = np.asarray(grpo.group_advantages(jnp.asarray(rng.random(B)), B))
    mask = (np.arange(T) < np.asarray([5, 3, 4, 1])[:, None]).astype(np.float64)
    cfg = grpo.GRPOConfig(group_size=B, beta=beta, epsilon=eps)
    with jax.enable_x64(True):
        args = [jnp.asarray(x) for x in (logp, old, ref, adv)]
        ours, metrics = grpo.loss(*args, jnp.asarray(mask), cfg)
        per_token, _ = grpo.per_token_loss(*args, cfg)
    want, trl_metrics = trl_loss(logp, old, ref, adv, mask, beta, eps)
    np.testing.assert_allclose(float(ours), want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(metrics["kl"]), trl_metrics["kl"][0], rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics["clip_fraction"]), trl_metrics["clip_ratio/region_mean"][0], rtol=1e-6
    )
    assert 0 < float(metrics["clip_fraction"]) < 1
    # Per token: with one token unmasked, TRL's loss is that token's loss / B.
    for i in range(B):
        for j in range(int(mask[i].sum())):
            one = np.zeros_like(mask)
            one[i, j] = 1
            got = trl_loss(logp, old, ref, adv, one, beta, eps)[0] * B
            np.testing.assert_allclose(float(per_token[i, j]), got, rtol=1e-6, atol=1e-9)
