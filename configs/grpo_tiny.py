"""GRPO on the tiny model of configs/tiny.py, from its SFT checkpoint, on the `reverse` task.

    python -m deepseek_jax.rl --config=configs/grpo_tiny.py --workdir=runs/grpo_tiny \
        --config.checkpoint.init_from=runs/sft_tiny/checkpoints/250

The policy answers in R1's format, <think>...</think><answer>...</answer>, and earns the
accuracy reward (exact answer) plus the format reward. DeepSeekMath's GRPO defaults (beta 0.04,
epsilon 0.2, mu 1, G 8, k3 KL); the learning rate is far above its 1e-6 because the model is tiny.
"""

import pathlib

from deepseek_jax import config as config_lib
from deepseek_jax import dataclass_dict
from deepseek_jax.post import grpo
from deepseek_jax.rl import config as rl_config


def get_config():
    c = rl_config.default_config_dict()
    # configs/tiny.py, whose model the SFT checkpoint has.
    tiny = config_lib.config_dict(pathlib.Path(__file__).with_name("tiny.py"))
    c.model.update(tiny.model.to_dict())
    c.rl.update(steps=100, prompts_per_step=8, max_new_tokens=64, seq_len=128, lr=5e-5)
    c.rl.update(log_every=10)
    c.grpo.update(dataclass_dict.to_dict(grpo.GRPOConfig()))  # DeepSeekMath: G 8, beta 0.04
    # R1-Zero preset (G 16, beta 0.001, temperature 1): uncomment the next line.
    # c.grpo.update(dataclass_dict.to_dict(grpo.GRPOConfig.r1_zero()))
    c.task.update(name="reverse", think=True, length=4)  # configs/sft_tiny.py's task_length
    c.checkpoint.update(every_steps=25, keep_last=2)
    return c
