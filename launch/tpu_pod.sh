#!/usr/bin/env bash
# Runs the training command on every worker of a Cloud TPU VM slice at once (one process per
# host), through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
# Usage:  TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/nfs/runs/v3-small \
#             launch/tpu_pod.sh [extra training flags...]
#         e.g. launch/tpu_pod.sh --config.train.steps=1000
#
# Variables (environment):
#   TPU_NAME    the TPU VM slice                                        required
#   ZONE        its zone                                                required
#   PROJECT     GCP project                                   default: gcloud's configured project
#   CONFIG      experiment file, relative to REPO_DIR                   default: configs/tiny.py
#   WORKDIR     run directory: a filesystem path (metrics are written by worker 0 only); an
#               NFS/Filestore mount shared by every worker when checkpoints live under it,
#               otherwise point the config's checkpoint directory at gs://...   required
#   REPO_DIR    checkout of this repository on every worker             default: ~/deepseek_jax
#   PYTHON      interpreter on the workers                    default: $REPO_DIR/.venv/bin/python
#   DSJ_MODULE  module run as `python -m`                    default: deepseek_jax.train
#   SETUP_CMD   command run on every worker before training (e.g. `git pull && make venv`)
#   DETACH      1: start training under nohup and return at once, logging to
#               $LOG_FILE on each worker (survives a dropped ssh session); default 0: stay attached
#   LOG_FILE    per-worker log when DETACH=1                  default: /tmp/deepseek_jax_train.log
#   DRY_RUN     1: print the gcloud command instead of running it
#
# No coordinator flags are passed: on a TPU VM, jax.distributed.initialize() reads the worker
# list and this worker's id from the TPU metadata, so every worker runs the same command.
# Preemption: the TPU runtime's notice reaches JAX's preemption sync point and the trainer saves
# at the next step boundary and exits 0; restart with the same command to resume.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM slice name}"
: "${ZONE:?set ZONE to the slice zone}"
: "${WORKDIR:?set WORKDIR to a run directory every worker can reach (NFS/Filestore)}"
CONFIG=${CONFIG:-configs/tiny.py}
REPO_DIR=${REPO_DIR:-'~/deepseek_jax'}  # Expanded by the worker's shell, not here.
PYTHON=${PYTHON:-$REPO_DIR/.venv/bin/python}
SETUP_CMD=${SETUP_CMD:-}
DETACH=${DETACH:-0}
LOG_FILE=${LOG_FILE:-/tmp/deepseek_jax_train.log}
DRY_RUN=${DRY_RUN:-0}
DSJ_MODULE=${DSJ_MODULE:-deepseek_jax.train}

# Everything below is one string run by each worker's shell: quote each piece for that shell.
# REPO_DIR and PYTHON are left unquoted on purpose so a leading ~ expands on the worker.
train=$(printf '%q ' -m "$DSJ_MODULE" "--config=$CONFIG" "--workdir=$WORKDIR" "$@")
train="$PYTHON $train"
if [[ $DETACH == 1 ]]; then
    # Only the trainer goes to the background, with every stream redirected, so the worker's shell
    # exits and ssh returns instead of waiting on a backgrounded subshell holding its stdout.
    train="{ nohup $train > $(printf '%q' "$LOG_FILE") 2>&1 < /dev/null & }"
fi
remote="cd $REPO_DIR"
if [[ -n $SETUP_CMD ]]; then
    remote="$remote && { $SETUP_CMD; }"
fi
remote="$remote && $train"

gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all
    "--command=$remote")
if [[ -n ${PROJECT:-} ]]; then
    gcloud_cmd+=("--project=$PROJECT")
fi

if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "${gcloud_cmd[@]}"
    echo
    exit 0
fi
exec "${gcloud_cmd[@]}"
