"""Experiment configuration: a `configs/*.py` ConfigDict -> typed frozen dataclasses, once.

Sections: model (ModelConfig), train (TrainConfig), data (DataConfig), parallel (ParallelConfig),
checkpoint (CheckpointConfig), sft (post/config.SFTConfig: fine-tuning on chat data instead of
pre-training on `data`). Every value is validated here, before anything is compiled, and
errors name the field (e.g. "model.n_group: ...").
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from deepseek_jax import dataclass_dict, errors
from deepseek_jax.data import config as data_config
from deepseek_jax.model import config as model_config
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.post import config as sft_config
from deepseek_jax.train import config as train_config


class ConfigError(errors.UserError, ValueError):
    """An invalid experiment config; the message names the field."""


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
    sft: sft_config.SFTConfig = sft_config.SFTConfig()

    def __post_init__(self):
        parallel_config.check_pipeline(self.parallel, self.model, self.train)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": dataclass_dict.to_dict(self.train),
            "data": self.data.to_dict(),
            "parallel": dataclass_dict.to_dict(self.parallel),
            "checkpoint": dataclass_dict.to_dict(self.checkpoint),
            "sft": dataclass_dict.to_dict(self.sft),
        }


SECTIONS = ("model", "train", "data", "parallel", "checkpoint", "sft")


def section_types() -> dict[str, type]:
    return dataclass_dict.field_types(ExperimentConfig)


def _dataclass_of(tp: Any) -> type | None:
    tp = dataclass_dict.optional_of(tp) or tp
    return tp if dataclasses.is_dataclass(tp) else None


def check_field_path(path: str, root: type | None = None) -> None:
    """Raises ConfigError unless `path` ("model.n_layers", "train.mtp_lambda.values") names a
    field of the experiment config (or of `root`, another tool's config dataclass, e.g. the rl
    one); the message says which section and the closest name."""
    cls, where = root or ExperimentConfig, []
    sections = list(dataclass_dict.field_types(cls))
    for part in path.split("."):
        names = dataclass_dict.field_types(cls)
        if part not in names:
            if not where:
                raise ConfigError(
                    f"--config.{path}: unknown config section {part!r}"
                    f"{errors.did_you_mean(part, names)}; sections: "
                    f"{', '.join(sections)}"
                )
            raise ConfigError(
                "--config." + dataclass_dict.unknown_field(".".join(where), part, set(names))
            )
        where.append(part)
        cls = _dataclass_of(names[part])
        if cls is None:
            if len(where) < len(path.split(".")):
                raise ConfigError(f"--config.{path}: {'.'.join(where)} is a value, not a section")
            return


def _check_keys(cls: type, d: Mapping[str, Any], prefix: str) -> None:
    """Unknown keys of one section (and its nested dataclasses), named with the closest field."""
    if not isinstance(d, Mapping):
        return
    names = dataclass_dict.field_types(cls)
    for key, value in d.items():
        if key not in names:
            raise ConfigError(dataclass_dict.unknown_field(prefix, key, set(names)))
        if (sub := _dataclass_of(names[key])) is not None:
            _check_keys(sub, value, f"{prefix}.{key}")


def _plain(x: Any) -> Any:
    """ConfigDict / FrozenConfigDict -> plain nested dicts (and tuples kept)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def from_config_dict(cd: Any) -> ExperimentConfig:
    """The typed config; any invalid value raises ConfigError naming the field."""
    d = _plain(cd)
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown config section {unknown[0]!r}"
            f"{errors.did_you_mean(unknown[0], SECTIONS)}; sections: "
            f"{', '.join(SECTIONS)}"
        )
    for name, cls in section_types().items():
        _check_keys(cls, d.get(name, {}), name)
    try:
        return _convert(d)
    except ConfigError:
        raise
    except ValueError as e:  # every check in the config dataclasses raises ValueError
        raise ConfigError(str(e)) from e


def _convert(d: Mapping[str, Any]) -> ExperimentConfig:
    return ExperimentConfig(
        model=model_config.ModelConfig.from_dict(d.get("model", {})),
        train=dataclass_dict.from_dict(train_config.TrainConfig, d.get("train", {}), "train"),
        data=data_config.DataConfig.from_dict(d.get("data", {})),
        parallel=dataclass_dict.from_dict(
            parallel_config.ParallelConfig, d.get("parallel", {}), "parallel"
        ),
        checkpoint=dataclass_dict.from_dict(
            CheckpointConfig, d.get("checkpoint", {}), "checkpoint"
        ),
        sft=dataclass_dict.from_dict(sft_config.SFTConfig, d.get("sft", {}), "sft"),
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


def config_dict(path) -> Any:
    """The ConfigDict of a configs/*.py file (its get_config()), e.g. to build on another config."""
    import importlib.util
    import os

    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path}: no such file")
    spec = importlib.util.spec_from_file_location("_experiment_config", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load(path: str, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Loads a configs/*.py file (get_config()) and applies dotted overrides ("train.steps": 10)."""
    cd = config_dict(path)
    for key, value in (overrides or {}).items():
        check_field_path(key)
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


_PLACEHOLDER_TYPES = (int, float, str, bool, tuple)


def _typed(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """Wraps the value of every `X | None` field in a FieldReference of type X: a field that holds
    None has no type for config_flags, which then refuses to override it from the command line
    (--config.data.tokenizer_path=tok.json). Nested dataclass sections are handled recursively."""
    from ml_collections import config_dict

    out = dict(d)
    for name, tp in dataclass_dict.field_types(cls).items():
        if name not in out:
            continue
        if (sub := _dataclass_of(tp)) is not None and isinstance(out[name], Mapping):
            out[name] = _typed(sub, out[name])
        elif (inner := dataclass_dict.optional_of(tp)) is not None:
            inner = typing.get_origin(inner) or inner
            if isinstance(inner, type) and issubclass(inner, enum.Enum):
                inner = str  # enums live in the ConfigDict as their names/values
            if inner in _PLACEHOLDER_TYPES:
                out[name] = config_dict.FieldReference(out[name], field_type=inner)
    return out


def default_config_dict():
    """A ConfigDict holding every field at its default: config files override from here, so any
    field can be set on the command line (--config.train.steps=10), Optional ones included."""
    import ml_collections

    default = ExperimentConfig(
        model=model_config.ModelConfig(),
        train=train_config.TrainConfig(),
        data=data_config.DataConfig(),
        parallel=parallel_config.ParallelConfig(),
        checkpoint=CheckpointConfig(),
        sft=sft_config.SFTConfig(),
    )
    sections = _tuples(default.to_dict())
    return ml_collections.ConfigDict(
        {name: _typed(cls, sections[name]) for name, cls in section_types().items()}
    )
