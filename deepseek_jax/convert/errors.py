"""The one exception type conversion raises for bad input.

Every problem with a user's files (a missing or extra tensor, a wrong shape or dtype, a corrupt or
truncated safetensors file, an unknown model type, an existing output) is a `ConversionError` whose
message names the tensor or file. The command-line tools print it as one line and exit with
`EXIT_BAD_INPUT`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from deepseek_jax import errors

EXIT_BAD_INPUT = errors.EXIT_BAD_INPUT


class ConversionError(errors.UserError):
    """Bad input for a conversion; the message names the offending tensor or file."""


def first_few(names: list[str] | set[str], n: int = 5) -> str:
    """'a, b, c (and 7 more)': enough to find the problem without flooding the terminal."""
    ordered = sorted(names)
    head = ", ".join(ordered[:n])
    return head if len(ordered) <= n else f"{head} (and {len(ordered) - n} more)"
