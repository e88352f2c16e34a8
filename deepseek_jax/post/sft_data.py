"""SFT data sources: messages JSONL and prompt/completion JSONL, read into tokenized samples.

Formats (one JSON object per line; blank lines are skipped but counted):
    messages            {"messages": [{"role": "system" | "user" | "assistant", "content": str},
                         ...]}  multi-turn; every assistant turn is a target
    prompt_completion   {"prompt": str, "completion": str} and an optional "system": str; the
                        same as messages [system?, user = prompt, assistant = completion]

Everything is validated as it is read, before any tokenizing or training: a malformed line, an
unknown role, a conversation without an assistant turn, a message without string content -- each
a `DataError` naming the file and line.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Iterator

from deepseek_jax.data import sources
from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.post import chat


class Format(enum.Enum):
    MESSAGES = "messages"
    PROMPT_COMPLETION = "prompt_completion"


def read_conversations(path: str, fmt: Format) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) of each non-blank line of `path`, validated."""
    if not os.path.isfile(path):
        raise sources.DataError(f"no such SFT data file: {path!r}")
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise sources.DataError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise sources.DataError(
                    f"{where}: expected a JSON object, got {type(record).__name__}"
                )
            messages = (
                _messages(record, where)
                if fmt is Format.MESSAGES
                else _prompt_completion(record, where)
            )
            if not any(m["role"] == "assistant" for m in messages):
                raise sources.DataError(
                    f"{where}: the conversation has no assistant turn (nothing to train on)"
                )
            yield n, messages


def load(
    path: str, fmt: Format, template: chat.ChatTemplate, tokenizer: tok_lib.Tokenizer
) -> list[chat.Sample]:
    """Every sample of `path`, tokenized with `template` (origin "path:line" each)."""
    out: list[chat.Sample] = []
    for n, messages in read_conversations(path, fmt):
        out.extend(chat.tokenize(template, tokenizer, messages, origin=f"{path}:{n}"))
    return out


def _messages(record: dict, where: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise sources.DataError(f'{where}: expected "messages": a non-empty list of messages')
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise sources.DataError(f"{where}: message {j} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in chat.ROLES:
            raise sources.DataError(
                f"{where}: message {j} has unknown role {role!r} (expected one of "
                f"{', '.join(chat.ROLES)})"
            )
        if not isinstance(content, str):
            raise sources.DataError(f'{where}: message {j} ({role}) needs a string "content"')
        out.append({"role": role, "content": content})
    return out


def _prompt_completion(record: dict, where: str) -> list[dict[str, str]]:
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise sources.DataError(f'{where}: expected a string "{key}"')
    unknown = sorted(set(record) - {"prompt", "completion", "system"})
    if unknown:
        raise sources.DataError(f"{where}: unknown keys {unknown} (prompt, completion, system)")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise sources.DataError(f'{where}: "system" must be a string')
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["completion"]},
    ]
