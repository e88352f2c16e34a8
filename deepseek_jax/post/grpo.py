"""The GRPO objective (DeepSeekMath §4.1; R1 Methods eq. 1-3) as pure functions of arrays.

For each prompt, G outputs o_i sampled from the old policy, rewards r_i:
    A_i     = (r_i - mean(r)) / (std(r) + eps)              outcome advantage, every token of o_i
    rho     = pi_theta / pi_old per token                     (= 1 in value when mu = 1)
    k3      = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1      per-token KL estimate, >= 0
    loss_t  = -min(rho A, clip(rho, 1 - eps_lo, 1 + eps_hi) A) + beta k3
    loss    = mean_i [ sum_t mask_it loss_it / |o_i| ]   token mean per output, mean over outputs
Masks cover completion tokens only (not the prompt, not padding after EOS).

std uses ddof = 1 (the unbiased sample std, as TRL and Tunix; MaxText uses ddof = 0; the paper
does not say), eps = 1e-4 (TRL's). A group whose rewards are all equal gets advantage exactly 0
(never 0/eps noise, never NaN); the KL term still acts on it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepseek_jax import errors

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Defaults = DeepSeekMath (beta 0.04, epsilon 0.2, mu 1, k3); R1-Zero: `r1_zero()`."""

    group_size: int = 8  # G
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: symmetric clip
    iterations: int = 1  # mu: policy updates per batch of rollouts
    advantage_eps: float = 1e-4
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise errors.UserError(
                f"grpo.group_size must be an int >= 2 (advantages compare outputs within a "
                f"group), got {self.group_size!r}"
            )
        if self.beta < 0:
            raise errors.UserError(f"grpo.beta must be >= 0, got {self.beta}")
        for name in ("epsilon", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise errors.UserError(f"grpo.{name} must be > 0, got {value}")
        if self.iterations < 1:
            raise errors.UserError(f"grpo.iterations must be >= 1, got {self.iterations}")
        if self.temperature <= 0:
            raise errors.UserError(f"grpo.temperature must be > 0, got {self.temperature}")

    @classmethod
    def r1_zero(cls) -> GRPOConfig:
        return cls(group_size=16, beta=0.001, temperature=1.0)


def group_advantages(rewards_N: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
    """[N] advantages of N = P * G rewards laid out group by group (ddof = 1)."""
    if group_size < 2:
        raise errors.UserError(f"grpo.group_size must be >= 2, got {group_size}")
    r_PG = rewards_N.reshape(-1, group_size)
    centered_PG = r_PG - r_PG.mean(axis=1, keepdims=True)
    std_P1 = jnp.std(r_PG, axis=1, ddof=1, keepdims=True)
    equal_P1 = r_PG.max(axis=1, keepdims=True) == r_PG.min(axis=1, keepdims=True)
    adv_PG = jnp.where(equal_P1, 0.0, centered_PG / (std_P1 + eps))
    return adv_PG.reshape(rewards_N.shape)


def token_logps(logits_BTY: jax.Array, tokens_BT: jax.Array, temperature: float = 1.0):
    """log pi(token) per position, float32 at least (the sampler's temperature applied)."""
    logits = logits_BTY.astype(jnp.promote_types(logits_BTY.dtype, jnp.float32)) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tokens_BT[..., None], axis=-1)[..., 0] - logz


def k3(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
    """e^d - d - 1 with d = log pi_ref - log pi_theta: unbiased for KL(pi_theta || pi_ref) under
    pi_theta, and >= 0; expm1 keeps it exact near d = 0, the clamp exact-zero at rounding."""
    d = ref_logp_BT - logp_BT
    return jnp.maximum(jnp.expm1(d) - d, 0.0)


def per_token_loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array | None,
    ref_logp_BT: jax.Array | None,
    advantages_B: jax.Array,
    cfg: GRPOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss [B, T], per-token terms). `old_logp` None: mu = 1, the ratio is 1 in value with the
    policy's own gradient; `ref_logp` None: no KL (beta must then be 0)."""
    old = jax.lax.stop_gradient(logp_BT) if old_logp_BT is None else old_logp_BT
    ratio = jnp.exp(logp_BT - old)
    hi = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    clipped = jnp.clip(ratio, 1.0 - cfg.epsilon, 1.0 + hi)
    a = advantages_B[:, None]
    loss = -jnp.minimum(ratio * a, clipped * a)
    if ref_logp_BT is None:
        if cfg.beta != 0:
            raise errors.UserError("grpo.beta > 0 needs the reference model's log-probs")
        kl = jnp.zeros_like(logp_BT)
    else:
        kl = k3(logp_BT, ref_logp_BT)
        loss = loss + cfg.beta * kl
    is_clipped = ((ratio < 1.0 - cfg.epsilon) & (a < 0)) | ((ratio > 1.0 + hi) & (a > 0))
    return loss, {"kl": kl, "ratio": ratio, "clipped": is_clipped}


def aggregate(per_token_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """The paper's aggregation: token mean per output, then mean over the outputs."""
    mask = mask_BT.astype(per_token_BT.dtype)
    per_output = (per_token_BT * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    return per_output.mean()


def loss(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array | None,
    ref_logp_BT: jax.Array | None,
    advantages_B: jax.Array,
    mask_BT: jax.Array,
    cfg: GRPOConfig,
) -> tuple[jax.Array, Metrics]:
    """(loss, metrics): KL and clip fraction as means over all completion tokens."""
    per_token, terms = per_token_loss(logp_BT, old_logp_BT, ref_logp_BT, advantages_B, cfg)
    mask = mask_BT.astype(per_token.dtype)
    tokens = jnp.maximum(mask.sum(), 1.0)
    metrics = {
        "kl": (terms["kl"] * mask).sum() / tokens,
        "clip_fraction": (terms["clipped"] * mask).sum() / tokens,
        "response_length": mask.sum(axis=1).mean(),
    }
    return aggregate(per_token, mask), metrics
