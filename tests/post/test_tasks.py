"""Synthetic chat tasks: deterministic, correct, with disjoint splits, and trainable end to end
through the chat template and the packer."""

from __future__ import annotations

import pytest

from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.post import chat, packing, rewards, tasks


@pytest.mark.parametrize("task", list(tasks.Task))
def test_tasks_are_deterministic_correct_and_split(task):
    train = tasks.examples(task, tasks.Split.TRAIN, 200, seed=0)
    held = tasks.examples(task, tasks.Split.EVAL, 30, seed=0)
    assert train == tasks.examples(task, tasks.Split.TRAIN, 200, seed=0)
    assert train != tasks.examples(task, tasks.Split.TRAIN, 200, seed=1)
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert len({e.prompt for e in train}) == 200
    for e in train + held:
        if task is tasks.Task.REVERSE:
            assert e.answer == e.prompt.removeprefix("Reverse: ")[::-1]
        else:
            a, b = e.prompt.removesuffix("=").split("+")
            assert int(e.answer) == int(a) + int(b)
        assert e.reply == e.answer


def test_think_replies_earn_full_rewards_and_pack():
    ex = tasks.examples(tasks.Task.ADD, tasks.Split.EVAL, 20, think=True)
    for e in ex:
        assert rewards.accuracy_reward(e.reply, e.answer) == 1.0
        assert rewards.format_reward(e.reply) == 1.0
    tok = tok_lib.ByteTokenizer()
    samples = [s for e in ex for s in chat.tokenize(chat.byte_template(tok), tok, e.messages())]
    rows = packing.pack(samples, 256, pad_id=tok.pad_id, token_bytes=tok.token_bytes)
    assert rows["inputs"].shape[0] < len(samples)
    assert int(rows["loss_mask"].sum()) == sum(len(e.reply.encode()) + 1 for e in ex)
    assert rows["segment_ids"].max() >= 2
