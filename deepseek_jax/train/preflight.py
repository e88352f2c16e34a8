"""The trainer's checks of its inputs that need no devices, run before JAX is started.

The config itself is validated when it is converted (config.py); here: the workdir, and the
`checkpoint.init_from` source of a run that will not resume. Both fail with a UserError naming
the flag or field (errors.py).
"""

from __future__ import annotations

import os
import pathlib

from deepseek_jax import config as config_lib
from deepseek_jax import errors


def check_workdir(path: str | None) -> pathlib.Path:
    """The --workdir as a path: an existing directory, or one that can be created."""
    if not path:
        raise errors.UserError("--workdir is required")
    workdir = pathlib.Path(path)
    for p in (workdir, *workdir.parents):
        if p.exists():
            if not p.is_dir():
                raise errors.UserError(f"--workdir={path}: {p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise errors.UserError(f"--workdir={path}: {p} is not writable")
            break
    return workdir


def has_checkpoints(workdir: pathlib.Path) -> bool:
    directory = workdir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_init_from(workdir: pathlib.Path, exp: config_lib.ExperimentConfig) -> None:
    """A fresh run's `checkpoint.init_from` exists and holds the same architecture. (A resumed
    run never reads it, so its source may be gone by then.)"""
    source = exp.checkpoint.init_from
    if not source or has_checkpoints(workdir):
        return
    check_init_source(source, exp.model)


def check_init_source(source: str, model) -> None:
    """`checkpoint.init_from=source` names a checkpoint of `model`'s architecture."""
    from deepseek_jax.convert import ckpt_io
    from deepseek_jax.train import init_from

    try:
        step_dir = ckpt_io.resolve_step_dir(pathlib.Path(source))
    except errors.UserError as e:
        raise errors.UserError(f"checkpoint.init_from={source}: {e}") from None
    with errors.as_user_error(ValueError):
        init_from.check_architecture(ckpt_io.model_config(step_dir), model, step_dir)


def check(workdir: str | None, exp: config_lib.ExperimentConfig) -> pathlib.Path:
    path = check_workdir(workdir)
    check_init_from(path, exp)
    return path
