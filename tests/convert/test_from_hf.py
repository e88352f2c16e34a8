"""Import of a transformers-saved model, and the score command on both checkpoint kinds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from deepseek_jax import score as score_cli
from deepseek_jax.convert import __main__ as convert_cli
from deepseek_jax.convert import ckpt_io
from tests import hf_reference
from tests.convert import helpers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random transformers DeepseekV3ForCausalLM, saved with save_pretrained, and its logits.

    Its config.json is edited to say num_nextn_predict_layers=1 with no MTP tensors, as
    transformers' default does, which the import must see through."""
    cfg = dataclasses.replace(helpers.CONFIGS["v3_qlora_groups_yarn"], mtp_depth=0)
    root = tmp_path_factory.mktemp("saved")
    model = hf_reference.build_hf_model(cfg, seed=3)
    tokens = helpers.tokens_for(cfg)
    logits = hf_reference.hf_logits(model, tokens)
    hf_reference.save(model, root / "hf")
    config = json.loads((root / "hf" / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (root / "hf" / "config.json").write_text(json.dumps(config))
    np.save(root / "tokens.npy", tokens)
    return cfg, root, tokens, logits


def _nll(logits, tokens):
    logits = logits[:, :-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return float(np.mean(logz - picked))


def test_import_transformers_saved_then_score(saved, capsys):
    cfg, root, tokens, want = saved
    assert convert_cli.main(["from-hf", f"--hf-dir={root / 'hf'}", f"--out={root / 'step'}"]) == 0
    assert "importing without MTP" in capsys.readouterr().out
    assert ckpt_io.model_config(root / "step") == cfg
    assert (
        score_cli.main(
            [
                f"--checkpoint={root / 'step'}",
                f"--tokens={root / 'tokens.npy'}",
                f"--out={root / 'logits.npy'}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    got = np.load(root / "logits.npy")
    diff = np.abs(got - want).max()
    print(f"import of transformers-saved model: max|ours - transformers| = {diff:.2e}")
    assert got.dtype == np.float32 and got.shape == want.shape and diff < 1e-4
    nll = float(printed.split("mean next-token NLL:")[1].split()[0])
    assert abs(nll - _nll(want, tokens)) < 1e-5


def test_score_reads_hf_directory_directly(saved):
    _, root, _, want = saved
    out = root / "logits_direct.npy"
    assert (
        score_cli.main(
            [f"--checkpoint={root / 'hf'}", f"--tokens={root / 'tokens.npy'}", f"--out={out}"]
        )
        == 0
    )
    assert np.abs(np.load(out) - want).max() < 1e-4


def test_score_workdir_picks_latest_step(exported, tmp_path):
    e = exported("v2_softmax_greedy")
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    helpers.save_state(work / "checkpoints" / "5", e.cfg, e.state)
    zeros = {c: {p: np.zeros_like(a) for p, a in leaves.items()} for c, leaves in e.state.items()}
    helpers.save_state(work / "checkpoints" / "2", e.cfg, zeros)
    (work / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()  # unfinished: ignored
    np.save(tmp_path / "tokens.npy", e.tokens)
    args = [f"--tokens={tmp_path / 'tokens.npy'}", "--dtype=float32"]
    assert score_cli.main([f"--checkpoint={work}", f"--out={tmp_path / 'a.npy'}"] + args) == 0
    assert np.abs(np.load(tmp_path / "a.npy") - e.logits).max() < 1e-5
    assert (
        score_cli.main([f"--checkpoint={work}", "--step=2", f"--out={tmp_path / 'b.npy'}"] + args)
        == 0
    )
    assert np.abs(np.load(tmp_path / "b.npy")).max() == 0.0  # all-zero weights: zero logits
