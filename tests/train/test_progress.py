"""Progress display: in-place bar on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import io

import pytest

from deepseek_jax.train import progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_formatting_helpers() -> None:
    assert progress.format_duration(3723) == "1:02:03"
    assert progress.format_duration(8 * 86400 + 5) == "8d 0:00:05"
    assert progress.format_duration(float("nan")) == "?"
    assert progress.format_rate(45210) == "45.2k"
    assert progress.format_rate(1.5e6) == "1.5M"
    assert progress.format_rate(12.0) == "12"


def test_plain_lines_every_n_steps() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = progress.Progress(10, stream=stream, interactive=False, log_every=4, clock=clock)
    for step in range(1, 11):
        clock.now = float(step)  # One second per step after the first.
        bar.update(step, loss=2.0, tokens_per_s=1000.0)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # The first step (compile done), every 4th step and the last one.
    assert [line.split()[1] for line in lines] == ["1/10", "4/10", "8/10", "10/10"]
    assert "loss 2.0000" in lines[1] and "1k tok/s" in lines[1]
    # Rate since the first update is 1 step/s: at step 4, 6 steps remain.
    assert "eta 0:00:06" in lines[1]
    assert "eta 0:00:00" in lines[-1]
    assert "eta ?" in lines[0]


def test_interactive_bar_redraws_in_place() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = progress.Progress(
        4, stream=stream, interactive=True, clock=clock, min_redraw_s=0.5, bar_width=8
    )
    clock.now = 1.0
    bar.update(1, loss=3.0)
    clock.now = 1.1
    bar.update(2, loss=2.5)  # Within min_redraw_s: not drawn.
    clock.now = 2.0
    bar.update(3, loss=2.0)
    bar.message("saved checkpoint 3")
    clock.now = 2.1
    bar.update(4, loss=1.5)  # The last step is always drawn.
    bar.close()
    text = stream.getvalue()
    assert "\n" not in text.split("saved checkpoint 3\n")[0]  # Bar updates never add lines.
    assert text.count("\r") == 5  # Three draws plus clear-and-redraw around the message.
    assert "2/4" not in text
    assert "[######..] 3/4  75%" in text
    assert "saved checkpoint 3\n" in text
    assert "[########] 4/4 100%" in text and "loss 1.5000" in text
    assert text.endswith("\n")


def test_detects_terminal_and_respects_process_index() -> None:
    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress.Progress(5, stream=TTY()).interactive
    assert not progress.Progress(5, stream=io.StringIO()).interactive
    stream = TTY()
    bar = progress.Progress(5, stream=stream, process_index=1)
    bar.update(5, loss=1.0)
    bar.message("hello")
    bar.close()
    assert stream.getvalue() == ""
    with pytest.raises(ValueError):
        progress.Progress(0)


def test_plain_lines_when_updates_skip_the_multiples() -> None:
    # A loop reporting every 3 steps with log_every=4 never hits a multiple of 4 exactly on time.
    stream = io.StringIO()
    bar = progress.Progress(12, stream=stream, interactive=False, log_every=4, clock=FakeClock())
    for step in range(3, 13, 3):
        bar.update(step, loss=1.0)
    assert [line.split()[1] for line in stream.getvalue().splitlines()] == [
        "3/12",
        "6/12",
        "9/12",
        "12/12",
    ]
