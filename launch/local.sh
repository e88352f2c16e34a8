#!/usr/bin/env bash
# N training processes on this machine as one jax.distributed job, each with K simulated CPU
# devices: the CPU stand-in for a multi-host pod (same code paths, collectives over gloo).
#
# Usage:  launch/local.sh N [extra training flags...]
#         launch/local.sh 2 --config.train.steps=10
#
# Variables (environment), all optional:
#   CONFIG      experiment file                     default: <repo>/configs/tiny.py
#   WORKDIR     run directory, shared by all processes    default: <repo>/runs/local
#   DEVICES     simulated CPU devices per process (K)     default: 4
#   PORT        coordinator port on 127.0.0.1             default: a free port
#   PYTHON      interpreter               default: <repo>/.venv/bin/python if present, else python3
#   DSJ_MODULE  module run as `python -m`                 default: deepseek_jax.train
#   LOG_DIR     output of processes 1..N-1 (process 0 prints here)    default: $WORKDIR/logs
#   GRACE_S     seconds from SIGTERM to SIGKILL when stopping the others after a failure;
#               default: 30
#
# Each process runs:
#   $PYTHON -m $DSJ_MODULE --config=$CONFIG --workdir=$WORKDIR --coordinator=127.0.0.1:$PORT \
#       --num_processes=N --process_id=i [extra flags]
# with XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES, JAX_PLATFORMS=cpu and
# JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo.
#
# Exit status: 0 when every process exits 0, else the status of the first one to fail, after the
# others have been stopped (a lone survivor would block forever in its next collective); how each
# of the others then ended is printed too. The trainer's own bound on a lost peer is
# --heartbeat_timeout_s (pass it as an extra flag; docs/training.md).
# SIGTERM/SIGINT are forwarded to every process and the launcher waits for them, so a preempted
# run gets to save its checkpoint; a second signal kills them outright.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; }
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    usage
    exit 2
fi
N=$1
shift

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=${CONFIG:-$REPO/configs/tiny.py}
WORKDIR=${WORKDIR:-$REPO/runs/local}
DEVICES=${DEVICES:-4}
DSJ_MODULE=${DSJ_MODULE:-deepseek_jax.train}
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}
GRACE_S=${GRACE_S:-30}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z ${PORT:-} ]]; then
    PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0));
print(s.getsockname()[1])')
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"
export JAX_PLATFORMS=cpu
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
mkdir -p "$LOG_DIR"

# Job control gives every process its own process group, so a signal reaches the process and
# anything it spawned; it also stops bash from starting background jobs with SIGINT ignored,
# which would make a forwarded SIGINT a no-op.
set -m

declare -A running=()  # pid -> process id
pids=()
for ((i = 0; i < N; i++)); do
    cmd=("$PYTHON" -m "$DSJ_MODULE" "--config=$CONFIG" "--workdir=$WORKDIR"
        "--coordinator=127.0.0.1:$PORT" "--num_processes=$N" "--process_id=$i" "$@")
    if ((i == 0)); then
        "${cmd[@]}" </dev/null &
    else
        "${cmd[@]}" </dev/null >"$LOG_DIR/process_$i.log" 2>&1 &
    fi
    pids[i]=$!
    running[$!]=$i
done
echo "local.sh: started $N processes (pids ${pids[*]}), coordinator 127.0.0.1:$PORT," \
    "logs of processes 1..$((N - 1)) in $LOG_DIR" >&2

signal_all() {  # signal_all SIG: to every process group still running.
    local pid
    for pid in "${!running[@]}"; do
        kill -s "$1" -- "-$pid" 2>/dev/null || true
    done
}

forwarded=""
on_signal() {
    if [[ -n $forwarded ]]; then
        echo "local.sh: second signal, killing all processes" >&2
        signal_all KILL
    else
        echo "local.sh: forwarding SIG$1 to all processes" >&2
        signal_all "$1"
    fi
    forwarded=$1
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
# Whatever ends this script (including its own errors) must not leave training processes behind.
trap 'signal_all KILL' EXIT

status=0
failed_id=""
reap() {  # Collects every finished process; records the first failure.
    local pid rc
    for pid in "${!running[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rc=0
            wait "$pid" || rc=$?
            if ((rc != 0 && status != 0)); then  # after the first failure: say how each ended
                echo "local.sh: process ${running[$pid]} exited with status $rc" >&2
            fi
            if ((rc != 0 && status == 0)); then
                status=$rc
                failed_id=${running[$pid]}
            fi
            unset "running[$pid]"
        fi
    done
}

while ((${#running[@]} > 0 && status == 0)); do
    wait -n 2>/dev/null || true  # Returns when a process ends or a trapped signal arrives.
    reap
done

if ((status != 0)); then
    if [[ -n $forwarded ]]; then
        # The others got the same signal and may be saving: give them the grace period only.
        echo "local.sh: process $failed_id exited with status $status after SIG$forwarded" >&2
    else
        echo "local.sh: process $failed_id exited with status $status; stopping the others" >&2
        if [[ $failed_id != 0 && -f $LOG_DIR/process_$failed_id.log ]]; then
            echo "---- last lines of $LOG_DIR/process_$failed_id.log ----" >&2
            tail -n 20 "$LOG_DIR/process_$failed_id.log" >&2
        fi
        signal_all TERM
    fi
    deadline=$((SECONDS + GRACE_S))
    while ((${#running[@]} > 0 && SECONDS < deadline)); do
        sleep 0.2
        reap
    done
    signal_all KILL
fi
while ((${#running[@]} > 0)); do
    wait -n 2>/dev/null || true
    reap
done
trap - EXIT
exit "$status"
