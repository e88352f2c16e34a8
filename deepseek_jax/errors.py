"""The one error path of every command-line tool: expected errors are one paragraph, bugs trace.

An expected error is one the user fixes by changing their input -- a config field, a data or
tokenizer file, a checkpoint, the mesh, a coordinator address. Each is a `UserError` (directly, or
through the domain types that subclass it: `data.DataError`, `convert.errors.ConversionError`,
`train.checkpoint.CheckpointError`, `config.ConfigError`) whose message names the field, file or
tensor. Every tool's `main` runs under `guard`: a UserError prints `error: <message>` on stderr and
exits with EXIT_BAD_INPUT, with no traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

EXIT_BAD_INPUT = 2

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """Bad input the user can fix; the message names the config field, file or tensor."""


def message(e: BaseException) -> str:
    """The one paragraph printed for `e`."""
    return f"error: {str(e).strip()}"


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean n_routed_experts?)' for the closest known name, or '' if none is close."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def report(e: BaseException) -> int:
    print(message(e), file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def guard(main: F) -> F:
    """Wraps a tool's main: a UserError becomes its one paragraph and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            sys.exit(report(e))

    return wrapped  # type: ignore[return-value]


@contextlib.contextmanager
def as_user_error(*types: type[BaseException], prefix: str = "") -> Iterator[None]:
    """Re-raises `types` from a block that only validates input (e.g. the mesh checks) as a
    UserError with the same message; use it around validation, never around real work."""
    try:
        yield
    except UserError:
        raise
    except types as e:
        raise UserError(f"{prefix}{e}") from e
