"""The prompt pool draws the configured problems: `task.length` fixes the reverse words' length,
so GRPO asks what the SFT taught (configs/sft_tiny.py's sft.task_length)."""

from __future__ import annotations

from deepseek_jax.rl import config as rl_config
from deepseek_jax.rl import prompts


def test_task_length_fixes_the_words_and_zero_draws_three_to_six_letters():
    rl = rl_config.RLConfig()
    fixed = prompts.Pool(rl_config.TaskConfig(problems=64, length=4), rl)
    assert {len(p.answer) for p in fixed.prompts} == {4}
    assert all(p.text.endswith(p.answer[::-1]) for p in fixed.prompts)
    mixed = prompts.Pool(rl_config.TaskConfig(problems=64), rl)
    assert {len(p.answer) for p in mixed.prompts} == {3, 4, 5, 6}
