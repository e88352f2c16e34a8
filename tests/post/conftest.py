"""Fixtures of the post-training tests: chat templates in the shapes real models use, and a tiny
byte-level BPE tokenizer (trained here, offline) that knows their special tokens."""

from __future__ import annotations

import json

import pytest

# DeepSeek-V3's form: bos + system + <｜User｜>... <｜Assistant｜>... <｜end▁of▁sentence｜>.
DEEPSEEK = (
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
# ChatML (Qwen): writes "\n" after each turn's EOS, which must not be a target.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Like Qwen3/R1: earlier assistant turns lose their reasoning once a later turn follows.
STRIPPING = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if not loop.last and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + eos_token }}"
    "{% else %}{{ '<｜User｜>' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
SPECIALS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<|im_start|>",
    "<|im_end|>",
]
TEXT = [
    "hello there, how are you today? I am fine thanks.",
    "Reverse the word: stone. enots. What is 12+30? 42.",
    "system prompts tell the assistant how to behave; <think>reasoning</think> answers.",
]


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 5, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def write_config(directory, template, eos="<｜end▁of▁sentence｜>", **extra) -> str:
    cfg = {"bos_token": {"content": "<｜begin▁of▁sentence｜>"}, "eos_token": eos, **extra}
    if template is not None:
        cfg["chat_template"] = template
    path = directory / "tokenizer_config.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return str(path)
