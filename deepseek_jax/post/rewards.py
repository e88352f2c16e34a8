"""Rule rewards (R1): an exact-answer accuracy reward and a format reward, in [0, 1].

The format is R1-Zero's: `<think>reasoning</think><answer>answer</answer>`, each tag exactly once,
in that order, with only whitespace before, between and after. The accuracy reward reads the
answer out of that format (no well-formed answer, no credit) and compares it with the reference:
numerically when the reference is a number (so " 42 " and "42.0" match 42, "forty-two" does not),
else as the exact string after stripping surrounding whitespace.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def extract_answer(text: str) -> str | None:
    """The answer of a well-formed completion, or None."""
    if any(text.count(tag) != 1 for tag in TAGS):
        return None
    m = _FORMAT.fullmatch(text)
    return m.group(2) if m else None


def format_reward(text: str, reference: str | None = None) -> float:
    return 1.0 if extract_answer(text) is not None else 0.0


def _number(s: str) -> Decimal | None:
    s = s.strip()
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        return None


def accuracy_reward(text: str, reference: str | None) -> float:
    answer = extract_answer(text)
    if answer is None or reference is None:
        return 0.0
    want = _number(reference)
    if want is not None:
        got = _number(answer)
        return 1.0 if got is not None and got == want else 0.0
    return 1.0 if answer.strip() == reference.strip() else 0.0


Reward = Callable[[str, "str | None"], float]
REWARDS: Mapping[str, Reward] = {"accuracy": accuracy_reward, "format": format_reward}


def score(text: str, reference: str | None, weights: Mapping[str, float]) -> dict[str, float]:
    """Each named reward of `text` and their weighted sum under "total"."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown rewards {unknown}; known: {sorted(REWARDS)}")
    out = {name: REWARDS[name](text, reference) for name in weights}
    out["total"] = sum(weights[n] * out[n] for n in weights)
    return out
