"""Per-token log-probabilities of rollouts under a model, by teacher forcing: the training forward.

A rollout row is `prompt | completion | padding` in `tokens_BS`; the model reads tokens[:, :-1]
and the log-prob of target t = tokens[:, t + 1] is that of the sampled token at that position
(only the completion mask's positions mean anything). The temperature divides the logits as it
did in the sampler, so with top-p off these equal the sampler's log-probs up to the numerics of
the KV-cache decode path (measured in tests/rl/, reported per step as `logprob_diff`).

Right padding is harmless: attention is causal, the dropless MoE routes each token on its own,
and positions start at 0 in every row, as in the prefill.
"""

from __future__ import annotations

import jax
from flax import nnx

from deepseek_jax.post import grpo


def token_logps(
    graphdef, params, expert_bias, tokens_BS: jax.Array, temperature: float
) -> jax.Array:
    """float32 [B, S-1]: log pi(tokens[:, t+1] | tokens[:, :t+1]) at temperature."""
    model = nnx.merge(graphdef, params, expert_bias)
    out = model(tokens_BS[:, :-1], with_mtp=False)
    return grpo.token_logps(out.logits_BSY, tokens_BS[:, 1:], temperature)


def jitted(graphdef, temperature: float):
    """token_logps as one compiled function of (params, expert_bias, tokens)."""
    return jax.jit(lambda p, b, t: token_logps(graphdef, p, b, t, temperature))
