"""Synthetic chat tasks a tiny byte-level model can learn on CPU in minutes, deterministic, with a
held-out split that never shares a problem with training.

    reverse   "Reverse: stone"  ->  "enots"   (3 to 6 letters, or a fixed length)
    add       "12+30="          ->  "42"

A problem's split is a hash of its text (1 in 8 is "eval"), so splits are disjoint whatever the
seed or count; `examples(task, split, n, seed)` draws problems from a seeded generator and keeps
the first n distinct ones of the split. With `think=True` the reply is in R1's format,
`<think>…</think><answer>…</answer>`, which the GRPO rewards score.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib

import numpy as np

_EVAL_ONE_IN = 8
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


class Task(enum.Enum):
    REVERSE = "reverse"
    ADD = "add"


class Split(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    reply: str  # the assistant's target text

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.reply},
        ]

    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages()[:1]


def split_of(prompt: str) -> Split:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    return Split.EVAL if h % _EVAL_ONE_IN == 0 else Split.TRAIN


def _problem(task: Task, rng: np.random.Generator, length: int) -> tuple[str, str, str]:
    if task is Task.REVERSE:
        word = "".join(rng.choice(_LETTERS, length or int(rng.integers(3, 7))))
        return f"Reverse: {word}", word[::-1], f"{word} backwards"
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    return f"{a}+{b}=", str(a + b), f"{a} plus {b}"


def examples(
    task: Task, split: Split, n: int, seed: int = 0, think: bool = False, length: int = 0
) -> list[Example]:
    """`length`: REVERSE's word length (0: 3 to 6 letters, drawn per problem)."""
    if length < 0 or (length and task is not Task.REVERSE):
        raise ValueError(f"a word length applies to the reverse task only, got {length}")
    rng = np.random.default_rng([seed, list(Task).index(task)])
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        prompt, answer, thought = _problem(task, rng, length)
        if prompt in seen or split_of(prompt) is not split:
            continue
        seen.add(prompt)
        reply = f"<think>{thought}</think><answer>{answer}</answer>" if think else answer
        out.append(Example(prompt, answer, reply))
    raise ValueError(f"task {task.value} has fewer than {n} distinct {split.value} problems")
