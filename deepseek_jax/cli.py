"""Shared command-line plumbing: `--config=configs/x.py` plus `--config.a.b=value` overrides."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from deepseek_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config()); override fields with --config.a.b=v.",
    lock_config=True)


def experiment() -> config_lib.ExperimentConfig:
    """The typed experiment config from flags; exits with a one-line message on invalid values."""
    if _CONFIG.value is None:
        sys.exit("error: --config=<configs/*.py> is required")
    try:
        return config_lib.from_config_dict(_CONFIG.value)
    except ValueError as e:
        sys.exit(f"error: invalid config: {e}")


FLAGS = flags.FLAGS
