"""`convert verify`: an export's logits under transformers equal our checkpoint's (≤ 1e-4), a
corrupted export is reported as a mismatch (exit 1), and bad paths name the flag."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deepseek_jax.convert import __main__ as convert_cli
from deepseek_jax.convert import verify
from deepseek_jax.convert.errors import ConversionError

NAME = "v3_direct_q_two_dense"


def test_an_export_matches_and_a_corrupted_one_does_not(exported, tmp_path, capsys):
    e = exported(NAME)
    argv = ["verify", f"--checkpoint={e.step_dir}", f"--hf-dir={e.hf_dir}", "--seq-len=12"]
    assert convert_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "export dtype float32" in out, out

    bad = tmp_path / "hf"
    shutil.copytree(e.hf_dir, bad)
    shard = next(bad.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in sorted(tensors) if n.endswith("o_proj.weight"))
    tensors[name] = tensors[name] * np.float32(1.01)  # 1%: a plausible mapping slip
    save_file(tensors, shard, metadata={"format": "pt"})
    r = verify.verify(e.step_dir, bad, seq_len=12)
    assert not r.ok and r.max_abs_diff > 10 * r.atol, r
    assert convert_cli.main([*argv[:2], f"--hf-dir={bad}", "--seq-len=12"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.parametrize(
    "which, message",
    [
        ("checkpoint_is_hf", "is a Hugging Face directory"),
        ("hf_dir_is_ours", "has no config.json"),
    ],
)
def test_swapped_paths_name_the_flag(exported, which, message):
    e = exported(NAME)
    ckpt, hf = (e.hf_dir, e.hf_dir) if which == "checkpoint_is_hf" else (e.step_dir, e.step_dir)
    with pytest.raises(ConversionError, match=message):
        verify.verify(ckpt, hf)
