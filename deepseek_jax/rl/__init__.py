"""GRPO training of a policy checkpoint with rule rewards (DeepSeekMath, DeepSeek-R1).

    config     the typed rl experiment config (model, rl, grpo, task, rewards, checkpoint)
    prompts    the task's prompt pool, in a seeded order that a resumed run repeats
    rollout    G samples per prompt through infer/generation, in the teacher-forcing layout
    logprobs   per-token log-probs of rollouts under a model (the training forward)
    step       one jitted policy update: post/grpo.loss, its gradient, AdamW
    loop       rollouts -> rewards -> advantages -> mu updates, checkpoints, metrics

`python -m deepseek_jax.rl --config=configs/grpo_tiny.py --workdir=...` (docs/post_training.md).
Imports post/, infer/ and train/; nothing imports rl/.
"""
