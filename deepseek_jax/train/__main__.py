"""Train a model.

    python -m deepseek_jax.train --config=configs/tiny.py --workdir=runs/tiny [--config.train.steps=N]

Multi-host: pass --coordinator=host:port --num_processes=N --process_id=i, or nothing on
TPU/GKE/SLURM where jax.distributed.initialize() detects the cluster. Only process 0 logs.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from deepseek_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def _auto_cluster() -> bool:
    env = os.environ
    return any(k in env for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                  "SLURM_JOB_ID", "JOBSET_NAME"))


def main(argv):
    del argv
    if _WORKDIR.value is None:
        sys.exit("error: --workdir is required")
    exp = cli.experiment()  # validate before touching devices
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
    import jax

    if _COORDINATOR.value or _NUM_PROCESSES.value:
        # Unconditionally: asking for the backend (jax.default_backend()) would initialise it,
        # which jax.distributed.initialize forbids; the setting only affects the CPU client.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _auto_cluster():
        jax.distributed.initialize()

    from deepseek_jax.train import loop

    try:
        loop.run(exp, _WORKDIR.value)
    except loop.NonFiniteError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
