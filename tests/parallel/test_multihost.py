"""Two processes x four CPU devices (jax.distributed over gloo, launched by launch/local.sh)
train, checkpoint, are killed (SIGKILL, both processes, mid-run), are launched again, resume from
the last checkpoint, and reproduce the loss trajectory of one uninterrupted process with eight
devices.

Both runs are the real trainer (`python -m deepseek_jax.train`) on the same mesh; each process of
the pair loads only its half of every batch, and only process 0 writes metrics.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from tests.conftest import FAST_COMPILE  # both runs
from tests.parallel import cases

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = pathlib.Path(__file__).with_name("multihost_config.py")
TIMEOUT_S = 900
STEPS = 16  # multihost_config.py: checkpoints every 2 steps; the kill comes long before the end


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **extra)
    return env


def _records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> dict[tuple[str, int], float]:
    out = {}
    for r in records:
        key = "loss" if r["split"] == "train" else "eval_loss"
        out[(r["split"], r["step"])] = r[key]
    return out


def _launch(workdir: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(REPO / "launch" / "local.sh"), "2"],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(
            PYTHON=sys.executable,
            CONFIG=str(CONFIG),
            WORKDIR=str(workdir),
            DEVICES="4",
            XLA_FLAGS=FAST_COMPILE,
        ),
    )


def _kill_after_first_checkpoint(launcher: subprocess.Popen, workdir: pathlib.Path) -> str:
    """Reads the launcher's output until a checkpoint is committed, then SIGKILLs both training
    processes (as a crashed host would leave them: no handler runs). Returns the output."""
    lines, pids = [], []
    deadline = time.monotonic() + TIMEOUT_S
    for line in launcher.stdout:
        lines.append(line)
        if m := re.search(r"started 2 processes \(pids (\d+) (\d+)\)", line):
            pids = [int(m[1]), int(m[2])]
        if re.search(r"step [2-9]/", line):
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert pids, "".join(lines)
    # Commit is asynchronous: wait until the step-2 checkpoint is final, not just started.
    while not (workdir / "checkpoints" / "2").is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.01)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    out, _ = launcher.communicate(timeout=60)
    return "".join(lines) + out


def test_two_processes_killed_and_resumed_reproduce_one(tmp_path):
    pair, single = tmp_path / "pair", tmp_path / "single"
    first = _launch(pair)
    reference = subprocess.Popen(
        [sys.executable, "-m", "deepseek_jax.train", f"--config={CONFIG}", f"--workdir={single}"],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=8"),
    )
    second = None
    try:
        out_first = _kill_after_first_checkpoint(first, pair)
        assert first.returncode != 0, out_first  # killed, not finished
        assert not (pair / "checkpoints" / str(STEPS)).exists(), out_first
        second = _launch(pair)
        out_pair, _ = second.communicate(timeout=TIMEOUT_S)
        out_single, _ = reference.communicate(timeout=TIMEOUT_S)
    finally:
        for p in (first, second, reference):
            if p is not None and p.poll() is None:
                p.kill()  # local.sh's EXIT trap then kills its training processes
    assert second.returncode == 0, out_pair + (pair / "logs" / "process_1.log").read_text()
    assert reference.returncode == 0, out_single
    resumed = re.search(r"resumed from step (\d+)", out_pair)
    assert resumed and 2 <= int(resumed[1]) < STEPS, out_pair

    # The resumed run re-logs the steps after its checkpoint; the last record of a step counts.
    got, want = _losses(_records(pair)), _losses(_records(single))
    assert sorted(want) == sorted(
        [("eval", 0), ("eval", STEPS)] + [("train", i) for i in range(1, STEPS + 1)]
    )
    assert sorted(got) == sorted(want)
    errors = {k: cases.rel_err(got[k], want[k]) for k in want}
    print(
        f"\n2 processes (killed after step {resumed[1]}'s checkpoint, resumed) vs 1:",
        {f"{s}{n}": f"{got[(s, n)]:.6f} ({e:.1e})" for (s, n), e in errors.items()},
    )
    assert max(errors.values()) <= 1e-5, errors
    # Only process 0 wrote metrics, and process 1's log has no progress lines.
    assert f"step {STEPS}/{STEPS}" not in (pair / "logs" / "process_1.log").read_text()
    assert (pair / "checkpoints" / str(STEPS)).is_dir()
