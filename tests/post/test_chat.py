"""Chat rendering and loss masks: templates render as transformers does, and for every assistant
turn the targets decode exactly to its content + EOS, with no template token a target."""

from __future__ import annotations

import numpy as np
import pytest

from deepseek_jax.data import sources
from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.post import chat
from tests.post import conftest

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "What is 12+30?"},
        {"role": "assistant", "content": "42."},
        {"role": "user", "content": "Reverse: stone"},
        {"role": "assistant", "content": " enots, ü and ∑ too\n"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},  # an empty reply still teaches the EOS
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "<think>x</think>y"},
        {"role": "user", "content": "trailing user turn, not a target"},
    ],
]


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def check_targets(sample: chat.Sample, tokenizer, replies: list[str]) -> None:
    """The target runs are exactly the replies, each content + EOS, in order."""
    spans = runs(sample.target)
    assert len(spans) == len(replies)
    for (a, b), reply in zip(spans, replies):
        ids = sample.ids[a:b]
        assert ids[-1] == tokenizer.eos_id and (ids[:-1] != tokenizer.eos_id).all()
        assert tokenizer.decode(ids[:-1]) == reply
    assert not sample.target[0]


@pytest.fixture(scope="module")
def hf(hf_tokenizer_path):
    return tok_lib.HFTokenizer(hf_tokenizer_path, eos_token="<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_byte_template_targets_are_each_reply_and_eos(messages):
    tokenizer = tok_lib.ByteTokenizer()
    [sample] = chat.tokenize(chat.byte_template(tokenizer), tokenizer, messages)
    check_targets(sample, tokenizer, [m["content"] for m in messages if m["role"] == "assistant"])
    # the ids are the whole conversation up to its last EOS, EOS spelled as the EOS id
    text = chat.byte_template(tokenizer).render(messages)
    text = text[: text.rindex(chat.BYTE_EOS) + len(chat.BYTE_EOS)]
    assert tokenizer.decode(sample.ids) == text.replace(chat.BYTE_EOS, "")
    assert (sample.ids == tokenizer.eos_id).sum() == text.count(chat.BYTE_EOS)


@pytest.mark.parametrize("template", [conftest.DEEPSEEK, conftest.CHATML])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_hf_templates_targets_and_one_tokenization(tmp_path, hf_tokenizer_path, template, messages):
    eos = "<|im_end|>" if template is conftest.CHATML else "<｜end▁of▁sentence｜>"
    tokenizer = tok_lib.HFTokenizer(hf_tokenizer_path, eos_token=eos)
    tpl = chat.from_tokenizer_config(conftest.write_config(tmp_path, template, eos=eos))
    [sample] = chat.tokenize(tpl, tokenizer, messages)
    check_targets(sample, tokenizer, [m["content"] for m in messages if m["role"] == "assistant"])
    # No re-tokenization drift: the ids are a prefix of transformers' own tokenization of the
    # whole conversation (they stop at the last target).
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(
        tokenizer_file=hf_tokenizer_path, bos_token="<｜begin▁of▁sentence｜>", eos_token=eos
    )
    ref.chat_template = template
    want = ref.apply_chat_template(messages, tokenize=True, return_dict=False)
    np.testing.assert_array_equal(sample.ids, np.asarray(want)[: sample.ids.size])
    assert sample.target.any() and not sample.target[sample.ids.size :].any()


@pytest.mark.parametrize("template", [conftest.DEEPSEEK, conftest.CHATML, conftest.STRIPPING])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_equals_transformers(tmp_path, template, generation_prompt):
    from transformers.utils import chat_template_utils

    tpl = chat.from_tokenizer_config(conftest.write_config(tmp_path, template))
    for messages in CONVERSATIONS:
        [want], _ = chat_template_utils.render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=generation_prompt,
            bos_token="<｜begin▁of▁sentence｜>",
            eos_token="<｜end▁of▁sentence｜>",
        )
        assert tpl.render(messages, add_generation_prompt=generation_prompt) == want


