"""Training progress on the console: an in-place bar on a terminal, plain log lines otherwise.

A terminal gets one line redrawn with a carriage return (step/total, loss, tokens/s, elapsed,
ETA); anything else (a pod's log collector, `nohup`, CI) gets a self-contained line every
`log_every` steps, because carriage-return updates turn into megabytes of noise in a log file.
Only process 0 shows anything. Stream, terminal decision and clock are injectable for tests.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

_CLEAR_TO_EOL = "\x1b[K"


def format_duration(seconds: float) -> str:
    """`1:02:03`-style; `?` when unknown, days spelled out so a week-long ETA stays short."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {clock}" if days else clock


def format_rate(value: float) -> str:
    """Tokens per second with a k/M/G suffix, three significant digits."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


def _format_value(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) and abs(value) >= 1e-3 else f"{value:.3g}"


class Progress:
    """Shows training progress; call `update` after each step and `close` at the end.

    ETA uses the average rate since the first update, which deliberately excludes the compile time
    of the first step (that step's update is the reference point, not the constructor).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        log_every: int = 100,
        process_index: int = 0,
        clock: Callable[[], float] = time.monotonic,
        min_redraw_s: float = 0.1,
        bar_width: int = 24,
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if log_every <= 0:
            raise ValueError(f"log_every must be positive, got {log_every}")
        self.total_steps = total_steps
        self.enabled = process_index == 0
        self._stream = sys.stdout if stream is None else stream
        if interactive is None:
            isatty = getattr(self._stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self._log_every = log_every
        self._clock = clock
        self._min_redraw_s = min_redraw_s
        self._bar_width = bar_width
        self._start_time = clock()
        self._first: tuple[int, float] | None = None  # (step, time) of the first update.
        self._logged_interval = -1  # step // log_every of the last plain line.
        self._last_draw = -math.inf
        self._bar_visible = False
        self._line = ""

    def eta_seconds(self, step: int, now: float) -> float:
        if self._first is None or step <= self._first[0]:
            return math.nan
        rate = (step - self._first[0]) / max(now - self._first[1], 1e-9)
        return max(self.total_steps - step, 0) / rate

    def render(
        self,
        step: int,
        now: float,
        loss: float | None = None,
        tokens_per_s: float | None = None,
        extra: Mapping[str, float] | None = None,
    ) -> str:
        """The text of one update, without any terminal control characters."""
        fraction = min(max(step / self.total_steps, 0.0), 1.0)
        parts = []
        if self.interactive:
            filled = int(round(fraction * self._bar_width))
            bar = "[" + "#" * filled + "." * (self._bar_width - filled) + "]"
            parts.append(f"{bar} {step}/{self.total_steps} {fraction:4.0%}")
        else:
            parts.append(f"step {step}/{self.total_steps} ({fraction:.1%})")
        if loss is not None:
            parts.append(f"loss {_format_value(float(loss))}")
        if tokens_per_s is not None:
            parts.append(f"{format_rate(float(tokens_per_s))} tok/s")
        for key, value in (extra or {}).items():
            parts.append(f"{key} {_format_value(float(value))}")
        elapsed = format_duration(now - self._start_time)
        parts.append(f"elapsed {elapsed} eta {format_duration(self.eta_seconds(step, now))}")
        return " | ".join(parts)

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        tokens_per_s: float | None = None,
        extra: Mapping[str, float] | None = None,
    ) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
        last = step >= self.total_steps
        if self.interactive:
            # Redrawing is cheap but a fast CPU run would spend its time in the terminal.
            if not last and now - self._last_draw < self._min_redraw_s:
                return
            self._line = self.render(step, now, loss, tokens_per_s, extra)
            self._stream.write("\r" + self._line + _CLEAR_TO_EOL)
            self._bar_visible = True
            self._last_draw = now
        else:
            # By interval rather than `step % log_every == 0`, so a loop that reports every k
            # steps (k not dividing log_every) still gets a line per interval.
            interval = step // self._log_every
            if not (last or step == self._first[0] or interval > self._logged_interval):
                return
            self._logged_interval = interval
            self._stream.write(self.render(step, now, loss, tokens_per_s, extra) + "\n")
        self._stream.flush()

    def message(self, text: str) -> None:
        """Prints a line (eval result, checkpoint saved, ...) without garbling the bar."""
        if not self.enabled:
            return
        if self.interactive and self._bar_visible:
            clear = "\r" + _CLEAR_TO_EOL
            self._stream.write(clear + text + "\n" + "\r" + self._line + _CLEAR_TO_EOL)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Leaves the cursor on a fresh line after the bar."""
        if self.enabled and self.interactive and self._bar_visible:
            self._stream.write("\n")
            self._stream.flush()
            self._bar_visible = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
