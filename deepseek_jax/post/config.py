"""Typed configuration of supervised fine-tuning (the `sft` section of an experiment config).

With `sft.source = none` (the default) an experiment pre-trains on `data`; any other source makes
the trainer fine-tune on chat samples instead: packed with isolation (post/packing.py), loss on
assistant tokens only, evaluated by held-out assistant-token loss and greedy exact match.
The tokenizer is still `data.tokenizer` / `data.tokenizer_path`; everything else about the
corpus comes from here.
"""

from __future__ import annotations

import dataclasses
import enum

from deepseek_jax.post import sft_data, tasks


class Source(enum.Enum):
    NONE = "none"  # pre-training on `data`
    TASK = "task"  # an embedded synthetic task (post/tasks.py), generated deterministically
    MESSAGES = "messages"  # messages JSONL files (post/sft_data.py)
    PROMPT_COMPLETION = "prompt_completion"  # prompt/completion JSONL files


class Template(enum.Enum):
    BUILTIN = "builtin"  # the byte tokenizer's built-in template
    TOKENIZER_CONFIG = "tokenizer_config"  # `chat_template` of a local tokenizer_config.json


class BiasMode(enum.Enum):
    """Whether DeepSeekMoE's aux-loss-free routing biases keep adapting during fine-tuning."""

    UPDATED = "updated"  # as in pre-training, at train.bias_update_rate
    FROZEN = "frozen"  # the routing of the initial checkpoint is kept bit for bit


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Attributes:
    source: where the conversations come from; NONE = this is not an SFT run.
    task, think, task_length, task_train, task_eval, task_seed: the synthetic task (source TASK):
      how many distinct train / held-out problems, from which generator seed; `think` writes
      replies in R1's <think>…</think><answer>…</answer> form (what GRPO's format reward scores);
      `task_length` fixes reverse's word length (0: 3 to 6 letters).
    paths, eval_paths: JSONL files (sources MESSAGES / PROMPT_COMPLETION) for training and for
      the held-out evaluation.
    template, tokenizer_config: how conversations are rendered.
    epochs: passes over the training rows; > 0 sets train.steps (and so the cosine decay length)
      to ceil(epochs * rows / global_batch_size). 0 keeps train.steps.
    moe_bias: keep updating the expert-selection biases, or freeze them.
    eval_generate: held-out prompts answered greedily for exact match (0: loss only).
    max_new_tokens: the longest answer generated for exact match.
    """

    source: Source = Source.NONE
    task: tasks.Task = tasks.Task.REVERSE
    think: bool = False
    task_length: int = 0
    task_train: int = 2000
    task_eval: int = 128
    task_seed: int = 0
    paths: tuple[str, ...] = ()
    eval_paths: tuple[str, ...] = ()
    template: Template = Template.BUILTIN
    tokenizer_config: str | None = None
    epochs: float = 2.0
    moe_bias: BiasMode = BiasMode.UPDATED
    eval_generate: int = 64
    max_new_tokens: int = 32

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"sft.{field}: {msg}")

        if self.source is Source.NONE:
            return
        if self.source is Source.TASK:
            if self.paths or self.eval_paths:
                fail("paths", "must be empty with sft.source=task (the task is generated)")
            for name in ("task_train", "task_eval"):
                if getattr(self, name) < 1:
                    fail(name, f"must be >= 1, got {getattr(self, name)}")
            if self.task_seed < 0:
                fail("task_seed", f"must be >= 0, got {self.task_seed}")
            if self.task_length < 0 or (self.task_length and self.task is not tasks.Task.REVERSE):
                fail("task_length", f"fixes reverse's word length (>= 0), got {self.task_length}")
        else:
            if not self.paths:
                fail(
                    "paths", f"must name at least one JSONL file for sft.source={self.source.value}"
                )
            if not self.eval_paths:
                fail("eval_paths", "must name at least one held-out JSONL file")
        if self.template is Template.TOKENIZER_CONFIG and not self.tokenizer_config:
            fail(
                "tokenizer_config",
                "must name a tokenizer_config.json for template=tokenizer_config",
            )
        if self.template is Template.BUILTIN and self.tokenizer_config:
            fail("tokenizer_config", "is only read with sft.template=tokenizer_config")
        if self.epochs < 0:
            fail("epochs", f"must be >= 0, got {self.epochs}")
        if self.eval_generate < 0:
            fail("eval_generate", f"must be >= 0, got {self.eval_generate}")
        if self.max_new_tokens < 1:
            fail("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")

    @property
    def enabled(self) -> bool:
        return self.source is not Source.NONE

    @property
    def file_format(self) -> sft_data.Format:
        return (
            sft_data.Format.MESSAGES
            if self.source is Source.MESSAGES
            else sft_data.Format.PROMPT_COMPLETION
        )
