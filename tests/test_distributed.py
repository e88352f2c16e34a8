"""deepseek_jax/distributed.py: coordinator addresses and process flags are checked before
jax.distributed.initialize, and a job that cannot form ends with a message within the timeout."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import time

import pytest

from deepseek_jax import distributed, errors

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text,host,port",
    [
        ("10.0.0.2:1234", "10.0.0.2", 1234),
        ("node-0.svc.cluster.local:8476", "node-0.svc.cluster.local", 8476),
        ("[::1]:65535", "::1", 65535),
        ("localhost:1", "localhost", 1),
    ],
)
def test_good_addresses(text, host, port):
    assert distributed.parse_address(text) == (host, port)
    cluster = distributed.check(text, 2, 1)
    assert cluster.address == text and (cluster.host, cluster.port) == (host, port)


@pytest.mark.parametrize(
    "text,why",
    [
        ("host:notaport", "the port must be a number in 1-65535, got 'notaport'"),
        ("nocolon", "expected HOST:PORT"),
        (":::", "an IPv6 host needs brackets"),
        ("::1:80", "an IPv6 host needs brackets"),
        (":1234", "the host is empty"),
        ("host:0", "got '0'"),
        ("host:65536", "got '65536'"),
        ("host:", "got ''"),
        ("[::1]1234", "expected [IPV6]:PORT"),
        ("[nothex]:80", "'nothex' is not an IPv6 address"),
        ("bad host:80", "'bad host' is not a hostname"),
    ],
)
def test_bad_addresses_name_the_flag(text, why):
    with pytest.raises(distributed.DistributedError) as e:
        distributed.parse_address(text)
    assert str(e.value).startswith(f"--coordinator={text}: ") and why in str(e.value)
    assert isinstance(e.value, errors.UserError)


@pytest.mark.parametrize(
    "n,i,why",
    [
        (None, 0, "missing --num_processes"),
        (2, None, "missing --process_id"),
        (0, 0, "--num_processes must be >= 1, got 0"),
        (2, -1, "--process_id must be in [0, 2)"),
        (2, 2, "--process_id must be in [0, 2)"),
    ],
)
def test_process_flags(n, i, why):
    with pytest.raises(distributed.DistributedError, match=None) as e:
        distributed.check("localhost:1234", n, i)
    assert why in str(e.value)


def test_timeouts_must_be_positive():
    with pytest.raises(distributed.DistributedError, match="--heartbeat_timeout_s must be >= 1"):
        distributed.check_timeouts(10, 0)


def test_taken_port_is_named_before_jax_starts():
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        s.bind(("::" if socket.has_ipv6 else "", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(distributed.DistributedError, match=f"cannot serve on port {port}"):
            distributed.initialize(
                distributed.check(f"localhost:{port}", 2, 0), coordinator_timeout_s=1
            )


def test_process_0_alone_stops_with_a_message_at_the_timeout(tmp_path):
    """No other process ever joins: a message and exit 2 at --coordinator_timeout_s, where jax
    itself would abort with a stack dump (in a child: the watchdog ends its process)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    code = (
        "from deepseek_jax import distributed; distributed.initialize("
        f"distributed.check('localhost:{port}', 2, 0), coordinator_timeout_s=2)"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    took = time.monotonic() - start
    assert result.returncode == errors.EXIT_BAD_INPUT, result.stderr
    assert "error: --coordinator=localhost:" in result.stderr
    assert "not all 2 processes joined within 2 s" in result.stderr
    assert "Traceback" not in result.stderr and "Check failure" not in result.stderr
    assert took < 60, took


def test_a_library_logging_a_lost_peer_prints_one_line_not_a_traceback(caplog):
    """orbax's background commit logs its failed barrier with exc_info when a peer dies mid-save;
    in a multi-process run that is one line, while any other logged error keeps its traceback."""
    import jax
    from absl import logging as absl_logging

    distributed.quiet_lost_peer_logs()

    def log(text):
        try:
            raise jax.errors.JaxRuntimeError(text)
        except jax.errors.JaxRuntimeError:
            absl_logging.error("[process=%d] Failed to commit %s", 0, "ckpt/4", exc_info=True)

    with caplog.at_level("ERROR"):
        log("INTERNAL: Barrier failed: UNAVAILABLE: Task 1 heartbeat timeout.\nmore detail")
    assert "Traceback" not in caplog.text, caplog.text
    assert (
        "[process=0] Failed to commit ckpt/4: lost contact with another process "
        "(INTERNAL: Barrier failed: UNAVAILABLE: Task 1 heartbeat timeout.)" in caplog.text
    ), caplog.text
    caplog.clear()
    with caplog.at_level("ERROR"):  # orbax re-raises the barrier's error as a TimeoutError
        try:
            try:
                raise jax.errors.JaxRuntimeError("INTERNAL: Barrier failed: Task 1 heartbeat")
            except jax.errors.JaxRuntimeError as e:
                raise TimeoutError("Timed out waiting for the async_write_complete barrier") from e
        except TimeoutError:
            absl_logging.error("[process=%d] Failed to run the commit", 0, exc_info=True)
    assert "Traceback" not in caplog.text, caplog.text
    assert "Failed to run the commit: lost contact with another process (INTERNAL" in caplog.text
    caplog.clear()
    with caplog.at_level("ERROR"):
        log("INVALID_ARGUMENT: a shape mismatch")
    assert "Traceback" in caplog.text and "a shape mismatch" in caplog.text, caplog.text
