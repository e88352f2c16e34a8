"""Bad input: one `error:` line naming the tensor or file, exit status 2, no output left behind;
existing outputs are replaced only with --overwrite and only by a complete result."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deepseek_jax import score as score_cli
from deepseek_jax.convert import __main__ as convert_cli
from deepseek_jax.convert import ckpt_io
from deepseek_jax.convert import safetensors_io as st

GOOD = "v3_qlora_groups_yarn"  # exported in 16 float32 shards with an index


def _index(d: pathlib.Path) -> dict:
    return json.loads((d / st.INDEX_NAME).read_text())


def _rewrite(d: pathlib.Path, name: str, edit) -> str:
    """Applies edit(tensors) to the shard holding `name` (and the index); returns the shard."""
    from safetensors.torch import load_file, save_file

    index = _index(d)
    shard = index["weight_map"][name]
    tensors = load_file(d / shard)
    edit(tensors)
    save_file(tensors, d / shard, metadata={"format": "pt"})
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != shard}
    index["weight_map"].update({n: shard for n in tensors})
    (d / st.INDEX_NAME).write_text(json.dumps(index))
    return shard


def _missing(d):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(d, name, lambda t: t.pop(name))
    return ["missing tensors", name]


def _extra(d):
    import torch

    name = "model.layers.1.self_attn.rotary_emb.inv_freq"
    _rewrite(d, "model.norm.weight", lambda t: t.update({name: torch.zeros(4)}))
    return ["unexpected tensors", name]


def _extra_not_in_index(d):
    import torch
    from safetensors.torch import load_file, save_file

    shard = _index(d)["weight_map"]["model.norm.weight"]
    tensors = load_file(d / shard)
    tensors["model.layers.0.stray.weight"] = torch.zeros(3)
    save_file(tensors, d / shard, metadata={"format": "pt"})
    return ["model.layers.0.stray.weight", "not in the index"]


def _wrong_shape(d):
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    _rewrite(d, name, lambda t: t.update({name: t[name].T.contiguous()}))
    return [name, "shape [16, 112], expected [112, 16]"]


def _wrong_dtype(d):
    import torch

    name = "model.layers.2.post_attention_layernorm.weight"
    _rewrite(d, name, lambda t: t.update({name: t[name].to(torch.int32)}))
    return [name, "I32"]


def _fp8_without_scale(d):
    import torch

    name = "model.layers.2.self_attn.o_proj.weight"
    _rewrite(d, name, lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    return [name, "without its scale", name + "_scale_inv"]


def _unknown_model_type(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    return ["config.json", "unsupported model_type 'llama'"]


def _bad_config_json(d):
    (d / "config.json").write_text("{not json")
    return ["config.json", "not valid JSON"]


def _truncated(d):
    shard = _index(d)["weight_map"]["model.embed_tokens.weight"]
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[:-100])
    return [shard, "truncated"]


def _corrupt_header(d):
    shard = _index(d)["weight_map"]["lm_head.weight"]
    data = bytearray((d / shard).read_bytes())
    data[8:24] = b"\xff" * 16
    (d / shard).write_bytes(bytes(data))
    return [shard, "corrupt safetensors header"]


def _index_names_missing_shard(d):
    shard = _index(d)["weight_map"]["model.layers.1.mlp.gate.weight"]
    (d / shard).unlink()
    return [st.INDEX_NAME, shard, "does not exist"]


def _pickle_only(d):
    for p in d.glob("*.safetensors*"):
        p.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return ["pytorch_model.bin", "never loaded"]


CASES = [
    _missing,
    _extra,
    _extra_not_in_index,
    _wrong_shape,
    _wrong_dtype,
    _fp8_without_scale,
    _unknown_model_type,
    _bad_config_json,
    _truncated,
    _corrupt_header,
    _index_names_missing_shard,
    _pickle_only,
]


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
def test_from_hf_rejects(case, exported, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(exported(GOOD).hf_dir, hf)
    needles = case(hf)
    capsys.readouterr()
    assert convert_cli.main(["from-hf", f"--hf-dir={hf}", f"--out={tmp_path / 'out'}"]) == 2
    _one_error_line(capsys, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written, no temp left


def test_process_exit_status(exported, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(exported(GOOD).hf_dir, hf)
    needles = _truncated(hf)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseek_jax.convert",
            "from-hf",
            f"--hf-dir={hf}",
            f"--out={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and all(n in proc.stderr for n in needles), proc.stderr


def test_to_hf_rejects_bad_checkpoints(exported, tmp_path, capsys):
    e = exported(GOOD)
    out = f"--out={tmp_path / 'out'}"
    assert convert_cli.main(["to-hf", f"--checkpoint={tmp_path / 'nowhere'}", out]) == 2
    _one_error_line(capsys, "nowhere", "neither a checkpoint step directory")
    (tmp_path / "work" / "checkpoints").mkdir(parents=True)
    assert convert_cli.main(["to-hf", f"--checkpoint={tmp_path / 'work'}", out]) == 2
    _one_error_line(capsys, "no complete checkpoint steps")
    shutil.copytree(e.step_dir, tmp_path / "work" / "checkpoints" / "7")
    assert convert_cli.main(["to-hf", f"--checkpoint={tmp_path / 'work'}", "--step=3", out]) == 2
    _one_error_line(capsys, "no step 3 (have [7])")
    assert convert_cli.main(["to-hf", f"--checkpoint={e.step_dir}", "--step=3", out]) == 2
    _one_error_line(capsys, "--step only applies to a workdir")
    assert convert_cli.main(["to-hf", f"--checkpoint={e.step_dir}", "--shard-size=lots", out]) == 2
    _one_error_line(capsys, "--shard-size")
    assert not (tmp_path / "out").exists()


def test_from_hf_overwrite_semantics(exported, tmp_path, capsys):
    good = exported(GOOD).hf_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    args = ["from-hf", f"--hf-dir={good}", f"--out={out}"]
    assert convert_cli.main(args) == 2
    _one_error_line(capsys, str(out), "already exists", "--overwrite")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    _missing(bad)
    assert convert_cli.main(["from-hf", f"--hf-dir={bad}", f"--out={out}", "--overwrite"]) == 2
    assert (out / "marker").read_text() == "old"  # a failed run leaves the old output alone
    assert convert_cli.main(args + ["--overwrite"]) == 0
    assert not (out / "marker").exists() and ckpt_io.is_step_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "out"]


def test_to_hf_and_score_overwrite(exported, tmp_path, capsys):
    e = exported(GOOD)
    out = tmp_path / "hf"
    args = ["to-hf", f"--checkpoint={e.step_dir}", f"--out={out}", "--dtype=float32"]
    assert convert_cli.main(args) == 0
    before = (out / "config.json").stat().st_mtime_ns
    assert convert_cli.main(args) == 2
    _one_error_line(capsys, "already exists")
    assert (out / "config.json").stat().st_mtime_ns == before
    assert convert_cli.main(args + ["--overwrite"]) == 0
    assert (out / "config.json").stat().st_mtime_ns != before
    np.save(tmp_path / "tokens.npy", e.tokens)
    (tmp_path / "logits.npy").write_text("keep")
    assert (
        score_cli.main(
            [
                f"--checkpoint={e.step_dir}",
                f"--tokens={tmp_path / 'tokens.npy'}",
                f"--out={tmp_path / 'logits.npy'}",
            ]
        )
        == 2
    )
    _one_error_line(capsys, "logits.npy", "already exists")
    assert (tmp_path / "logits.npy").read_text() == "keep"


@pytest.mark.parametrize(
    "tokens,needle",
    [
        (np.zeros((2, 5), np.float32), "integer array"),
        (np.zeros((10,), np.int32), "integer array [batch, time]"),
        (np.full((1, 4), 10_000, np.int64), "outside the vocabulary [0, 128)"),
    ],
)
def test_score_rejects_bad_tokens(tokens, needle, exported, tmp_path, capsys):
    np.save(tmp_path / "tokens.npy", tokens)
    assert (
        score_cli.main(
            [
                f"--checkpoint={exported(GOOD).step_dir}",
                f"--tokens={tmp_path / 'tokens.npy'}",
                f"--out={tmp_path / 'logits.npy'}",
            ]
        )
        == 2
    )
    _one_error_line(capsys, "tokens.npy", needle)
    assert not (tmp_path / "logits.npy").exists()
