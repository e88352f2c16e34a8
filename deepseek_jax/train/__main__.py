"""Train a model.

    python -m deepseek_jax.train --config=configs/tiny.py --workdir=runs/tiny \
        [--config.train.steps=N]

Multi-host: pass --coordinator=host:port --num_processes=N --process_id=i, or nothing on
TPU/GKE/SLURM where jax.distributed.initialize() detects the cluster. Only process 0 logs.
Expected errors (config, data, checkpoint, mesh, coordinator) print one `error:` paragraph and exit
with status 2; a lost peer process ends the others within --heartbeat_timeout_s (docs/training.md).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from deepseek_jax import cli, distributed, errors
from deepseek_jax.train import preflight

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_COORDINATOR_TIMEOUT = flags.DEFINE_integer(
    "coordinator_timeout_s",
    distributed.DEFAULT_COORDINATOR_TIMEOUT_S,
    "Multi-host: seconds to wait for the coordinator and for every process to join.",
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
    "Multi-host: a process silent this long is declared lost and every other process stops.",
)


def _auto_cluster() -> bool:
    env = os.environ
    return any(
        k in env
        for k in (
            "TPU_WORKER_HOSTNAMES",
            "MEGASCALE_COORDINATOR_ADDRESS",
            "SLURM_JOB_ID",
            "JOBSET_NAME",
        )
    )


def main(argv):
    del argv
    # Everything that can be checked without devices, before touching them.
    exp = cli.experiment()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads/renames at INFO
    workdir = preflight.check(_WORKDIR.value, exp)
    multi = _COORDINATOR.value is not None or _NUM_PROCESSES.value is not None
    cluster = (
        distributed.check(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        if multi
        else None
    )
    if multi or _auto_cluster():
        distributed.initialize(
            cluster,
            coordinator_timeout_s=_COORDINATOR_TIMEOUT.value,
            heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
        )

    from deepseek_jax.train import loop

    try:
        with distributed.lost_peer_is_one_paragraph(multi or _auto_cluster()):
            loop.run(exp, workdir)
    except loop.NonFiniteError as e:  # the run's own verdict, not a bug: no traceback
        sys.exit(errors.report(e))


if __name__ == "__main__":
    app.run(errors.guard(main), flags_parser=cli.parse_flags)
