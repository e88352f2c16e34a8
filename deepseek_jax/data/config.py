"""Typed configuration of the data pipeline: where the text comes from and how it is tokenised.

`DataConfig` is standalone on purpose: the experiment-wide `deepseek_jax/config.py` wraps it (it
owns the `data` section of the ConfigDict and calls `DataConfig.from_dict`). Sequence length and
batch sizes are *not* fields here: the trainer owns them (they are tied to the model's context and
the optimiser batch) and passes them to `make_train_iterator` / `make_eval_iterator` directly.
Every invalid value fails here, before any file is read, with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class SourceKind(enum.Enum):
    """Where documents come from. One document = one file, one JSON line or one record."""

    STDLIB = "stdlib"  # the running interpreter's own standard-library .py files
    TEXT = "text"  # plain UTF-8 text files: a file, a directory (recursive) or a glob
    JSONL = "jsonl"  # JSON lines; the document is the string under `text_field`
    ARRAY_RECORD = "array_record"  # ArrayRecord files whose records are UTF-8 text


class TokenizerKind(enum.Enum):
    BYTE = "byte"  # 256 byte values + EOS + PAD, see tokenizers.ByteTokenizer
    HF = "hf"  # a local Hugging Face tokenizer.json, loaded with the `tokenizers` library


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the data pipeline reads and how it tokenises it.

    Attributes:
      source: kind of corpus.
      paths: files, directories or globs (TEXT, JSONL, ARRAY_RECORD); must be empty for STDLIB.
      text_field: JSON key holding the document text (JSONL only).
      stdlib_include_tests: also take the stdlib's test directories (test/, tests/, idle_test/).
      tokenizer: BYTE (default) or HF.
      tokenizer_path: path of a local tokenizer.json (HF only; never downloaded).
      eos_token: HF only: the token string separating documents. None = detect a known one.
      pad_token: HF only: the token string used for padding. None = the EOS id (always masked).
      eval_fraction: expected share of documents held out for evaluation, in (0, 1).
      split_seed: salt of the document hash that decides the held-out split. Kept apart from the
        shuffle seed so that changing the training seed never moves documents between splits.
      shuffle: shuffle document order and sequence order per epoch (train only; eval never is).
      skip_bad_records: skip (and count) unreadable/empty/invalid documents instead of failing.
      cache_dir: where to keep tokenised corpora keyed by content and tokenizer. None = no cache.
      num_threads: grain prefetch threads assembling batches (0 = assemble in the caller).
      prefetch_batches: batches grain keeps ready ahead of the trainer.
    """

    source: SourceKind = SourceKind.STDLIB
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    stdlib_include_tests: bool = False
    tokenizer: TokenizerKind = TokenizerKind.BYTE
    tokenizer_path: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    eval_fraction: float = 0.02
    split_seed: int = 0
    shuffle: bool = True
    skip_bad_records: bool = False
    cache_dir: str | None = None
    num_threads: int = 1
    prefetch_batches: int = 4

    def __post_init__(self) -> None:
        _check_enum("source", self.source, SourceKind)
        _check_enum("tokenizer", self.tokenizer, TokenizerKind)
        if not isinstance(self.paths, tuple) or not all(isinstance(p, str) for p in self.paths):
            raise ValueError(f"data.paths must be a tuple of strings, got {self.paths!r}")
        if self.source is SourceKind.STDLIB and self.paths:
            raise ValueError(
                f"data.paths must be empty for data.source=STDLIB (the corpus is the "
                f"interpreter's standard library), got {self.paths!r}"
            )
        if self.source is not SourceKind.STDLIB and not self.paths:
            raise ValueError(
                f"data.paths must name at least one path for data.source={self.source.name}"
            )
        if any(not p for p in self.paths):
            raise ValueError(f"data.paths must not contain empty strings, got {self.paths!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field must be a non-empty string, got {self.text_field!r}")
        if self.tokenizer is TokenizerKind.HF and not self.tokenizer_path:
            raise ValueError(
                "data.tokenizer_path must name a local tokenizer.json for data.tokenizer=HF"
            )
        if self.tokenizer is TokenizerKind.BYTE:
            for name in ("tokenizer_path", "eos_token", "pad_token"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"data.{name} is only used with data.tokenizer=HF, "
                        f"got {getattr(self, name)!r} with BYTE"
                    )
        for name in ("tokenizer_path", "eos_token", "pad_token", "cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"data.{name} must be a non-empty string or None, got {value!r}")
        _check_number("eval_fraction", self.eval_fraction, float)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        _check_number("split_seed", self.split_seed, int)
        if self.split_seed < 0:
            raise ValueError(f"data.split_seed must be >= 0, got {self.split_seed}")
        for name in ("stdlib_include_tests", "shuffle", "skip_bad_records"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name} must be a bool, got {getattr(self, name)!r}")
        _check_number("num_threads", self.num_threads, int)
        if self.num_threads < 0:
            raise ValueError(f"data.num_threads must be >= 0, got {self.num_threads}")
        _check_number("prefetch_batches", self.prefetch_batches, int)
        if self.prefetch_batches < 0:
            raise ValueError(f"data.prefetch_batches must be >= 0, got {self.prefetch_batches}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Any) -> DataConfig:
        """Builds a config from a mapping (or ml_collections ConfigDict) of the `data` section.

        Enum fields accept their member name or value in any case ("jsonl", "JSONL"); `paths`
        accepts one string or a sequence. Unknown keys are errors, so a typo never falls back to
        a default silently.
        """
        if hasattr(values, "to_dict"):
            values = values.to_dict()
        if not isinstance(values, Mapping):
            raise ValueError(f"data config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"data.{unknown[0]} is not a data option; known: {sorted(known)}")
        kwargs = dict(values)
        if "source" in kwargs:
            kwargs["source"] = _parse_enum("source", kwargs["source"], SourceKind)
        if "tokenizer" in kwargs:
            kwargs["tokenizer"] = _parse_enum("tokenizer", kwargs["tokenizer"], TokenizerKind)
        if "paths" in kwargs:
            paths = kwargs["paths"]
            if isinstance(paths, str):
                paths = (paths,)
            elif paths is None:
                paths = ()
            elif isinstance(paths, (list, tuple)):
                paths = tuple(paths)
            else:
                raise ValueError(f"data.paths must be a string or a list of strings, got {paths!r}")
            kwargs["paths"] = paths
        if isinstance(kwargs.get("eval_fraction"), int) and not isinstance(
            kwargs["eval_fraction"], bool
        ):
            kwargs["eval_fraction"] = float(kwargs["eval_fraction"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (enums by name), the inverse of `from_dict`."""
        out = dataclasses.asdict(self)
        out["source"] = self.source.name
        out["tokenizer"] = self.tokenizer.name
        out["paths"] = list(self.paths)
        return out


def _parse_enum(name: str, value: Any, kind: type[enum.Enum]) -> enum.Enum:
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        for member in kind:
            if value.lower() in (member.name.lower(), str(member.value).lower()):
                return member
    raise ValueError(f"data.{name} must be one of {[m.name for m in kind]}, got {value!r}")


def _check_enum(name: str, value: Any, kind: type[enum.Enum]) -> None:
    if not isinstance(value, kind):
        raise ValueError(
            f"data.{name} must be a {kind.__name__} (one of "
            f"{[m.name for m in kind]}), got {value!r}"
        )


def _check_number(name: str, value: Any, kind: type) -> None:
    # bool is an int subclass; True as a seed or a fraction is always a mistake.
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok:
        raise ValueError(
            f"data.{name} must be {'a number' if kind is float else 'an int'}, got {value!r}"
        )
