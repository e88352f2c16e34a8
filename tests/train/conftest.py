"""Launching the toy loop (tests/train/toy_loop.py) in subprocesses, as a real job would run."""

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOY = Path(__file__).with_name("toy_loop.py")


class Toy:
    """One toy-loop process; its stdout is read by a thread so that waits can time out."""

    def __init__(self, args, *, devices: int, cache_dir: Path) -> None:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=str(REPO),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            # The same programs compile in every run; share them (and identical executables).
            JAX_COMPILATION_CACHE_DIR=str(cache_dir),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(TOY), *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 60.0) -> int:
        rc = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return rc

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """toy(args, devices=4) -> Toy; every process is killed at the end of the session."""
    cache_dir = tmp_path_factory.mktemp("jax_cache")
    started: list[Toy] = []

    def start(*args: str, devices: int = 4) -> Toy:
        started.append(Toy(list(args), devices=devices, cache_dir=cache_dir))
        return started[-1]

    yield start
    for t in started:
        t.kill()


@pytest.fixture
def free_port():
    """free_port() -> a TCP port nobody listens on now (for jax.distributed's coordinator)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]

    return pick
