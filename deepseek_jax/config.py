"""Experiment configuration: a `configs/*.py` ConfigDict -> typed frozen dataclasses, once.

Sections: model (ModelConfig), train (TrainConfig), data (DataConfig), parallel (ParallelConfig),
checkpoint (CheckpointConfig). Every value is validated here, before anything is compiled, and
errors name the field (e.g. "model.n_group: ...").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from deepseek_jax import dataclass_dict
from deepseek_jax.data import config as data_config
from deepseek_jax.model import config as model_config
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.train import config as train_config


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100  # also saved at the end of training
    keep_last: int = 3
    keep_every: int = 0  # additionally keep every k-th step forever (0: none)
    async_save: bool = True
    init_from: str | None = None  # params (+ expert biases) to start from, e.g. a from-hf output

    def __post_init__(self):
        if self.every_steps <= 0:
            raise ValueError(f"checkpoint.every_steps must be positive, got {self.every_steps}")
        if self.keep_last <= 0:
            raise ValueError(f"checkpoint.keep_last must be positive, got {self.keep_last}")
        if self.keep_every < 0:
            raise ValueError(f"checkpoint.keep_every must be >= 0, got {self.keep_every}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: model_config.ModelConfig
    train: train_config.TrainConfig
    data: data_config.DataConfig
    parallel: parallel_config.ParallelConfig
    checkpoint: CheckpointConfig

    def __post_init__(self):
        parallel_config.check_pipeline(self.parallel, self.model, self.train)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": dataclass_dict.to_dict(self.train),
            "data": self.data.to_dict(),
            "parallel": dataclass_dict.to_dict(self.parallel),
            "checkpoint": dataclass_dict.to_dict(self.checkpoint),
        }


SECTIONS = ("model", "train", "data", "parallel", "checkpoint")


def _plain(x: Any) -> Any:
    """ConfigDict / FrozenConfigDict -> plain nested dicts (and tuples kept)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def from_config_dict(cd: Any) -> ExperimentConfig:
    d = _plain(cd)
    unknown = set(d) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)} (known: {list(SECTIONS)})")
    return ExperimentConfig(
        model=model_config.ModelConfig.from_dict(d.get("model", {})),
        train=dataclass_dict.from_dict(train_config.TrainConfig, d.get("train", {}), "train"),
        data=data_config.DataConfig.from_dict(d.get("data", {})),
        parallel=dataclass_dict.from_dict(parallel_config.ParallelConfig, d.get("parallel", {}),
                                          "parallel"),
        checkpoint=dataclass_dict.from_dict(CheckpointConfig, d.get("checkpoint", {}),
                                            "checkpoint"),
    )


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """["train.steps=10", "parallel.preset=fsdp"] -> {"train.steps": 10, ...} for `load` (bench
    scripts' --set flags): Python literals where the text is one, else the bare string."""
    import ast

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not FIELD=VALUE")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def load(path: str, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Loads a configs/*.py file (get_config()) and applies dotted overrides ("train.steps": 10)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_experiment_config", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cd = module.get_config()
    for key, value in (overrides or {}).items():
        node = cd
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_config_dict(cd)


def _tuples(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def default_config_dict():
    """A ConfigDict holding every field at its default: config files override from here, so any
    field can be set on the command line (--config.train.steps=10)."""
    import ml_collections

    default = ExperimentConfig(
        model=model_config.ModelConfig(),
        train=train_config.TrainConfig(),
        data=data_config.DataConfig(),
        parallel=parallel_config.ParallelConfig(),
        checkpoint=CheckpointConfig(),
    )
    return ml_collections.ConfigDict(_tuples(default.to_dict()))
