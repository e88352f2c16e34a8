"""Stand-in for `python -m deepseek_jax.train` in the launcher tests (run via DSJ_MODULE).

Records the flags and environment it was started with in `<workdir>/p<process_id>.json`, then
behaves as `CHILD_MODE` asks:
  ok        exit 0
  fail_one  process 1 exits 3; the others wait to be stopped (recording the signal)
  stubborn  like fail_one, but the others ignore SIGTERM (the launcher must escalate to SIGKILL)
  wait      every process waits for a signal; SIGTERM -> exit 0 (a save-and-exit), SIGINT -> 130
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    # Optional like the trainer's: absent on TPU/GKE/SLURM, where JAX auto-detects them.
    parser.add_argument("--coordinator")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int, default=0)
    args, extra = parser.parse_known_args()
    workdir, pid = args.workdir, args.process_id

    def record_signal(signum: int, frame: object) -> None:
        with open(os.path.join(workdir, f"p{pid}.signal"), "w") as f:
            f.write(signal.Signals(signum).name)
        sys.exit(0 if signum == signal.SIGTERM else 130)

    signal.signal(signal.SIGTERM, record_signal)
    signal.signal(signal.SIGINT, record_signal)
    info = {
        "config": args.config,
        "coordinator": args.coordinator,
        "num_processes": args.num_processes,
        "process_id": pid,
        "extra": extra,
        "pid": os.getpid(),
        "env": {
            k: os.environ.get(k)
            for k in (
                "XLA_FLAGS",
                "JAX_PLATFORMS",
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION",
                "JAX_LOCAL_DEVICE_IDS",
            )
        },
        "cwd": os.getcwd(),
    }
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, f"p{pid}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, os.path.join(workdir, f"p{pid}.json"))  # Atomic: tests poll for it.
    print(f"child {pid} started", flush=True)

    mode = os.environ.get("CHILD_MODE", "ok")
    if mode == "ok":
        return 0
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode in ("fail_one", "stubborn") and pid == 1:
        # Fail only once every sibling is up, so the test sees each one being stopped.
        deadline = time.monotonic() + 20
        while (
            time.monotonic() < deadline
            and len([n for n in os.listdir(workdir) if n.endswith(".json")]) < args.num_processes
        ):
            time.sleep(0.02)
        print("child 1 failing on purpose", flush=True)
        return 3
    time.sleep(60)  # Only a signal ends this within the tests' timeouts.
    return 4


if __name__ == "__main__":
    sys.exit(main())
