"""PreemptionGuard: signals become a stop at a step boundary, a save, and exit status 0."""

import os
import signal

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from deepseek_jax.train import checkpoint, preemption
from tests.train import toy_loop


def test_sigterm_stops_at_next_check_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard() as guard:
        assert guard.mode == preemption.LOCAL
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end pytest if the handler were missing
        assert guard.should_stop(2) and guard.reason == "SIGTERM"
        assert guard.should_stop(3)  # stays stopped
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_interrupts_at_once():
    with preemption.PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.should_stop(1) and guard.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_request_stop_and_uninstalled_use():
    guard = preemption.PreemptionGuard()
    with pytest.raises(RuntimeError, match="before install"):
        guard.should_stop(0)
    with guard:
        guard.request_stop("nan budget exhausted")
        assert guard.should_stop(5) and guard.reason == "nan budget exhausted"


def restore_toy(workdir, n_devices):
    mesh = jax.make_mesh(
        (n_devices,), ("fsdp",), devices=jax.devices()[:n_devices], axis_types=(AxisType.Auto,)
    )
    with checkpoint.Checkpointer(workdir) as ckpt:
        return ckpt.restore(None, toy_loop.abstract_state(mesh))


def test_sigterm_saves_at_step_boundary_and_exits_zero(toy, tmp_path):
    run = toy(f"--workdir={tmp_path}", "--steps=1000", "--save-every=5", "--sleep=0.05")
    run.wait_for(r"step 7$")
    run.proc.send_signal(signal.SIGTERM)
    stopped = int(run.wait_for(r"preempted: saved step (\d+) \(SIGTERM\)").group(1))
    assert run.finish() == 0, run.output()
    assert 7 <= stopped < 1000
    restored = restore_toy(tmp_path, 4)
    assert restored.step == stopped == int(restored.state["step"])
    assert restored.data == {"next_index": stopped * toy_loop.ROWS}


def test_two_processes_agree_on_the_preemption_step(toy, tmp_path, free_port):
    """SIGTERM to one host only: JAX's preemption service makes both save the same step."""
    coordinator = f"localhost:{free_port()}"
    runs = [
        toy(
            f"--workdir={tmp_path}",
            "--steps=1000",
            "--save-every=4",
            "--sleep=0.05",
            f"--coordinator={coordinator}",
            "--num-processes=2",
            f"--process-id={i}",
        )
        for i in range(2)
    ]
    for run in runs:
        run.wait_for(r"step 5$", timeout=120)
    runs[1].proc.send_signal(signal.SIGTERM)
    stopped = [
        int(run.wait_for(r"preempted: saved step (\d+) \(preemption notice").group(1))
        for run in runs
    ]
    assert [run.finish() for run in runs] == [0, 0], runs[0].output() + runs[1].output()
    assert stopped[0] == stopped[1]
    step_dir = tmp_path / "checkpoints" / str(stopped[0])
    for i in range(2):  # each host's own data-iterator state
        text = (step_dir / "data" / f"process_{i}-of-2.json").read_text()
        assert text == f'{{"next_index": {stopped[0] * toy_loop.ROWS}}}'
    restored = restore_toy(tmp_path, 8)  # this process: one host, all 8 devices
    assert restored.step == stopped[0] == int(restored.state["step"])
    assert restored.meta["process_count"] == 2 and restored.data is None
    assert np.isfinite(np.asarray(restored.state["params"]["w"])).all()
    # And both hosts resume from it together (the multi-process restore path).
    coordinator = f"localhost:{free_port()}"
    runs = [
        toy(
            f"--workdir={tmp_path}",
            f"--steps={stopped[0] + 2}",
            "--save-every=100",
            f"--coordinator={coordinator}",
            "--num-processes=2",
            f"--process-id={i}",
        )
        for i in range(2)
    ]
    for i, run in enumerate(runs):
        run.wait_for(rf"\[{i}\] resumed at step {stopped[0]}$", timeout=120)
    assert [run.finish() for run in runs] == [0, 0], runs[0].output() + runs[1].output()
    assert all(f"done at step {stopped[0] + 2}" in run.output() for run in runs)
