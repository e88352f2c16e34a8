"""The `--phase` syntax of the cost estimate, and `--add_hours`.

    --phase=[NAME:]SEQ_LEN:TOKENS[:MFU]      one training phase, repeated for a list
    --add_hours=NAME:HOURS                   device-hours counted as they are (post-training, ...)

TOKENS is a number (`14.8e12`), a number with a K/M/B/T suffix (`14.8T`, `62.9B`), or
`SEQUENCESxSTEPS` (`1920x1000`: 1920 sequences of SEQ_LEN tokens per step for 1000 steps, the way
the V3 report states its context-extension phases). MFU is a fraction in (0, 1]; without it the
phase takes `--mfu`. NAME starts with a letter; without one the phase is named after SEQ_LEN.
"""

from __future__ import annotations

import dataclasses
import math
import re

from deepseek_jax import errors

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
_NAME = re.compile(r"^[A-Za-z][\w.+-]*$")


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    seq_len: int
    tokens: float
    mfu: float | None = None


@dataclasses.dataclass(frozen=True)
class FixedHours:
    name: str
    hours: float


def _number(text: str, what: str) -> float:
    t = text.strip().lower()
    scale = 1.0
    if t and t[-1] in _SUFFIX:
        t, scale = t[:-1], _SUFFIX[t[-1]]
    try:
        value = float(t) * scale
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} {text!r} is not finite")
    return value


def positive(text: str, what: str) -> float:
    value = _number(text, what)
    if value <= 0:
        raise ValueError(f"{what} must be > 0, got {text}")
    return value


def fraction(text: str | float, what: str = "MFU") -> float:
    value = _number(str(text), what)
    if not 0 < value <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {text} (a fraction: 0.4 means 40%)")
    return value


def _tokens(text: str, seq_len: int) -> float:
    if "x" in text.lower():
        seqs, _, steps = text.lower().partition("x")
        return seq_len * positive(seqs, "sequences per step") * positive(steps, "steps")
    return positive(text, "tokens")


def parse_phase(spec: str, flag: str = "--phase") -> Phase:
    """One `[NAME:]SEQ_LEN:TOKENS[:MFU]`; a malformed one is a UserError naming the flag."""
    fields = spec.split(":")
    name = None
    if fields and _NAME.match(fields[0]):
        name, fields = fields[0], fields[1:]
    try:
        if len(fields) not in (2, 3):
            raise ValueError("expected [NAME:]SEQ_LEN:TOKENS[:MFU], e.g. 32768:1920x1000:0.25")
        if not fields[0].isdigit() or int(fields[0]) == 0:
            # no K suffix: 4K would be ambiguous between 4000 and 4096
            raise ValueError(f"SEQ_LEN must be a positive integer (4096, not 4K), got {fields[0]}")
        seq_len = int(fields[0])
        tokens = _tokens(fields[1], seq_len)
        mfu = fraction(fields[2]) if len(fields) == 3 else None
    except ValueError as e:
        raise errors.UserError(f"{flag}={spec}: {e}") from None
    return Phase(name or f"seq {seq_len}", seq_len, tokens, mfu)


def parse_fixed(spec: str, flag: str = "--add_hours") -> FixedHours:
    name, sep, hours = spec.rpartition(":")
    try:
        if not sep or not _NAME.match(name):
            raise ValueError("expected NAME:HOURS, e.g. post-training:5e3")
        return FixedHours(name, positive(hours, "HOURS"))
    except ValueError as e:
        raise errors.UserError(f"{flag}={spec}: {e}") from None
