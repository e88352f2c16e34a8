"""Rule rewards, table-driven: the format reward and the exact-answer accuracy reward."""

from __future__ import annotations

import pytest

from deepseek_jax.post import rewards

FORMAT = [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>a</think>\n<answer>b</answer>\n", 1.0),
    ("  <think>\nmulti\nline\n</think> <answer> 4 </answer>", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<think>a</think><answer>b</answer> trailing text", 0.0),
    ("leading <think>a</think><answer>b</answer>", 0.0),
    ("<think>a</think> middle <answer>b</answer>", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),  # out of order
    ("<think>a</think>", 0.0),  # answer missing
    ("<answer>b</answer>", 0.0),  # think missing
    ("b", 0.0),
    ("", 0.0),
    ("<think>a</think><think>a</think><answer>b</answer>", 0.0),  # doubled think
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # doubled answer
    ("<think>a<think>b</think><answer>c</answer>", 0.0),  # doubled opening tag
    ("<think>a</think><answer>b", 0.0),  # unclosed
    ("<think>a<answer>b</answer></think>", 0.0),  # nested
    ("</think>a<think><answer>b</answer>", 0.0),  # closing before opening
    ("<think>a</think><answer>b</answer></answer>", 0.0),
    ("<Think>a</Think><Answer>b</Answer>", 0.0),  # tags are case-sensitive
    ("<think>a</ think><answer>b</answer>", 0.0),
    ("<think>a</think><answer>b</answer>\t \n", 1.0),
]

ACCURACY = [
    ("<think>x</think><answer>42</answer>", "42", 1.0),
    ("<think>x</think><answer> 42 </answer>", "42", 1.0),  # whitespace
    ("<think>x</think><answer>\n42\n</answer>", "42", 1.0),
    ("<think>x</think><answer>42.0</answer>", "42", 1.0),  # numerically equal
    ("<think>x</think><answer>+42</answer>", "42", 1.0),
    ("<think>x</think><answer>042</answer>", "42", 1.0),
    ("<think>x</think><answer>-7</answer>", "-7", 1.0),
    ("<think>x</think><answer>.5</answer>", "0.5", 1.0),
    ("<think>x</think><answer>43</answer>", "42", 0.0),  # wrong
    ("<think>x</think><answer>-42</answer>", "42", 0.0),
    ("<think>x</think><answer>forty-two</answer>", "42", 0.0),  # non-numeric
    ("<think>x</think><answer>42 apples</answer>", "42", 0.0),
    ("<think>x</think><answer>4 2</answer>", "42", 0.0),
    ("<think>x</think><answer>1e1</answer>", "10", 0.0),  # only plain decimals
    ("<think>x</think><answer></answer>", "42", 0.0),
    ("42", "42", 0.0),  # right answer, no format: no credit
    ("<answer>42</answer>", "42", 0.0),  # think missing
    ("<think>42</think>", "42", 0.0),  # answer missing
    ("<think>x</think><answer>41</answer><answer>42</answer>", "42", 0.0),  # doubled
    ("<answer>42</answer><think>x</think>", "42", 0.0),  # out of order
    ("<think>x</think><answer>enots</answer>", "enots", 1.0),  # string answers
    ("<think>x</think><answer> enots\n</answer>", "enots", 1.0),
    ("<think>x</think><answer>Enots</answer>", "enots", 0.0),
    ("<think>x</think><answer>eno ts</answer>", "enots", 0.0),
    ("<think>x</think><answer>42</answer>", None, 0.0),
]


@pytest.mark.parametrize("text,want", FORMAT)
def test_format_reward(text, want):
    assert rewards.format_reward(text) == want


@pytest.mark.parametrize("text,reference,want", ACCURACY)
def test_accuracy_reward(text, reference, want):
    assert rewards.accuracy_reward(text, reference) == want


def test_weighted_score_and_unknown_names():
    got = rewards.score("<think>x</think><answer>3</answer>", "4", {"accuracy": 1.0, "format": 0.1})
    assert got == {"accuracy": 0.0, "format": 1.0, "total": 0.1}
    with pytest.raises(ValueError, match="unknown rewards \\['length'\\]"):
        rewards.score("x", "y", {"length": 1.0})
