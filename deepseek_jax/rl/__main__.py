"""GRPO-train a policy checkpoint.

    python -m deepseek_jax.rl --config=configs/grpo_tiny.py --workdir=runs/grpo_tiny \
        --config.checkpoint.init_from=<SFT workdir or step dir> [--config.rl.steps=N]

Single process. Resumes from the newest good checkpoint in the workdir. Expected errors (config,
checkpoint, prompts longer than the context) print one `error:` paragraph and exit with status 2.
"""

from __future__ import annotations

import functools
import pathlib

from absl import app, flags, logging

from deepseek_jax import cli, errors
from deepseek_jax.rl import config as rl_config

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")


def main(argv):
    del argv
    exp = cli.experiment(rl_config.from_config_dict)
    if not _WORKDIR.value:
        raise errors.UserError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    from deepseek_jax.rl import loop

    loop.run(exp, pathlib.Path(_WORKDIR.value))


parse_flags = functools.partial(cli.parse_flags, check_field=rl_config.check_field_path)

if __name__ == "__main__":
    app.run(errors.guard(main), flags_parser=parse_flags)
