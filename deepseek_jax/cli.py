"""Shared command-line plumbing: `--config=configs/x.py` plus `--config.a.b=value` overrides.

absl tools run as `app.run(errors.guard(main), flags_parser=cli.parse_flags)`: flag problems (a
missing config file, an unknown field, a value of the wrong type) then end like every other
expected error, in one `error:` paragraph and exit status 2 (errors.py), instead of absl's
`FATAL Flags parsing error` or a traceback from inside ml_collections.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from deepseek_jax import config as config_lib
from deepseek_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file (get_config()); override fields with --config.a.b=v.",
    lock_config=True,
)

FLAGS = flags.FLAGS

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_FILE = re.compile(r"^--?config(?:=(.*))?$")


def _config_file(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if m := _CONFIG_FILE.match(arg):
            if m[1] is not None:
                return m[1]
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def check_argv(
    argv: Sequence[str], check_field: Callable[[str], None] = config_lib.check_field_path
) -> None:
    """Checks what ml_collections would otherwise report as a traceback: the config file exists,
    and every `--config.a.b` override names a field of the experiment config (`check_field`:
    of another tool's config, e.g. rl's)."""
    path = _config_file(argv[1:])
    if path is not None:
        file = path.split(":", 1)[0]  # config_flags allows `file.py:argument`
        if not os.path.isfile(file):
            raise config_lib.ConfigError(
                f"--config={path}: no such file (working directory {os.getcwd()})"
            )
    for arg in argv[1:]:
        if arg == "--":
            break
        if m := _OVERRIDE.match(arg):
            check_field(m[1])


def parse_flags(
    argv: Sequence[str],
    flag_values: flags.FlagValues = FLAGS,
    check_field: Callable[[str], None] = config_lib.check_field_path,
) -> list[str]:
    """absl's flags_parser: parses argv, turning every flag error into a UserError report."""
    try:
        check_argv(argv, check_field)
        # Override flags are defined while parsing; drop those of an earlier parse so that an
        # in-process caller (the tests) can parse again.
        for name in [n for n in flag_values if n.startswith("config.")]:
            delattr(flag_values, name)
        flag_values.unparse_flags()
        saved, sys.argv = sys.argv, list(argv)  # config_flags reads its overrides from sys.argv
        try:
            return flag_values(argv)
        finally:
            sys.argv = saved
    except flags.Error as e:
        sys.exit(errors.report(e))
    except errors.UserError as e:
        sys.exit(errors.report(e))


def experiment(convert: Callable[[Any], Any] = config_lib.from_config_dict) -> Any:
    """The typed experiment config from flags (`convert`: another tool's typed config, e.g.
    rl's); invalid values raise a ConfigError."""
    if _CONFIG.value is None:
        raise config_lib.ConfigError("--config=<configs/*.py> is required")
    return convert(_CONFIG.value)
