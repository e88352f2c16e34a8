"""Supervised fine-tuning through the real training loop (train/sft.py): packed chat rows, SFT
evaluation, frozen routing biases, resume; and the SFT data iterator on its own."""

import json

import numpy as np
import pytest

from deepseek_jax import config as experiment
from deepseek_jax import errors
from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.infer import load
from deepseek_jax.post import config as sft_config
from deepseek_jax.post import sft_corpus
from deepseek_jax.train import loop, sft

OVERRIDES = {
    "sft.task_train": 40,
    "sft.task_eval": 6,
    "sft.eval_generate": 3,
    "sft.max_new_tokens": 64,
    "sft.epochs": 0.0,  # train.steps below
    "sft.moe_bias": "frozen",
    "train.steps": 2,
    "train.global_batch_size": 8,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "checkpoint.every_steps": 2,
    "checkpoint.async_save": False,
    "checkpoint.init_from": None,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two steps, then the same workdir continued to four: the second run resumes."""
    workdir = tmp_path_factory.mktemp("sft")
    first = loop.run(experiment.load("configs/sft_tiny.py", OVERRIDES), workdir)
    more = {**OVERRIDES, "train.steps": 4}
    second = loop.run(experiment.load("configs/sft_tiny.py", more), workdir)
    return workdir, first, second


def test_a_run_reports_held_out_loss_and_exact_match(runs):
    workdir, first, second = runs
    assert 0.0 <= first["eval_exact_match_end"] <= 1.0
    assert np.isfinite(first["eval_loss_end"]) and first["eval_loss_end"] > 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all("eval_exact_match" in e for e in evals)


def test_the_second_run_resumes_the_data_position(runs):
    workdir, first, second = runs
    assert first["start_step"] == 0 and second["start_step"] == 2 and second["step"] == 4
    data = json.loads((workdir / "checkpoints/4/data/process_0-of-1.json").read_text())
    # Two batches before the resume, two after: the iterator continued, it did not restart.
    assert data["kind"] == "sft" and data["next_batch"] == 4


def test_frozen_biases_are_never_updated(runs):
    workdir, *_ = runs
    _, arrays, _ = load.load(workdir / "checkpoints" / "4")
    biases = list(arrays["expert_bias"].values())
    assert biases and all(not b.any() for b in biases)  # initialised at 0, rate 0 since


def test_resolve_sets_steps_from_epochs_and_freezes_the_bias():
    exp = experiment.load("configs/sft_tiny.py", {"sft.epochs": 1.5, "sft.moe_bias": "frozen"})
    out = sft.resolve(exp, train_rows=100)
    assert out.train.steps == 10  # ceil(1.5 * 100 / 16)
    assert out.train.bias_update_rate.values == (0.0,)
    kept = sft.resolve(experiment.load("configs/sft_tiny.py", {"sft.epochs": 0.0}), 100)
    assert kept.train.steps == exp.train.steps
    assert kept.train.bias_update_rate == exp.train.bias_update_rate


def _data(rows, **kw):
    args = dict(
        global_batch=4, process_index=0, process_count=1, seed=3, pad_id=-7, fingerprint="f"
    )
    return sft.Data(rows, **{**args, **kw})


ROWS = {
    "inputs": np.arange(10)[:, None] * np.ones((1, 3), np.int32),
    "loss_mask": np.ones((10, 3), np.float32),
}


def test_each_epoch_takes_every_row_once_reshuffled():
    it = _data(ROWS)
    assert it.batches_per_epoch == 3
    epochs = [np.concatenate([next(it)["inputs"][:, 0] for _ in range(3)]) for _ in range(2)]
    for e in epochs:  # 10 rows + 2 padding rows (inputs pad_id, loss_mask 0)
        assert sorted(e[e >= 0]) == list(range(10)) and (e == -7).sum() == 2
    assert not np.array_equal(epochs[0], epochs[1])


def test_state_restores_the_position_and_rejects_other_data():
    a, b = _data(ROWS), _data(ROWS)
    for _ in range(4):
        next(a)
    b.set_state(json.loads(json.dumps(a.get_state())))
    for _ in range(3):
        np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])
    with pytest.raises(ValueError, match="other data"):
        _data(ROWS, seed=4).set_state(a.get_state())


def test_processes_build_their_rows_of_the_same_global_batch():
    whole = _data(ROWS)
    halves = [_data(ROWS, process_index=i, process_count=2) for i in range(2)]
    for _ in range(5):
        parts = [next(h) for h in halves]
        expect = next(whole)
        got = {k: np.concatenate([p[k] for p in parts]) for k in expect}
        for k in expect:
            np.testing.assert_array_equal(got[k], expect[k])
        mask = got["loss_mask"][:, 0]
        assert (mask[got["inputs"][:, 0] == -7] == 0).all()


def test_prompts_are_the_generation_prompt_of_the_template():
    tok = tok_lib.ByteTokenizer()
    cfg = sft_config.SFTConfig(source=sft_config.Source.TASK, task_train=2, task_eval=2)
    p = sft_corpus.load(cfg, tok).prompts[0]
    assert tok.decode(p.ids).startswith("<|user|>\nReverse: ")
    assert tok.decode(p.ids).endswith("\n<|assistant|>\n")


def test_too_short_an_answer_budget_is_an_error_before_training(tmp_path):
    exp = experiment.load("configs/sft_tiny.py", {**OVERRIDES, "sft.max_new_tokens": 20})
    with pytest.raises(errors.UserError, match=r"sft.max_new_tokens=20 .*\(51 tokens"):
        loop.run(exp, tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoints").exists()