def test_a_template_that_rewrites_earlier_turns_gives_one_sample_per_turn(tmp_path, hf):
    tpl = chat.from_tokenizer_config(conftest.write_config(tmp_path, conftest.STRIPPING))
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>x</think>y"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "z"},
    ]
    first, second = chat.tokenize(tpl, hf, messages)
    check_targets(first, hf, ["<think>x</think>y"])  # its own turn keeps the reasoning...
    check_targets(second, hf, ["z"])
    # ...which later turns see stripped, as the template renders history
    assert hf.decode(second.ids) == "ayb" + "z" and "<think>" not in hf.decode(second.ids)
    # prefix-stable conversations stay one sample
    assert len(chat.tokenize(tpl, hf, messages[:2])) == 1


def test_template_errors_name_the_file(tmp_path):
    with pytest.raises(sources.DataError, match="has no chat_template"):
        chat.from_tokenizer_config(conftest.write_config(tmp_path, None))
    with pytest.raises(sources.DataError, match="not valid jinja2"):
        chat.from_tokenizer_config(conftest.write_config(tmp_path, "{% for %}"))
    with pytest.raises(sources.DataError, match="no such tokenizer_config.json"):
        chat.from_tokenizer_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(sources.DataError, match="bad.json: not a readable JSON"):
        chat.from_tokenizer_config(str(tmp_path / "bad.json"))
    no_eos = conftest.write_config(tmp_path, conftest.DEEPSEEK, eos=None)
    with pytest.raises(sources.DataError, match="eos_token is missing"):
        chat.from_tokenizer_config(no_eos)
    named = [{"name": "default", "template": conftest.CHATML}, {"name": "tool", "template": "x"}]
    named = conftest.write_config(tmp_path, named)
    assert chat.from_tokenizer_config(named).render(CONVERSATIONS[0]).startswith("<|im_start|>user")


def test_bad_conversations(tmp_path, hf):
    tokenizer = tok_lib.ByteTokenizer()
    tpl = chat.byte_template(tokenizer)
    with pytest.raises(sources.DataError, match="f.jsonl:3: the conversation has no assistant"):
        chat.tokenize(tpl, tokenizer, [{"role": "user", "content": "x"}], origin="f.jsonl:3")
    sneaky = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a<|eos|>b"}]
    with pytest.raises(sources.DataError, match=r"message 1 \(assistant\) contains the special"):
        chat.tokenize(tpl, tokenizer, sneaky)
    boom = "{{ raise_exception('only user/assistant roles') }}"
    with pytest.raises(sources.DataError, match="only user/assistant roles"):
        chat.from_tokenizer_config(conftest.write_config(tmp_path, boom)).render(CONVERSATIONS[0])
    # A generation prompt the template does not write before assistant turns: no mask exists.
    prompt = "{{ '<｜Assistant｜>' }}{% endif %}"
    diverging = conftest.DEEPSEEK.replace(prompt, prompt.replace("｜>'", "｜><think>'"))
    tpl = chat.from_tokenizer_config(conftest.write_config(tmp_path, diverging))
    with pytest.raises(sources.DataError, match="generation prompt is not a prefix"):
        chat.tokenize(tpl, hf, CONVERSATIONS[0])
    no_eos = conftest.DEEPSEEK.replace(" + eos_token }}", " }}")
    tpl = chat.from_tokenizer_config(conftest.write_config(tmp_path, no_eos))
    with pytest.raises(sources.DataError, match="not followed by eos_token"):
        chat.tokenize(tpl, hf, CONVERSATIONS[0])


def test_a_token_across_the_template_boundary_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "<｜end▁of▁sentence｜>": 1}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.add_special_tokens(["<｜end▁of▁sentence｜>"])
    words.save(str(tmp_path / "tokenizer.json"))
    tokenizer = tok_lib.HFTokenizer(str(tmp_path / "tokenizer.json"))
    glued = (
        "{% for m in messages %}{{ 'Say' + m['content'] + eos_token }}{% endfor %}"
        "{{ 'Say' if add_generation_prompt else '' }}"
    )
    tpl = chat.from_tokenizer_config(conftest.write_config(tmp_path, glued))
    messages = [{"role": "user", "content": " hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(sources.DataError, match="spans both template text and assistant text"):
        chat.tokenize(tpl, tokenizer, messages)
