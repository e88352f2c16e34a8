"""Joining a multi-process job: the coordinator and process flags are checked before
`jax.distributed.initialize`, and every wait on another process is bounded.

`jax.distributed.initialize` does not validate its arguments: `host:notaport` crashes the process
with a signal, `nocolon` is an IndexError, `:::` waits forever; and when the coordinator cannot be
reached it aborts the process from C++ after its timeout, with a stack dump. So:

- `parse_address` / `check` reject a bad `--coordinator`, `--num_processes` or `--process_id` with
  a message naming the flag, before anything else happens;
- `initialize` first makes sure the coordinator is there: process 0 that its port can be bound,
  the others that a TCP connection to it opens (retrying until `--coordinator_timeout_s`, since
  the coordinator may start after them), and only then calls jax.distributed.initialize;
- the same call sets the distributed runtime's heartbeat and shutdown timeouts
  (`--heartbeat_timeout_s`): a process that dies (SIGKILL, a lost host) stops heartbeating, and
  after that many seconds the coordination service marks it unhealthy and terminates every other
  process with `The following tasks are unhealthy (stopped sending heartbeats): <process ids>`
  (exit status 134, SIGABRT from XLA). If process 0 -- which hosts the service -- is the one lost,
  the others stop at once (the service's socket closes). No survivor waits in a collective forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator

from deepseek_jax import errors

EXIT_LOST_PEER = 3
DEFAULT_COORDINATOR_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # jax's default; a lost peer is detected within this

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$"
)


class DistributedError(errors.UserError):
    """A bad coordinator address or process flag, or a coordinator that cannot be reached."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    host: str  # without brackets, also for IPv6
    port: int
    num_processes: int
    process_id: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' or '[ipv6]:port' -> (host, port), or DistributedError naming --coordinator."""
    what = f"--coordinator={text}"
    example = "e.g. 10.0.0.2:1234, node-0:1234 or [::1]:1234"
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise DistributedError(f"{what}: expected [IPV6]:PORT ({example})")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DistributedError(f"{what}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise DistributedError(f"{what}: expected HOST:PORT ({example})")
        if ":" in host:
            raise DistributedError(f"{what}: an IPv6 host needs brackets, [HOST]:PORT ({example})")
        if not host:
            raise DistributedError(f"{what}: the host is empty ({example})")
        if not _HOSTNAME.match(host):
            raise DistributedError(f"{what}: {host!r} is not a hostname or IPv4 address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise DistributedError(f"{what}: the port must be a number in 1-65535, got {port_text!r}")
    return host, int(port_text)


def check(coordinator: str | None, num_processes: int | None, process_id: int | None) -> Cluster:
    """The three multi-process flags, validated together."""
    given = {
        "--coordinator": coordinator,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise DistributedError(
            f"a multi-process run needs --coordinator, --num_processes and "
            f"--process_id; missing {', '.join(missing)}"
        )
    host, port = parse_address(coordinator)
    if num_processes < 1:
        raise DistributedError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process_id must be in [0, {num_processes}) for "
            f"--num_processes={num_processes}, got {process_id}"
        )
    return Cluster(host, port, num_processes, process_id)


def check_timeouts(coordinator_timeout_s: int, heartbeat_timeout_s: int) -> None:
    for name, value in (
        ("--coordinator_timeout_s", coordinator_timeout_s),
        ("--heartbeat_timeout_s", heartbeat_timeout_s),
    ):
        if value < 1:
            raise DistributedError(f"{name} must be >= 1 second, got {value}")


def _check_bindable(cluster: Cluster) -> None:
    """Process 0 serves on every interface at the port (jax binds [::]:port)."""
    family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("::" if family == socket.AF_INET6 else "", cluster.port))
        except OSError as e:
            raise DistributedError(
                f"--coordinator={cluster.address}: process 0 cannot serve on port "
                f"{cluster.port} ({e.strerror}); pick a free port"
            ) from None


def _wait_reachable(cluster: Cluster, timeout_s: float) -> None:
    """Retries a TCP connection to the coordinator until it opens or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while True:
        try:
            with socket.create_connection(
                (cluster.host, cluster.port), timeout=min(5.0, max(timeout_s, 0.1))
            ):
                return
        except OSError as e:
            last = e.strerror or str(e)
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"--coordinator={cluster.address}: process {cluster.process_id} of "
                f"{cluster.num_processes} could not reach the coordinator (process 0) within "
                f"{timeout_s:g} s (--coordinator_timeout_s); last attempt: {last}. Is process 0 "
                "running, and is that its address?"
            )
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))


def initialize(
    cluster: Cluster | None,
    *,
    coordinator_timeout_s: int = DEFAULT_COORDINATOR_TIMEOUT_S,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> None:
    """jax.distributed.initialize with bounded waits; `cluster=None`: detect it (TPU/GKE/SLURM).

    Call before anything asks JAX for its backend.
    """
    import jax

    check_timeouts(coordinator_timeout_s, heartbeat_timeout_s)
    timeouts = {
        "initialization_timeout": coordinator_timeout_s,
        "heartbeat_timeout_seconds": heartbeat_timeout_s,
        "shutdown_timeout_seconds": heartbeat_timeout_s,
    }
    if cluster is None:
        jax.distributed.initialize(**timeouts)
        return
    start = time.monotonic()
    if cluster.process_id == 0:
        _check_bindable(cluster)
    else:
        _wait_reachable(cluster, coordinator_timeout_s)
    # Unconditionally: asking for the backend (jax.default_backend()) would initialise it,
    # which jax.distributed.initialize forbids; the setting only affects the CPU client.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    remaining = max(1.0, coordinator_timeout_s - (time.monotonic() - start))
    # Every process now waits until all have registered. jax's own timeout aborts from C++ with
    # a stack dump; this timer fires just before it with a message instead.
    watchdog = threading.Timer(remaining, _join_timed_out, (cluster, coordinator_timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            cluster.address,
            cluster.num_processes,
            cluster.process_id,
            **{**timeouts, "initialization_timeout": round(remaining) + 5},
        )
    finally:
        watchdog.cancel()


# What a collective or a coordination call raises when a peer has gone (gloo on CPU; the
# coordination service elsewhere).
_LOST_PEER = re.compile(r"Connection (closed|reset) by peer|heartbeat|UNAVAILABLE|Socket closed")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _lost_peer_cause(exc: BaseException | None) -> BaseException | None:
    """The runtime error in `exc`'s chain (itself, its cause, its context...) that says a peer is
    gone: orbax re-raises its failed barrier as a TimeoutError `from` that error."""
    import jax

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, jax.errors.JaxRuntimeError) and _LOST_PEER.search(str(exc)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class _LostPeerRecords(logging.Filter):
    """Drops the traceback from a log record whose exception (or an exception it was raised from)
    says a peer is gone, keeping one line. Libraries log such errors from their own threads
    (orbax's background commit fails its barrier when a peer dies mid-save), racing the
    coordination service's abort."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = _lost_peer_cause(record.exc_info[1] if record.exc_info else None)
        if exc is not None:
            lost = f"lost contact with another process ({_first_line(exc)})"
            record.msg = f"{record.getMessage()}: {lost}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


_LOST_PEER_RECORDS = _LostPeerRecords()


def quiet_lost_peer_logs() -> None:
    """Installs the filter on absl's logger (what jax and orbax log) and the root logger, for the
    rest of the process: the records it is for come while the process is already exiting."""
    for name in ("absl", ""):
        logger = logging.getLogger(name)
        if _LOST_PEER_RECORDS not in logger.filters:
            logger.addFilter(_LOST_PEER_RECORDS)


@contextlib.contextmanager
def lost_peer_is_one_paragraph(active: bool) -> Iterator[None]:
    """In a multi-process run, a runtime error that says a peer is gone is reported as one
    paragraph instead of a traceback, whether raised here or logged by a library's thread. The
    process then exits; jax's shutdown barrier waits up to --heartbeat_timeout_s, and the
    coordination service names the lost process as it aborts."""
    import jax

    if active:
        quiet_lost_peer_logs()
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        first = _first_line(e)
        if not active or not _LOST_PEER.search(str(e)):
            raise
        print(
            f"error: lost contact with another process of this job ({first}). Every process "
            "stops; the coordination service names the lost one within "
            "--heartbeat_timeout_s. Relaunch all processes to resume from the last "
            "checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_LOST_PEER)


def _join_timed_out(cluster: Cluster, timeout_s: float) -> None:
    print(
        errors.message(
            DistributedError(
                f"--coordinator={cluster.address}: not all {cluster.num_processes} processes "
                f"joined "
                f"within {timeout_s:g} s (--coordinator_timeout_s); this is process "
                f"{cluster.process_id}. Check that every process was started, with the same "
                "--coordinator and --num_processes."
            )
        ),
        file=sys.stderr,
        flush=True,
    )
    os._exit(errors.EXIT_BAD_INPUT)  # the main thread is blocked inside jax.distributed
