"""Export: transformers loads it cleanly and computes our logits; config.json; round trip; bf16."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.convert import __main__ as convert_cli
from deepseek_jax.convert import ckpt_io
from deepseek_jax.convert import safetensors_io as st
from tests.convert import helpers

NAMES = sorted(helpers.CONFIGS)


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_export_with_matching_logits(name, exported, tmp_path):
    e = exported(name)
    out = tmp_path / "hf_no_mtp"
    assert (
        convert_cli.main(
            ["to-hf", f"--checkpoint={e.step_dir}", f"--out={out}", "--dtype=float32", "--no-mtp"]
        )
        == 0
    )
    model, info = helpers.hf_from_pretrained(out)
    assert {k: list(v) for k, v in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    want_cls = "DeepseekV3ForCausalLM" if name.startswith("v3") else "DeepseekV2ForCausalLM"
    assert type(model).__name__ == want_cls
    if e.cfg.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    theirs = helpers.torch_logits(model, e.tokens).logits.numpy()
    diff = np.abs(theirs - e.logits).max()
    print(
        f"{name}: max|transformers(export) - ours| = {diff:.2e} "
        f"(max|logit| {np.abs(e.logits).max():.2f})"
    )
    assert diff < 1e-4


def test_mtp_export_loads_with_only_mtp_keys_unexpected(exported):
    """DeepseekV3ForCausalLM has no MTP parameters: the MTP layer (official layout, index
    num_hidden_layers) is all it reports, nothing is missing, and the logits are unchanged."""
    e = exported("v3_qlora_groups_yarn")
    model, info = helpers.hf_from_pretrained(e.hf_dir)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    prefix = f"model.layers.{e.cfg.n_layers}."
    assert info["unexpected_keys"] and all(k.startswith(prefix) for k in info["unexpected_keys"])
    theirs = helpers.torch_logits(model, e.tokens).logits.numpy()
    assert np.abs(theirs - e.logits).max() < 1e-4


def test_config_json(exported):
    e = exported("v3_qlora_groups_yarn")
    d = json.loads((e.hf_dir / "config.json").read_text())
    assert d["model_type"] == "deepseek_v3" and d["architectures"] == ["DeepseekV3ForCausalLM"]
    # legacy keys for transformers 4.x / vLLM / SGLang, and what transformers 5 writes
    assert d["rope_theta"] == 10000.0 and d["rope_scaling"]["type"] == "yarn"
    assert d["rope_scaling"]["factor"] == 40.0 and d["rope_parameters"]["rope_type"] == "yarn"
    assert d["rope_interleave"] is True
    assert d["num_nextn_predict_layers"] == 1 and d["torch_dtype"] == "float32"
    v2 = json.loads((exported("v2_softmax_greedy").hf_dir / "config.json").read_text())
    assert v2["model_type"] == "deepseek_v2" and v2["scoring_func"] == "softmax"


def test_mtp_official_layout(exported):
    e = exported("v3_direct_q_two_dense")  # depth 2: layers 4 and 5
    names = set(st.HFDirectory(e.hf_dir).where)
    for k in range(2):
        pre = f"model.layers.{e.cfg.n_layers + k}."
        for suffix in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "embed_tokens.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "self_attn.q_proj.weight",
            "mlp.experts.3.down_proj.weight",
            "mlp.gate.e_score_correction_bias",
            "mlp.shared_experts.up_proj.weight",
        ):
            assert pre + suffix in names
    files = st.HFDirectory(e.hf_dir)
    pre = f"model.layers.{e.cfg.n_layers}."
    assert np.array_equal(
        files.read(pre + "embed_tokens.weight"), files.read("model.embed_tokens.weight")
    )
    assert np.array_equal(files.read(pre + "shared_head.head.weight"), files.read("lm_head.weight"))


def test_sharding_and_index(exported):
    e = exported("v3_qlora_groups_yarn")  # exported with --shard-size=40KB
    index = json.loads((e.hf_dir / st.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sizes = [(e.hf_dir / s).stat().st_size for s in shards]
    biggest = max(
        st.DTYPES[i.dtype].itemsize * int(np.prod(i.shape))
        for i in (st.HFDirectory(e.hf_dir).info(n) for n in index["weight_map"])
    )
    assert all(size <= max(40_000, biggest) + 16_384 for size in sizes)  # + header
    assert index["metadata"]["total_size"] == sum(
        st.HFDirectory(e.hf_dir).info(n).nbytes for n in index["weight_map"]
    )


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_exact(name, exported, tmp_path):
    """ours -> HF (float32) -> ours reproduces every parameter and bias bit for bit, MTP too."""
    e = exported(name)
    assert convert_cli.main(["from-hf", f"--hf-dir={e.hf_dir}", f"--out={tmp_path / 'back'}"]) == 0
    reader = ckpt_io.StateReader(tmp_path / "back")
    assert ckpt_io.model_config(tmp_path / "back") == e.cfg
    count = 0
    for collection, leaves in e.state.items():
        assert set(reader.leaves[collection]) == set(leaves)
        for path, want in leaves.items():
            got = reader.read(collection, path)
            assert got.dtype == want.dtype and got.shape == want.shape, path
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), path
            count += 1
    print(f"{name}: {count} leaves bit-exact after JAX -> HF -> JAX")


def test_bfloat16_export(exported, tmp_path):
    e = exported("v3_qlora_groups_yarn")
    out = tmp_path / "bf16"
    assert convert_cli.main(["to-hf", f"--checkpoint={e.step_dir}", f"--out={out}"]) == 0
    files, f32 = st.HFDirectory(out), st.HFDirectory(e.hf_dir)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name in files.where:
        got = files.read(name)
        if name.endswith("e_score_correction_bias"):  # routing-critical: kept float32
            assert got.dtype == np.float32 and np.array_equal(got, f32.read(name))
        else:
            assert got.dtype == ml_dtypes.bfloat16
            want = f32.read(name).astype(ml_dtypes.bfloat16)  # round to nearest even
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), name
