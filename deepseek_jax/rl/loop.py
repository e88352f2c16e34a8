"""The GRPO loop: prompts -> G rollouts each -> rule rewards -> group advantages -> mu updates.

Per step: P prompts from the pool (rl/prompts.py) at the run's prompt position; P * G
completions from the sampler (rl/rollout.py) under the current policy with this step's key;
rewards per component (post/rewards.py) and their weighted total; advantages per group
(post/grpo.py, ddof 1); the reference's log-probs (frozen: the initial policy, never updated);
with mu > 1 the rollout policy's own log-probs as pi_old; then mu full-batch updates
(rl/step.py). Metrics per step go to metrics.jsonl and TensorBoard (names in docs/post_training.md).

Checkpoints as in pre-training (train/checkpoint.py): the policy's TrainState, the RNG key and
the prompt position, so a run killed and resumed draws the same prompts with the same keys from
the same weights and gets the same rewards. The reference is not saved: it is re-read from
`checkpoint.init_from` on resume, so that path must still exist. A workdir holding checkpoints
of another kind of run (pre-training, SFT) or of another model is refused before anything is
written.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import errors
from deepseek_jax.infer import generation, sampling
from deepseek_jax.post import grpo, rewards
from deepseek_jax.rl import config as rl_config
from deepseek_jax.rl import logprobs, prompts, rollout
from deepseek_jax.rl import step as step_lib
from deepseek_jax.train import checkpoint as checkpoint_lib
from deepseek_jax.train import config_diff, init_from, optim, preemption, preflight
from deepseek_jax.train import metrics as metrics_lib
from deepseek_jax.train import progress as progress_lib
from deepseek_jax.train import state as state_lib


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RLState:
    policy: state_lib.TrainState
    key: jax.Array  # typed PRNG key: split once per step for the rollout


def check_inputs(workdir: pathlib.Path, exp: rl_config.RLExperimentConfig) -> prompts.Pool:
    """Every check that needs no compile; raises a UserError before anything is written."""
    preflight.check_workdir(str(workdir))
    found = config_diff.saved_config(workdir)
    if found is not None and "rl" not in found[1]:
        raise errors.UserError(
            f"--workdir={workdir} holds checkpoints of a run that is not an rl run (step "
            f"{found[0]}'s config has no rl section); an rl run never writes over them: use a "
            "new --workdir (the policy comes from --config.checkpoint.init_from)"
        )
    config_diff.check_resume(workdir, exp)
    source = exp.checkpoint.init_from
    if not source:
        raise errors.UserError(
            "checkpoint.init_from: required: the policy (and the frozen reference) to start "
            "from, e.g. --config.checkpoint.init_from=<SFT workdir or step dir>"
        )
    preflight.check_init_source(source, exp.model)
    return prompts.Pool(exp.task, exp.rl)


def _reward_metrics(scores: list[dict[str, float]], names) -> dict[str, float]:
    out = {}
    for name in (*names, "total"):
        values = np.array([s[name] for s in scores], np.float64)
        key = "reward" if name == "total" else f"reward_{name}"
        out[f"{key}_mean"], out[f"{key}_max"] = float(values.mean()), float(values.max())
    return out


def run(exp: rl_config.RLExperimentConfig, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains to exp.rl.steps (resuming if possible); returns a summary for callers and tests."""
    workdir = pathlib.Path(workdir)
    pool = check_inputs(workdir, exp)
    r, g = exp.rl, exp.grpo
    weights = exp.rewards.weights()
    workdir.mkdir(parents=True, exist_ok=True)

    train_cfg = r.train_config()
    tx, lr = optim.optimizer(train_cfg), optim.learning_rate(train_cfg)
    graphdef, _, _ = state_lib.abstract_model(exp.model)
    initial = init_from.load_into(
        state_lib.init_state(exp.model, tx, r.seed), exp.model, exp.checkpoint.init_from
    )
    # Own buffers: the update donates the policy's.
    ref_params = jax.tree.map(jnp.copy, initial.params)
    fresh = RLState(initial, jax.random.key(r.seed))

    guard = preemption.PreemptionGuard().install()
    ckpt = checkpoint_lib.Checkpointer(
        workdir, keep_last=exp.checkpoint.keep_last, keep_every=exp.checkpoint.keep_every or None
    )
    restored = ckpt.restore(None, checkpoint_lib.abstract_state(fresh))
    if restored is not None:
        state, step = restored.state, restored.step
        position = int((restored.data or {}).get("next_prompt", step * r.prompts_per_step))
        print(f"resumed from step {step} ({workdir / 'checkpoints' / str(step)})", flush=True)
    else:
        state, step, position = fresh, 0, 0
        print(f"policy and reference from {exp.checkpoint.init_from}", flush=True)

    gen_cfg = generation.GenerateConfig(
        max_new_tokens=r.max_new_tokens,
        sampling=sampling.SamplingConfig(temperature=g.temperature, top_p=r.top_p),
        eos_id=pool.tokenizer.eos_id,
    )
    sampler = rollout.Sampler(graphdef, state.policy.params, state.policy.expert_bias, gen_cfg)
    logp_fn = logprobs.jitted(graphdef, g.temperature)
    update = step_lib.make_update(graphdef, g, tx, lr)
    writer = metrics_lib.MetricsWriter(workdir, process_index=jax.process_index())
    bar = progress_lib.Progress(r.steps, log_every=r.log_every)
    config_json = exp.to_dict()
    summary: dict[str, Any] = {"start_step": step, "rewards": []}

    try:
        while step < r.steps:
            t0 = time.perf_counter()
            key, k_rollout = jax.random.split(state.key)
            batch = pool.take(position, r.prompts_per_step)
            position += r.prompts_per_step
            sampler.set_policy(state.policy.params, state.policy.expert_bias)
            ro = sampler.sample([p.ids for p in batch], g.group_size, k_rollout, r.seq_len)
            t_rollout = time.perf_counter() - t0
            texts = [pool.decode(c) for c in ro.completions_BN]
            answers = [p.answer for p in batch for _ in range(g.group_size)]
            scores = [rewards.score(t, a, weights) for t, a in zip(texts, answers)]
            total_N = jnp.asarray([s["total"] for s in scores], jnp.float32)
            adv_N = grpo.group_advantages(total_N, g.group_size, g.advantage_eps)

            tokens, mask = jnp.asarray(ro.tokens_BS), jnp.asarray(ro.mask_BT)
            bias = state.policy.expert_bias
            ref_logp = logp_fn(ref_params, bias, tokens)
            old_logp = logp_fn(state.policy.params, bias, tokens) if g.iterations > 1 else None
            policy, sums, before = state.policy, {}, old_logp
            for _ in range(g.iterations):
                policy, m, logp = update(policy, tokens, mask, adv_N, ref_logp, old_logp)
                before = logp if before is None else before
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
            state = RLState(policy, key)
            step += 1

            m = {k: float(v) / g.iterations for k, v in jax.device_get(sums).items()}
            diff = np.abs(np.asarray(before) - ro.sampler_logp_BT)[ro.mask_BT]
            record = _reward_metrics(scores, weights)
            record.update(
                accuracy=record["reward_accuracy_mean"],
                kl=m["kl"],
                clip_fraction=m["clip_fraction"],
                response_length=m["response_length"],
                loss=m["loss"],
                grad_norm=m["grad_norm"],
                lr=m["lr"],
                skipped=int(m["skipped"]),
                logprob_diff=float(diff.mean()) if diff.size else 0.0,
                logprob_diff_max=float(diff.max()) if diff.size else 0.0,
                eos_fraction=float(
                    np.mean([(c == pool.tokenizer.eos_id).any() for c in ro.completions_BN])
                ),
                equal_reward_groups=float(
                    np.mean(np.asarray(adv_N).reshape(-1, g.group_size).std(1) == 0)
                ),
                rollout_s=t_rollout,
                step_s=time.perf_counter() - t0,
            )
            writer.write(step, record)
            summary["rewards"].append(record["reward_mean"])
            bar.update(
                step,
                extra={
                    "reward": record["reward_mean"],
                    "acc": record["accuracy"],
                    "kl": record["kl"],
                    "len": record["response_length"],
                },
            )
            if step == 1 or step % r.log_every == 0 or step == r.steps:
                bar.message(f"step {step}: {batch[0].text!r} -> {texts[0]!r}")
            data = {"next_prompt": position}
            if step % exp.checkpoint.every_steps == 0 or step == r.steps:
                ckpt.save(step, state, data=data, config=config_json)
            if guard.should_stop(step):
                ckpt.save(step, state, data=data, config=config_json, wait=True)
                bar.message(f"stopping at step {step} ({guard.reason}); checkpoint saved")
                summary.update(preempted=True, step=step)
                return summary
        summary.update(step=step, preempted=False)
        return summary
    finally:
        ckpt.wait_until_finished()
        ckpt.close()
        guard.uninstall()
        bar.close()
        writer.close()
