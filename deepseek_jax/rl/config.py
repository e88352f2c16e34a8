"""The GRPO experiment config: a `configs/grpo_*.py` ConfigDict -> typed frozen dataclasses, once.

Sections: model (ModelConfig, must match the policy checkpoint), rl (the run: steps, prompts per
step, lengths, optimizer), grpo (post/grpo.GRPOConfig itself: G, beta, epsilon, mu, temperature),
task (the synthetic prompts), rewards (weight per rule reward), checkpoint (CheckpointConfig;
`checkpoint.init_from` is the policy, required). Every value is validated before anything is
compiled, and each error names its field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from deepseek_jax import config as config_lib
from deepseek_jax import dataclass_dict, errors
from deepseek_jax.model import config as model_config
from deepseek_jax.post import grpo, rewards, tasks
from deepseek_jax.train import config as train_config


@dataclasses.dataclass(frozen=True)
class RLConfig:
    steps: int = 100
    prompts_per_step: int = 4  # each sampled group_size times: prompts_per_step * G rows
    max_new_tokens: int = 64  # a completion stops at EOS or here
    seq_len: int = 128  # context: prompt + completion
    top_p: float = 1.0  # the trainer's log-probs ignore top-p: keep 1 for exact ratios
    seed: int = 0  # policy init draw (overwritten by init_from), rollout keys, prompt order
    # AdamW, constant LR after warmup (DeepSeekMath: 1e-6 for a 7B; a tiny model needs more).
    lr: float = 1e-5
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10  # console lines; metrics.jsonl gets every step

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "max_new_tokens", "seq_len", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rl.{name}: must be a positive integer, got {value!r}")
        if self.max_new_tokens >= self.seq_len:
            raise ValueError(
                f"rl.max_new_tokens: {self.max_new_tokens} leaves no room for a prompt in "
                f"rl.seq_len={self.seq_len}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rl.top_p: must be in (0, 1], got {self.top_p}")
        if self.lr <= 0:
            raise ValueError(f"rl.lr: must be positive, got {self.lr}")
        for name in ("warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"rl.{name}: must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"rl.b1: Adam betas must be in [0, 1), got {self.b1}, {self.b2}")
        if self.grad_clip <= 0:
            raise ValueError(f"rl.grad_clip: must be positive, got {self.grad_clip}")

    @property
    def max_prompt_len(self) -> int:
        return self.seq_len - self.max_new_tokens

    def train_config(self) -> train_config.TrainConfig:
        """The optimizer's view (train/optim.py): warmup, then the constant lr."""
        return train_config.TrainConfig(
            steps=self.steps,
            lr=self.lr,
            lr_final=self.lr,
            warmup_steps=self.warmup_steps,
            b1=self.b1,
            b2=self.b2,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
        )


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: tasks.Task = tasks.Task.REVERSE
    think: bool = True  # the SFT replies' format, <think>...</think><answer>...</answer>
    problems: int = 1024  # distinct training prompts, cycled in a seeded order per epoch
    seed: int = 0  # which problems (tasks.examples)
    length: int = 0  # reverse's word length (0: 3 to 6 letters); match the SFT's sft.task_length

    def __post_init__(self):
        if self.problems < 1:
            raise ValueError(f"task.problems: must be >= 1, got {self.problems}")
        if self.length < 0 or (self.length and self.name is not tasks.Task.REVERSE):
            raise ValueError(
                f"task.length: fixes the reverse task's word length (>= 0), got {self.length} "
                f"for task {self.name.value}"
            )


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weight of each rule reward of post/rewards.py in the total (0: reported, not rewarded)."""

    accuracy: float = 1.0
    format: float = 1.0

    def __post_init__(self):
        assert set(rewards.REWARDS) == {f.name for f in dataclasses.fields(self)}
        for name, w in self.weights().items():
            if w < 0:
                raise ValueError(f"rewards.{name}: weights must be >= 0, got {w}")
        if not any(self.weights().values()):
            raise ValueError("rewards: every weight is 0, so every advantage would be 0")

    def weights(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def max_total(self) -> float:
        return sum(self.weights().values())


@dataclasses.dataclass(frozen=True)
class RLExperimentConfig:
    model: model_config.ModelConfig
    rl: RLConfig
    grpo: grpo.GRPOConfig
    task: TaskConfig
    rewards: RewardConfig
    checkpoint: config_lib.CheckpointConfig

    def __post_init__(self):
        if self.model.vocab_size < 258:
            raise ValueError(
                f"model.vocab_size: the rl tasks use the byte tokenizer (258 ids), got "
                f"{self.model.vocab_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict()}
        for name in SECTIONS[1:]:
            out[name] = dataclass_dict.to_dict(getattr(self, name))
        return out


SECTIONS = ("model", "rl", "grpo", "task", "rewards", "checkpoint")


def check_field_path(path: str) -> None:
    """ConfigError unless `path` ("grpo.beta") names a field of this config."""
    config_lib.check_field_path(path, root=RLExperimentConfig)


def from_config_dict(cd: Any) -> RLExperimentConfig:
    """The typed config; any invalid value raises a UserError naming the field."""
    d = config_lib._plain(cd)
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise config_lib.ConfigError(
            f"unknown config section {unknown[0]!r}{errors.did_you_mean(unknown[0], SECTIONS)}; "
            f"sections of an rl config: {', '.join(SECTIONS)}"
        )
    types = dataclass_dict.field_types(RLExperimentConfig)
    for name, cls in types.items():
        config_lib._check_keys(cls, d.get(name, {}), name)
    try:
        return _convert(d)
    except errors.UserError:
        raise
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e


def _convert(d: Mapping[str, Any]) -> RLExperimentConfig:
    sections = {
        name: dataclass_dict.from_dict(cls, d.get(name, {}), name)
        for name, cls in dataclass_dict.field_types(RLExperimentConfig).items()
        if name != "model"
    }
    return RLExperimentConfig(
        model=model_config.ModelConfig.from_dict(d.get("model", {})), **sections
    )


def default_config_dict():
    """Every field at its default, so any of them can be overridden on the command line."""
    import ml_collections

    default = RLExperimentConfig(
        model=model_config.ModelConfig(vocab_size=258),
        rl=RLConfig(),
        grpo=grpo.GRPOConfig(),
        task=TaskConfig(),
        rewards=RewardConfig(),
        checkpoint=config_lib.CheckpointConfig(),
    )
    sections = config_lib._tuples(default.to_dict())
    types = dataclass_dict.field_types(RLExperimentConfig)
    return ml_collections.ConfigDict(
        {name: config_lib._typed(cls, sections[name]) for name, cls in types.items()}
    )
