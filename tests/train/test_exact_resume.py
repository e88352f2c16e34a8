"""Exact resume: killed with SIGKILL after step k and restarted, a run ends bit-identical to one
that was never interrupted, having applied every step and every data index exactly once."""

import numpy as np

from tests.train import toy_loop

STEPS, KILL_AFTER = 16, 8


def read_log(path):
    """[(step, indices)] in the order the run consumed them."""
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(int(r[0]), tuple(map(int, r[1:]))) for r in rows]


def test_sigkill_then_resume_is_bit_identical(toy, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = [f"--steps={STEPS}", "--save-every=3"]
    ref = toy(f"--workdir={straight}", f"--log={tmp_path / 'straight.log'}", *common)
    victim = toy(f"--workdir={killed}", f"--log={tmp_path / 'killed.log'}", "--sleep=0.1", *common)
    victim.wait_for(rf"step {KILL_AFTER}$")
    victim.proc.kill()  # SIGKILL: no handler, no flush, maybe mid-save
    victim.proc.wait()
    assert ref.finish() == 0, ref.output()
    resumed = toy(f"--workdir={killed}", f"--log={tmp_path / 'resumed.log'}", *common)
    start = int(resumed.wait_for(r"resumed at step (\d+)").group(1))
    assert resumed.finish() == 0, resumed.output()
    assert 3 <= start <= KILL_AFTER

    want = np.load(straight / "final.npz")
    got = np.load(killed / "final.npz")
    assert len(want.files) == len(got.files) == 9
    for name in want.files:
        a, b = want[name], got[name]
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))

    # The data the final state saw: the killed run up to its checkpoint, then the resumed run.
    applied = [row for row in read_log(tmp_path / "killed.log") if row[0] < start] + read_log(
        tmp_path / "resumed.log"
    )
    reference = read_log(tmp_path / "straight.log")
    assert applied == reference
    assert [s for s, _ in reference] == list(range(STEPS))
    indices = [i for _, row in reference for i in row]
    assert indices == list(range(STEPS * toy_loop.ROWS))  # none skipped, none repeated
