"""The samples and held-out prompts of an SFT run (post/sft_corpus.py) and the `sft` config."""

import json

import numpy as np
import pytest

from deepseek_jax import config as experiment
from deepseek_jax.data import sources
from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.post import config as sft_config
from deepseek_jax.post import sft_corpus

TOK = tok_lib.ByteTokenizer()


def task_cfg(**kw):
    base = dict(source=sft_config.Source.TASK, task_train=40, task_eval=12, eval_generate=5)
    return sft_config.SFTConfig(**{**base, **kw})


def test_task_corpus_splits_and_prompts_line_up_with_the_samples():
    corpus = sft_corpus.load(task_cfg(think=True), TOK)
    assert len(corpus.train) == 40 and len(corpus.eval) == 12 and len(corpus.prompts) == 5
    for sample, prompt in zip(corpus.eval, corpus.prompts):
        # The prompt is exactly the sample's tokens before its first target: what the model saw
        # in training right before it had to answer.
        first = int(np.flatnonzero(sample.target)[0])
        np.testing.assert_array_equal(prompt.ids, sample.ids[:first])
        # And the targets decode to the reference reply plus EOS.
        assert TOK.decode(sample.ids[sample.target][:-1]) == prompt.reply
        assert sample.ids[sample.target][-1] == TOK.eos_id
    train_prompts = {TOK.decode(s.ids) for s in corpus.train}
    assert not train_prompts & {TOK.decode(s.ids) for s in corpus.eval}


def test_the_fingerprint_follows_the_training_samples():
    a = sft_corpus.load(task_cfg(), TOK).fingerprint
    assert a == sft_corpus.load(task_cfg(), TOK).fingerprint
    assert a != sft_corpus.load(task_cfg(task_seed=1), TOK).fingerprint
    assert a != sft_corpus.load(task_cfg(think=True), TOK).fingerprint


def test_messages_files(tmp_path):
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(json.dumps({"messages": conv}) + "\n")
    held.write_text(json.dumps({"messages": conv}) + "\n\n" + json.dumps({"messages": conv}))
    cfg = sft_config.SFTConfig(
        source=sft_config.Source.MESSAGES, paths=(str(train),), eval_paths=(str(held),)
    )
    corpus = sft_corpus.load(cfg, TOK)
    assert len(corpus.train) == 1 and len(corpus.eval) == 2
    # Exact match asks for the last assistant turn, after the whole history.
    p = corpus.prompts[0]
    assert p.reply == "4" and p.origin == f"{held}:1"
    assert TOK.decode(p.ids).endswith("<|user|>\n2+2?\n<|assistant|>\n")
    assert corpus.prompts[1].origin == f"{held}:3"


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    cfg = sft_config.SFTConfig(
        source=sft_config.Source.PROMPT_COMPLETION, paths=(str(bad),), eval_paths=(str(bad),)
    )
    with pytest.raises(sources.DataError, match=f"{bad}:2"):
        sft_corpus.load(cfg, TOK)


def test_answers_are_decoded_up_to_eos():
    row = np.array([*b"enots", TOK.eos_id, 65, -1], np.int32)
    assert sft_corpus.answer_text(TOK, row, TOK.eos_id) == "enots"
    assert sft_corpus.answer_text(TOK, np.array([*b"ab", -1, -1]), TOK.eos_id) == "ab"
    assert sft_corpus.exact_match(" enots\n", "enots")
    assert not sft_corpus.exact_match("enot", "enots")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sft.source": "task", "sft.paths": ("a.jsonl",)}, "sft.paths"),
        ({"sft.source": "messages"}, "sft.paths"),
        ({"sft.source": "messages", "sft.paths": ("a.jsonl",)}, "sft.eval_paths"),
        ({"sft.source": "task", "sft.template": "tokenizer_config"}, "sft.tokenizer_config"),
        ({"sft.source": "task", "sft.epochs": -1.0}, "sft.epochs"),
        ({"sft.source": "task", "sft.task_train": 0}, "sft.task_train"),
        ({"sft.source": "task", "sft.max_new_tokens": 0}, "sft.max_new_tokens"),
        ({"sft.source": "task", "sft.moe_bias": "sometimes"}, "sft.moe_bias"),
        ({"sft.source": "sometimes"}, "sft.source"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(experiment.ConfigError, match=field.replace(".", r"\.")):
        experiment.load("configs/tiny.py", overrides)


def test_sft_runs_on_the_pipelined_step_too():
    # The stages take each micro-batch's segment ids and positions (parallel/pipeline/stages.py);
    # tests/parallel/test_pipeline_step.py checks the packed pipelined step against the plain one.
    exp = experiment.load("configs/sft_tiny.py", {"parallel.pipeline": "gpipe", "parallel.pipe": 2})
    assert exp.sft.enabled


def test_sft_tiny_is_valid_and_round_trips():
    exp = experiment.load("configs/sft_tiny.py")
    assert exp.sft.source is sft_config.Source.TASK and exp.sft.epochs == 2.0
    assert experiment.from_config_dict(exp.to_dict()) == exp
