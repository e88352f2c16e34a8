"""Two processes x four CPU devices (jax.distributed over gloo, launched by launch/local.sh)
train three steps and reproduce the loss trajectory of one process with eight devices.

Both runs are the real trainer (`python -m deepseek_jax.train`) on the same mesh; each process of
the pair loads only its half of every batch, and only process 0 writes metrics.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from tests.parallel import cases

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = pathlib.Path(__file__).with_name("multihost_config.py")
TIMEOUT_S = 900
FAST_COMPILE = "--xla_backend_optimization_level=0"  # both runs; see test_step_equivalence


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


def test_two_processes_reproduce_one(tmp_path):
    pair, single = tmp_path / "pair", tmp_path / "single"
    launcher = subprocess.Popen(
        [str(REPO / "launch" / "local.sh"), "2"], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=_env(PYTHON=sys.executable, CONFIG=str(CONFIG), WORKDIR=str(pair), DEVICES="4",
                 XLA_FLAGS=FAST_COMPILE))
    reference = subprocess.Popen(
        [sys.executable, "-m", "deepseek_jax.train", f"--config={CONFIG}",
         f"--workdir={single}"], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=_env(XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=8"))
    try:
        out_pair, _ = launcher.communicate(timeout=TIMEOUT_S)
        out_single, _ = reference.communicate(timeout=TIMEOUT_S)
    finally:
        for p in (launcher, reference):
            if p.poll() is None:
                p.kill()  # local.sh's EXIT trap then kills its training processes
    assert launcher.returncode == 0, out_pair + (pair / "logs" / "process_1.log").read_text()
    assert reference.returncode == 0, out_single

    got, want = _losses(_records(pair)), _losses(_records(single))
    assert sorted(want) == [("eval", 0), ("eval", 3), ("train", 1), ("train", 2), ("train", 3)]
    assert sorted(got) == sorted(want)
    errors = {k: cases.rel_err(got[k], want[k]) for k in want}
    print("\n2 processes vs 1:", {f"{s}{n}": f"{got[(s, n)]:.6f} ({e:.1e})"
                                  for (s, n), e in errors.items()})
    assert max(errors.values()) <= 1e-5, errors
    # Only process 0 wrote: one record per step, and process 1's log has no progress lines.
    assert len(_records(pair)) == len(_records(single))
    assert "step 3/3" not in (pair / "logs" / "process_1.log").read_text()
    assert (pair / "checkpoints" / "3").is_dir()
