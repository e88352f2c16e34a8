"""The real trainer under faults: SIGKILL + resume is bit-exact, SIGTERM saves and exits 0,
persistent non-finite steps stop the run with a message naming the step, metric and batch."""

import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepseek_jax import config as experiment
from deepseek_jax.train import checkpoint, optim
from deepseek_jax.train import state as state_lib
from tests.conftest import FAST_COMPILE
from tests.train.conftest import Toy  # reads a child's output without blocking

REPO = pathlib.Path(__file__).resolve().parents[2]
FLAGS = [
    "--config=configs/tiny.py",
    "--config.train.steps=8",
    "--config.train.seq_len=32",
    "--config.train.global_batch_size=4",
    "--config.train.log_every=1",
    "--config.train.eval_every=100",
    "--config.train.eval_batches=1",
    "--config.checkpoint.every_steps=2",
]


class Trainer(Toy):
    """`python -m deepseek_jax.train` as a child process (Toy's output reader, another argv)."""

    def __init__(self, workdir, *extra, cache_dir):
        import queue
        import threading

        env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=1",
            JAX_COMPILATION_CACHE_DIR=str(cache_dir),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deepseek_jax.train", f"--workdir={workdir}", *FLAGS, *extra],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()


def final_params(workdir, step=8):
    exp = experiment.load("configs/tiny.py", {"train.seq_len": 32})
    abstract = state_lib.abstract_state(exp.model, optim.optimizer(exp.train))
    with checkpoint.Checkpointer(workdir) as ckpt:
        restored = ckpt.restore(step, abstract)
    return restored.state


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


def test_sigkill_then_resume_is_bit_identical(tmp_path, cache_dir):
    straight = Trainer(tmp_path / "straight", cache_dir=cache_dir)
    assert straight.finish(timeout=600) == 0, "\n".join(straight.lines)

    killed = Trainer(tmp_path / "killed", cache_dir=cache_dir)
    killed.wait_for(r"step 5/8", timeout=600)
    killed.proc.send_signal(signal.SIGKILL)
    killed.finish(timeout=60)
    resumed = Trainer(tmp_path / "killed", cache_dir=cache_dir)
    assert resumed.finish(timeout=600) == 0, "\n".join(resumed.lines)
    assert any("resumed from step" in line for line in resumed.lines), resumed.lines

    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "killed")
    for x, y in zip(
        jax.tree.leaves((a.params, a.expert_bias, a.opt_state)),
        jax.tree.leaves((b.params, b.expert_bias, b.opt_state)),
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(a.step) == int(b.step) == 8


def test_sigterm_saves_at_step_boundary_and_exits_zero(tmp_path, cache_dir):
    run = Trainer(
        tmp_path,
        "--config.train.steps=1000",
        "--config.checkpoint.every_steps=1000",
        cache_dir=cache_dir,
    )
    m = run.wait_for(r"step (\d+)/1000", timeout=600)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 0, "\n".join(run.lines)
    stopped = [line for line in run.lines if "checkpoint saved" in line]
    assert stopped, run.lines
    steps = checkpoint.Checkpointer(tmp_path).all_steps()
    assert len(steps) == 1 and int(m.group(1)) <= steps[0] < 1000


def test_non_finite_steps_stop_the_run_naming_step_metric_batch(tmp_path, cache_dir):
    # lr 1e30: the first update throws the weights to ~1e30; every later step is non-finite
    # and skipped (weights unchanged), so the streak limit is reached.
    run = Trainer(
        tmp_path,
        "--config.train.lr=1e30",
        "--config.train.warmup_steps=0",
        "--config.train.max_nonfinite_in_a_row=3",
        cache_dir=cache_dir,
    )
    rc = run.finish(timeout=600)
    text = "\n".join(run.lines)
    assert rc != 0, text
    assert "is not finite (3 steps in a row" in text and "global batch #" in text, text
    assert "max_nonfinite_in_a_row=3" in text
