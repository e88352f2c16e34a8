"""Resuming against a workdir whose saved config differs from the requested one.

Checked before anything is restored (or compiled): the requested experiment config is compared
with the one saved in the newest checkpoint of the workdir, field by field.

- `model.*` differences are an error naming every differing field: the saved state is a different
  model (shapes, dtypes, layer kinds), and restoring it would fail with optimizer-leaf shapes at
  best. The exceptions, `RESUMABLE_MODEL_FIELDS`, change how the same state is computed with, not
  the state itself: remat policy, compute dtype, the attention and grouped matmul implementations,
  and the init scale (unused when resuming).
- `train.*` (steps, lr and its schedule, batch size, ...), `data.*`, `parallel.*` (the restore
  reshards onto any mesh) and `checkpoint.*` may change; each change is logged.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

from deepseek_jax import config as config_lib
from deepseek_jax import errors

log = logging.getLogger(__name__)

RESUMABLE_MODEL_FIELDS = frozenset(
    {
        "remat",
        "scan_layers",
        "compute_dtype",
        "init_std",
        "attention",
        "grouped_matmul",
        "matmul_policy",
        "loss_chunk_tokens",
    }
)
_ABSENT = object()


class ConfigMismatchError(errors.UserError):
    """The workdir's checkpoints are of a different model than the config asks for."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def diff(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted field: (saved value, requested value)} for every field that differs."""
    a = _flatten(json.loads(json.dumps(saved)))
    b = _flatten(json.loads(json.dumps(requested)))
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(set(a) | set(b))
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


def is_model_change(field: str) -> bool:
    section, _, name = field.partition(".")
    return section == "model" and name.split(".")[0] not in RESUMABLE_MODEL_FIELDS


def saved_config(workdir: pathlib.Path) -> tuple[int, dict] | None:
    """(step, config) of the newest step under `<workdir>/checkpoints` whose config is readable."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        try:
            doc = json.loads((directory / str(step) / "config" / "metadata").read_text())
        except (OSError, ValueError):
            continue  # unusable step: the restore reports it
        if isinstance(doc, dict) and doc:
            return step, doc
    return None


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def check_resume(
    workdir: str | pathlib.Path, exp: config_lib.ExperimentConfig
) -> dict[str, tuple[Any, Any]]:
    """Raises ConfigMismatchError on a model change; logs (and returns) the allowed changes."""
    found = saved_config(pathlib.Path(workdir))
    if found is None:
        return {}
    step, saved = found
    changes = diff(saved, exp.to_dict())
    model = {k: v for k, v in changes.items() if is_model_change(k)}
    if model:
        listed = "; ".join(
            f"{k} is {_show(a)} there, {_show(b)} now" for k, (a, b) in model.items()
        )
        raise ConfigMismatchError(
            f"--workdir={workdir} holds checkpoints of a different model (step {step}): "
            f"{listed}. A run resumes only the model it saved; to train this config use a new "
            "--workdir, or set those fields back to resume."
        )
    for k, (a, b) in changes.items():
        log.warning("resuming step %d with %s changed: %s -> %s", step, k, _show(a), _show(b))
    return changes
