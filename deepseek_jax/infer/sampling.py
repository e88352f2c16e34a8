"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (pure functions).

Order as in transformers: logits / temperature, then top-k, then top-p (the smallest set of most
likely tokens whose probability reaches p; the token that crosses p is kept). temperature = 0
means greedy (argmax). `probs` is the filtered distribution itself: speculative sampling needs the
exact p and q that plain sampling draws from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"--temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"--top-k: must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def log_probs(logits_BY: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Log of the distribution sampling draws from (float32 or wider; -inf where filtered).

    Any leading dims ([B, Y], or [B, W, Y] for the verify positions of speculative decoding).
    """
    x = logits_BY.astype(jnp.promote_types(logits_BY.dtype, jnp.float32))
    if cfg.greedy:  # a one-hot distribution on the argmax
        return jnp.where(jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1], dtype=bool), 0.0, -jnp.inf)
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth_B1 = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
        x = jnp.where(x < kth_B1, -jnp.inf, x)
    if cfg.top_p < 1:
        order = jnp.argsort(-x, axis=-1)
        p_sorted = jax.nn.softmax(jnp.take_along_axis(x, order, -1), axis=-1)
        before = jnp.cumsum(p_sorted, -1) - p_sorted  # mass strictly above each sorted token
        drop = jnp.take_along_axis(before >= cfg.top_p, jnp.argsort(order, axis=-1), -1)
        x = jnp.where(drop, -jnp.inf, x)
    return jax.nn.log_softmax(x, axis=-1)


def probs(logits_BY: jax.Array, cfg: SamplingConfig) -> jax.Array:
    return jnp.exp(log_probs(logits_BY, cfg))


def sample(logits_BY: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """int32 [B] token ids."""
    if cfg.greedy:
        return jnp.argmax(logits_BY, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, log_probs(logits_BY, cfg), axis=-1).astype(jnp.int32)


def sample_with_logp(
    logits_BY: jax.Array, key: jax.Array, cfg: SamplingConfig
) -> tuple[jax.Array, jax.Array]:
    """(int32 [B] tokens, float32 [B] their log-probability under the distribution drawn from).

    The same draw as `sample` (same key, same tokens); greedy gives log-prob 0 (one-hot). RL
    compares these with the trainer's recomputed log-probs of the same tokens.
    """
    lp_BY = log_probs(logits_BY, cfg)
    if cfg.greedy:
        tok_B = jnp.argmax(logits_BY, axis=-1).astype(jnp.int32)
    else:
        tok_B = jax.random.categorical(key, lp_BY, axis=-1).astype(jnp.int32)
    return tok_B, jnp.take_along_axis(lp_BY, tok_B[:, None], axis=-1)[:, 0]
