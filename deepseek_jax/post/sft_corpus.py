"""An SFT run's samples: the training samples, the held-out samples and the held-out prompts.

`load(cfg, tokenizer)` reads (or, for the synthetic task, generates) every conversation once,
renders it with the configured chat template and tokenizes it with the loss mask of
`chat.tokenize`. Held-out conversations are used twice: as packed samples for the assistant-token
loss, and as prompts (the history before the last assistant turn, with the generation prompt)
whose greedy answer must equal that turn's content for exact match.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from deepseek_jax.data import sources
from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.post import chat, sft_data, tasks
from deepseek_jax.post import config as sft_config


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: np.ndarray  # int32 [P]: the rendered history and the generation prompt
    reply: str  # the assistant content a correct answer reproduces
    origin: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: list[chat.Sample]
    eval: list[chat.Sample]
    prompts: list[Prompt]
    fingerprint: str  # of every train sample's tokens and mask: a resumed run must see the same


def template_for(cfg: sft_config.SFTConfig, tokenizer: tok_lib.Tokenizer) -> chat.ChatTemplate:
    if cfg.template is sft_config.Template.TOKENIZER_CONFIG:
        return chat.from_tokenizer_config(cfg.tokenizer_config)
    if not isinstance(tokenizer, tok_lib.ByteTokenizer):
        raise sources.DataError(
            "sft.template=builtin is the byte tokenizer's template; with data.tokenizer=hf set "
            "sft.template=tokenizer_config and sft.tokenizer_config=<tokenizer_config.json>"
        )
    return chat.byte_template(tokenizer)


def _conversations(cfg: sft_config.SFTConfig, eval_split: bool):
    """(origin, messages) of the train or held-out split."""
    if cfg.source is sft_config.Source.TASK:
        split = tasks.Split.EVAL if eval_split else tasks.Split.TRAIN
        n = cfg.task_eval if eval_split else cfg.task_train
        for j, ex in enumerate(
            tasks.examples(cfg.task, split, n, cfg.task_seed, cfg.think, cfg.task_length)
        ):
            yield f"task {cfg.task.value} {split.value} #{j}", ex.messages()
        return
    for path in cfg.eval_paths if eval_split else cfg.paths:
        for line, messages in sft_data.read_conversations(path, cfg.file_format):
            yield f"{path}:{line}", messages


def _samples(template, tokenizer, convs: Iterable) -> list[chat.Sample]:
    out: list[chat.Sample] = []
    for origin, messages in convs:
        out.extend(chat.tokenize(template, tokenizer, messages, origin=origin))
    return out


def prompt_of(
    template: chat.ChatTemplate, tokenizer: tok_lib.Tokenizer, messages: Sequence, origin: str
) -> Prompt:
    """The prompt for the last assistant turn of `messages` and the reply it should get."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = template.render(messages[:last], add_generation_prompt=True)
    ids, _ = template.encode(tokenizer, text)
    return Prompt(ids.astype(np.int32), messages[last]["content"], origin)


def load(cfg: sft_config.SFTConfig, tokenizer: tok_lib.Tokenizer) -> Corpus:
    """Every sample and held-out prompt of the run; errors name the file:line or task item."""
    template = template_for(cfg, tokenizer)
    train = _samples(template, tokenizer, _conversations(cfg, False))
    held_out = list(_conversations(cfg, True))
    evals = _samples(template, tokenizer, held_out)
    prompts = [prompt_of(template, tokenizer, m, o) for o, m in held_out[: cfg.eval_generate]]
    if not train:
        raise sources.DataError("sft: the training split has no samples")
    h = hashlib.sha256()
    for s in train:
        h.update(s.ids.tobytes())
        h.update(s.target.tobytes())
    return Corpus(train, evals, prompts, h.hexdigest()[:16])


def answer_text(tokenizer: tok_lib.Tokenizer, tokens: np.ndarray, eos_id: int) -> str:
    """The decoded answer of one generated row: tokens before EOS (and before the -1 filler)."""
    tokens = np.asarray(tokens)
    stop = np.flatnonzero((tokens == eos_id) | (tokens < 0))
    return tokenizer.decode(tokens[: stop[0] if stop.size else tokens.size])


def exact_match(answer: str, reply: str) -> bool:
    """Equal up to surrounding whitespace (templates differ in the newlines they write)."""
    return answer.strip() == reply.strip()
