"""One GRPO policy update as a pure function: grpo.loss of the teacher-forced log-probs, its
gradient, the clipped AdamW update (train/optim.py), as the pre-training step does it.

The expert-selection biases are frozen: they steer routing, which the RL gradient does not see,
and the bias rule balances a pre-training distribution that rollouts are not. MTP modules are
not run (no gradient; with rl.weight_decay 0 they stay as the policy checkpoint had them). A step
whose loss or gradient norm is not finite changes nothing and reports skipped = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.post import grpo
from deepseek_jax.rl import logprobs
from deepseek_jax.train import state as state_lib


def make_update(
    graphdef, cfg: grpo.GRPOConfig, tx: optax.GradientTransformation, lr: optax.Schedule
):
    """update(state, tokens, mask, advantages, ref_logp, old_logp | None) -> (state, metrics,
    the policy's log-probs before this update)."""

    def update(state: state_lib.TrainState, tokens_BS, mask_BT, adv_B, ref_logp_BT, old_logp_BT):
        def loss_fn(params):
            logp = logprobs.token_logps(
                graphdef, params, state.expert_bias, tokens_BS, cfg.temperature
            )
            loss, metrics = grpo.loss(logp, old_logp_BT, ref_logp_BT, adv_B, mask_BT, cfg)
            return loss, (metrics, logp)

        (loss, (metrics, logp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def keep_if_bad(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        new_state = state_lib.TrainState(
            step=state.step + 1,
            params=keep_if_bad(params, state.params),
            expert_bias=state.expert_bias,
            opt_state=keep_if_bad(opt_state, state.opt_state),
        )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.int32))
        metrics["lr"] = lr(state.step)
        return new_state, metrics, jax.lax.stop_gradient(logp)

    return jax.jit(update, donate_argnums=0)
