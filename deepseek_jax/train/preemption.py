"""Stop at a step boundary, on every host at the same step, when the job is told to go.

The loop calls `guard.should_stop(step)` once per step, after the step; when it returns True the
loop saves synchronously and exits 0. How the "go" arrives depends on how JAX was started:

- `jax-preemption-service` (jax.distributed.initialize ran, with jax_enable_preemption_service on,
  the default): XLA's preemption notifier owns SIGTERM (and, on Cloud TPU, the maintenance notice).
  A notice on any host is propagated through the coordination service, which picks the step after
  the largest step any host has reported; `multihost_utils.reached_preemption_sync_point(step)`
  turns True on every host at exactly that step. We therefore must NOT install a Python SIGTERM
  handler (it would replace XLA's and the other hosts would never hear); SIGINT, if asked for, is
  re-sent to ourselves as SIGTERM so that it travels the same way.
- `allgather` (several processes, preemption service off): Python handlers set a local flag and
  every `sync_every` steps all processes allgather their flags, so they stop at the same step. The
  allgather waits for the device queue, hence the interval.
- `local` (one process, no distributed runtime): Python handlers set a flag; the next step stops.

A second delivery of a signal we handle restores its previous handler and re-delivers it: an
impatient Ctrl-C still kills the run.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

SERVICE, ALLGATHER, LOCAL = "jax-preemption-service", "allgather", "local"


def _preemption_service_running() -> bool:
    """True when jax.distributed started XLA's preemption sync manager in this process."""
    try:
        from jax._src import distributed  # no public accessor in jax 0.10
    except ImportError:
        return False
    state = distributed.global_state
    return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


class PreemptionGuard:
    """Turns SIGTERM (optionally SIGINT) and JAX's preemption notice into a step-boundary stop.

    Create and install it after `jax.distributed.initialize` (the mode is chosen at install time)
    and from the main thread (Python only delivers signals there). Every process must call
    `should_stop` at every step with the same step numbers.
    """

    def __init__(self, *, sigint: bool = False, sync_every: int = 1) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.sigint = sigint
        self.sync_every = sync_every
        self.mode: str | None = None
        self.reason: str | None = None  # why we stop, once should_stop said so
        self._signalled: str | None = None  # set from the signal handler: nothing else there
        self._stopping = False
        self._received: set[int] = set()
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ handlers

    def install(self) -> PreemptionGuard:
        if self.mode is not None:
            return self
        if _preemption_service_running():
            self.mode = SERVICE
        elif jax.process_count() > 1:
            self.mode = ALLGATHER
        else:
            self.mode = LOCAL
        wanted: dict[int, Callable[[int, FrameType | None], None]] = {}
        if self.mode != SERVICE:
            wanted[signal.SIGTERM] = self._on_signal
        if self.sigint:
            forward = self.mode == SERVICE
            wanted[signal.SIGINT] = self._forward_to_service if forward else self._on_signal
        for signum, handler in wanted.items():
            self._previous[signum] = signal.signal(signum, handler)
        log.info(
            "preemption guard installed (mode %s, signals %s)",
            self.mode,
            [signal.Signals(s).name for s in wanted] or "XLA-owned SIGTERM",
        )
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.mode = None

    def _repeat(self, signum: int) -> bool:
        """On the second delivery of a signal, give it back its previous meaning, now."""
        if signum not in self._received:
            self._received.add(signum)
            return False
        previous = self._previous.pop(signum, signal.SIG_DFL)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if not self._repeat(signum):
            self._signalled = signal.Signals(signum).name

    def _forward_to_service(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if not self._repeat(signum):
            self._signalled = signal.Signals(signum).name
            os.kill(os.getpid(), signal.SIGTERM)  # XLA's notifier tells the other hosts

    # ------------------------------------------------------------------ the per-step check

    def request_stop(self, reason: str) -> None:
        """Stop at the next check for a reason of the loop's own. Multi-process: every process must
        request it before the same step (e.g. a deterministic condition), or use a signal."""
        self._signalled = reason

    def should_stop(self, step: int) -> bool:
        """Call once per step, on every process, after the step; True means save now and exit."""
        if self._stopping:
            return True
        if self.mode is None:
            raise RuntimeError("PreemptionGuard.should_stop called before install()")
        local = self._signalled
        if self.mode == SERVICE:
            if multihost_utils.reached_preemption_sync_point(step):
                here = f"; {local} received here" if local else ""
                self.reason = f"preemption notice (all hosts synced at step {step}{here})"
            elif local is not None and local != "SIGINT":  # request_stop; SIGINT went as SIGTERM
                self.reason = local
        elif self.mode == ALLGATHER:
            if step % self.sync_every == 0:
                flags = multihost_utils.process_allgather(np.array([local is not None], np.int32))
                if np.any(flags):
                    self.reason = local or "a signal on another process"
        elif local is not None:
            self.reason = local
        self._stopping = self.reason is not None
        if self._stopping:
            log.warning("stopping at step %d: %s", step, self.reason)
        return self._stopping

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()
