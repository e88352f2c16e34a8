"""Supervised fine-tuning of the tiny model on an embedded synthetic chat task.

    make smoke   # or any checkpoint of configs/tiny.py's architecture (a from-hf output too)
    python -m deepseek_jax.train --config=configs/sft_tiny.py --workdir=runs/sft_tiny \
        [--config.checkpoint.init_from=runs/smoke]

The task: "Reverse: stone" -> "enots", in the byte tokenizer's chat template, answered in R1's
<think>…</think><answer>…</answer> form so that GRPO (configs/grpo_tiny.py) can start from the
result. Samples are packed several to a row with isolation; the loss is on the assistant's tokens
only. Evaluation: held-out assistant-token loss and greedy exact match on problems never trained
on. The schedule follows V3's SFT: cosine decay over 2 epochs (sft.epochs sets train.steps).
"""

import pathlib

from deepseek_jax import config as config_lib


def get_config():
    # The model (and every other default) of configs/tiny.py.
    c = config_lib.config_dict(pathlib.Path(__file__).with_name("tiny.py"))
    c.sft.update(
        source="task",
        task="reverse",
        think=True,
        task_length=4,  # fixed offsets: the tiny model learns them in minutes (3-6 it does not)
        task_train=16000,  # 8000 (500 steps) reached 65.6% exact match, 16000 100% by step 400
        task_eval=128,
        epochs=2.0,
        moe_bias="updated",
        eval_generate=128,
        max_new_tokens=64,
    )
    c.train.update(
        global_batch_size=16,
        seq_len=256,
        lr=3e-3,
        lr_final=3e-4,
        warmup_steps=10,
        log_every=10,
        eval_every=50,
        balance_alpha=1e-4,
    )
    # Every 50 steps kept: GRPO (configs/grpo_tiny.py) starts from the first step past 90% exact
    # match (250), whose samples still vary; the final policy is exact under sampling too, and
    # groups of equal rewards leave GRPO nothing to learn (docs/post_training.md).
    c.checkpoint.update(every_steps=50, keep_last=2, keep_every=50, init_from="runs/smoke")
    return c
