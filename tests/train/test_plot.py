"""`python -m deepseek_jax.plot`: PNGs from a synthetic metrics file, skips and errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from deepseek_jax import plot
from deepseek_jax.train import metrics

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_run(
    workdir: str, *, steps: int = 20, with_moe: bool = True, with_lr: bool = True
) -> None:
    rng = np.random.default_rng(0)
    with metrics.MetricsWriter(workdir, process_index=0) as writer:
        for step in range(1, steps + 1):
            record = {
                "loss": 5.0 / step + 2,
                "mtp_loss": 5.0 / step + 2.2,
                "balance_loss": 0.01 / step,
                "grad_norm": 1.0 + rng.random(),
                "tokens_per_s": 4e4,
                "mfu": 0.35,
                "skipped_steps": step // 10,
            }
            if with_lr:
                record["lr"] = 1e-3 * min(1.0, step / 5)
            if with_moe:
                load_LE = rng.random((3, 8)) + 0.1
                load_LE[0, 0] = 0.0  # A starved expert must still be drawn.
                record["expert_load"] = load_LE / load_LE.sum(axis=1, keepdims=True)
                record["expert_bias_norm"] = [0.1, 0.2, 0.3]
                record["moe_layer_ids"] = [1, 2, 3]
            writer.write(step, record)
            if step % 5 == 0:
                writer.write(step, {"eval_loss": 5.0 / step + 2.1, "eval_bpb": 1.2}, split="eval")


def _assert_png(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(_PNG_MAGIC) and len(data) > 2000, path


def test_all_plots_from_full_metrics(tmp_path, capsys) -> None:
    workdir, out = str(tmp_path / "run"), str(tmp_path / "png")
    _write_run(workdir)
    assert plot.main([f"--workdir={workdir}", f"--out={out}", "--dpi=40"]) == 0
    expected = [
        "diagnostics.png",
        "expert_load.png",
        "expert_load_summary.png",
        "loss.png",
        "lr.png",
    ]
    assert sorted(os.listdir(out)) == expected
    for name in expected:
        _assert_png(os.path.join(out, name))
    assert "skipping" not in capsys.readouterr().out


def test_expert_load_history_shapes(tmp_path) -> None:
    _write_run(str(tmp_path), steps=6)
    steps, rel_TLE, ids = plot.expert_load_history(metrics.read_metrics(str(tmp_path)))
    assert steps.tolist() == [1, 2, 3, 4, 5, 6] and ids == [1, 2, 3]
    assert rel_TLE.shape == (6, 3, 8)
    # Relative load: fractions times the expert count, so a layer's mean is exactly 1.
    np.testing.assert_allclose(rel_TLE.mean(axis=2), 1.0)


def test_missing_keys_skip_with_message(tmp_path, capsys) -> None:
    workdir, out = str(tmp_path / "run"), str(tmp_path / "png")
    _write_run(workdir, with_moe=False, with_lr=False)
    assert plot.main([f"--workdir={workdir}", f"--out={out}", "--dpi=40"]) == 0
    assert sorted(os.listdir(out)) == ["diagnostics.png", "loss.png"]
    printed = capsys.readouterr().out
    assert "skipping lr.png" in printed and "skipping expert_load.png" in printed


def test_malformed_expert_load_skips_only_that_plot(tmp_path, capsys) -> None:
    workdir, out = str(tmp_path / "run"), str(tmp_path / "png")
    os.makedirs(workdir)
    # The writer refuses ragged rows, so write the file the way another tool might have.
    with open(os.path.join(workdir, metrics.METRICS_FILE), "w") as f:
        f.write('{"step": 1, "split": "train", "lr": 0.001, "expert_load": [[0.5, 0.5], [1.0]]}\n')
    assert plot.main([f"--workdir={workdir}", f"--out={out}", "--dpi=40"]) == 0
    assert os.listdir(out) == ["lr.png"]
    assert "skipping expert_load.png: malformed metrics" in capsys.readouterr().out


def test_missing_or_empty_metrics_is_an_error(tmp_path, capsys) -> None:
    assert plot.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'png'}"]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / metrics.METRICS_FILE).write_text("")
    assert plot.main([f"--workdir={tmp_path}"]) == 2
    assert "holds no metrics records" in capsys.readouterr().err
    assert not (tmp_path / "png").exists()


@pytest.mark.parametrize("status", [0, 2])
def test_command_line_exit_status(tmp_path, status) -> None:
    # Runs the real `python -m` entry point so the exit status reaches the shell.
    workdir = str(tmp_path)
    if status == 0:
        with metrics.MetricsWriter(workdir, process_index=0) as writer:
            writer.write(1, {"lr": 1e-3})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_jax.plot",
            f"--workdir={workdir}",
            f"--out={tmp_path / 'png'}",
            "--dpi=40",
        ],
        capture_output=True,
        text=True,
        cwd=_ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": _ROOT},
    )
    assert result.returncode == status, result.stderr
    if status == 0:
        assert "skipping loss.png" in result.stdout
        _assert_png(str(tmp_path / "png" / "lr.png"))
