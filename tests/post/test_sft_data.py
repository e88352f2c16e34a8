"""SFT sources: both JSONL formats load into samples; every kind of bad line names file:line."""

from __future__ import annotations

import json

import pytest

from deepseek_jax.data import sources
from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.post import chat, sft_data

BYTES = tok_lib.ByteTokenizer()
TEMPLATE = chat.byte_template(BYTES)


def write(tmp_path, lines) -> str:
    path = tmp_path / "sft.jsonl"
    path.write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n",
        encoding="utf-8",
    )
    return str(path)


def test_both_formats_give_the_same_samples(tmp_path):
    messages = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        "",  # blank lines are skipped but counted
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
            ]
        },
    ]
    pc = [
        {"prompt": "2+2?", "completion": "4"},
        "",
        {"system": "s", "prompt": "hi", "completion": "yo"},
    ]
    a = sft_data.load(write(tmp_path, messages), sft_data.Format.MESSAGES, TEMPLATE, BYTES)
    path = write(tmp_path, pc)
    b = sft_data.load(path, sft_data.Format.PROMPT_COMPLETION, TEMPLATE, BYTES)
    assert [s.origin for s in b] == [f"{path}:1", f"{path}:3"]
    for x, y in zip(a, b, strict=True):
        assert (x.ids == y.ids).all() and (x.target == y.target).all()
    assert BYTES.decode(b[1].ids[b[1].target]) == "yo"


BAD_MESSAGES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"text": "x"}, 'expected "messages": a non-empty list'),
    ({"messages": []}, 'expected "messages": a non-empty list'),
    ({"messages": ["hi"]}, "message 0 is not an object"),
    (
        {"messages": [{"role": "bot", "content": "x"}]},
        "message 0 has unknown role 'bot' \\(expected one of system, user, assistant\\)",
    ),
    ({"messages": [{"role": "user", "content": 3}]}, r'message 0 \(user\) needs a string "con'),
    ({"messages": [{"role": "user", "content": "x"}]}, "the conversation has no assistant turn"),
]


@pytest.mark.parametrize("line,match", BAD_MESSAGES)
def test_bad_message_lines_name_file_and_line(tmp_path, line, match):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write(tmp_path, [good, good, line])
    with pytest.raises(sources.DataError, match=f"sft.jsonl:3: {match}"):
        sft_data.load(path, sft_data.Format.MESSAGES, TEMPLATE, BYTES)


BAD_PROMPT_COMPLETION = [
    ({"prompt": "x"}, 'expected a string "completion"'),
    ({"prompt": 1, "completion": "y"}, 'expected a string "prompt"'),
    ({"prompt": "x", "completion": "y", "answer": "z"}, "unknown keys \\['answer'\\]"),
    ({"prompt": "x", "completion": "y", "system": ["s"]}, '"system" must be a string'),
]


@pytest.mark.parametrize("line,match", BAD_PROMPT_COMPLETION)
def test_bad_prompt_completion_lines(tmp_path, line, match):
    path = write(tmp_path, [line])
    with pytest.raises(sources.DataError, match=f"sft.jsonl:1: {match}"):
        sft_data.load(path, sft_data.Format.PROMPT_COMPLETION, TEMPLATE, BYTES)


def test_missing_file_and_special_token_in_content(tmp_path):
    with pytest.raises(sources.DataError, match="no such SFT data file"):
        list(sft_data.read_conversations(str(tmp_path / "nope.jsonl"), sft_data.Format.MESSAGES))
    path = write(tmp_path, [{"prompt": "x", "completion": "a<|eos|>"}])
    with pytest.raises(sources.DataError, match="sft.jsonl:1: message 1 .* special token"):
        sft_data.load(path, sft_data.Format.PROMPT_COMPLETION, TEMPLATE, BYTES)
