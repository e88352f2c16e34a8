"""Official FP8 format: e4m3 weights with float32 128x128 block scales, partial edge blocks.

Quantisation and the reference dequantisation are written in torch here (independent of
deepseek_jax.convert.fp8), the checkpoint is written with safetensors.torch, and the import must
reproduce the reference float32 weights bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from deepseek_jax.convert import __main__ as convert_cli
from deepseek_jax.convert import ckpt_io, fp8, from_hf, hf_config, mapping
from deepseek_jax.convert import safetensors_io as st
from deepseek_jax.model import config as config_lib
from tests.convert import helpers

B = 128

# d_model 160 and q_lora 136: partial column/row blocks; kv_lora 568 + rope 8 = 576 rows, like the
# real kv_a_proj_with_mqa [576, 7168] whose scales are [5, 56].
CFG = config_lib.ModelConfig(
    vocab_size=64,
    d_model=160,
    n_layers=2,
    first_k_dense_replace=1,
    intermediate_size=200,
    n_heads=2,
    q_lora_rank=136,
    kv_lora_rank=568,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    n_shared_experts=1,
    moe_intermediate_size=136,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    mtp_depth=1,
)


def torch_quantize(w):
    import torch

    rows, cols = w.shape
    gr, gc = math.ceil(rows / B), math.ceil(cols / B)
    padded = torch.zeros(gr * B, gc * B, dtype=torch.float32)
    padded[:rows, :cols] = w
    blocks = padded.view(gr, B, gc, B)
    amax = blocks.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / s[:, None, :, None]).to(torch.float8_e4m3fn).view(gr * B, gc * B)
    return q[:rows, :cols].contiguous(), s


def torch_dequantize(q, s):
    rows, cols = q.shape
    return q.float() * s.repeat_interleave(B, 0)[:rows].repeat_interleave(B, 1)[:, :cols]


def test_dequantize_matches_torch_reference_with_partial_blocks():
    import torch

    w = torch.randn(576, 300, generator=torch.Generator().manual_seed(0)) * 0.02
    q, s = torch_quantize(w)
    assert tuple(s.shape) == (5, 3)
    ours = fp8.dequantize(q.view(torch.uint8).numpy().view(fp8.E4M3), s.numpy())
    want = torch_dequantize(q, s).numpy()
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), want.view(np.uint32))
    assert np.abs(ours - w.numpy()).max() > 0  # it is lossy, so equality above is meaningful
    q_ours, s_ours = fp8.quantize(w.numpy())
    assert np.array_equal(s_ours, s.numpy())
    assert np.array_equal(q_ours.view(np.uint8), q.view(torch.uint8).numpy())


def write_fp8_checkpoint(root, cfg, *, quantize=lambda spec: spec.fp8_quantized):
    """An FP8 checkpoint in two torch-written shards; returns {name: float32 reference} and the
    names stored as FP8."""
    import torch
    from safetensors.torch import save_file

    state = helpers.random_state(cfg, seed=7)
    flat = {p: a for leaves in state.values() for p, a in leaves.items()}
    specs = {s.hf_name: s for s in mapping.tensor_specs(cfg)}
    tensors, reference = {}, {}
    for name, hf in mapping.export_tensors(cfg, flat):
        spec = specs[name]
        w = torch.from_numpy(np.ascontiguousarray(hf))
        if quantize(spec):
            q, s = torch_quantize(w)
            tensors[name], tensors[fp8.scale_name(name)] = q, s
            reference[name] = torch_dequantize(q, s).numpy()
        elif spec.bias:  # fp32 in the official checkpoint
            tensors[name], reference[name] = w, hf
        else:  # embeddings, norms, router, eh_proj, heads: bf16
            tensors[name] = w.to(torch.bfloat16)
            reference[name] = tensors[name].float().numpy()
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    (root / "hf").mkdir()
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, root / "hf" / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}
    (root / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    config = hf_config.to_hf_config(cfg, torch_dtype="bfloat16")
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [B, B],
    }
    (root / "hf" / "config.json").write_text(json.dumps(config))
    return reference, {n for n in tensors if fp8.scale_name(n) in tensors}


def assert_imported_exactly(step_dir, cfg, reference, quantized) -> int:
    """Every leaf equals the reference bit for bit; returns the number of FP8 tensors."""
    reader = ckpt_io.StateReader(step_dir)
    leaves = mapping.model_leaves(cfg)
    n_fp8 = 0
    for (collection, path), by_index in mapping.leaf_slots(
        mapping.tensor_specs(cfg), leaves
    ).items():
        got = reader.read(collection, path)
        for index, spec in by_index.items():
            want = spec.from_hf(reference[spec.hf_name], got.shape[len(index) :])
            assert np.array_equal(got[index].view(np.uint32), want.view(np.uint32)), spec.hf_name
            n_fp8 += spec.hf_name in quantized
    return n_fp8


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    reference, quantized = write_fp8_checkpoint(root, CFG)
    tensors = st.HFDirectory(root / "hf")
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert tensors.info(kv_a).shape == (576, 160) and tensors.info(kv_a).dtype == "F8_E4M3"
    assert tensors.info(fp8.scale_name(kv_a)).shape == (5, 2)
    return root, reference, quantized


def test_fp8_import_matches_dequantised_reference_exactly(fp8_checkpoint):
    root, reference, quantized = fp8_checkpoint
    assert convert_cli.main(["from-hf", f"--hf-dir={root / 'hf'}", f"--out={root / 'step'}"]) == 0
    n_fp8 = assert_imported_exactly(root / "step", CFG, reference, quantized)
    assert n_fp8 > 40
    print(
        f"FP8: {n_fp8} quantised tensors (incl. [576, 160] with [5, 2] scales) imported "
        "bit-exact against the torch dequantisation"
    )


def test_row_blocked_import_of_embedding_and_head(tmp_path, monkeypatch):
    """Large unstacked leaves are read and written in 128-row blocks (the last one partial),
    FP8 included: the embedding and head are quantised here too, with 300 rows."""
    cfg = dataclasses.replace(CFG, vocab_size=300, mtp_depth=0)
    reference, quantized = write_fp8_checkpoint(
        tmp_path, cfg, quantize=lambda s: len(s.hf_shape) == 2
    )
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= quantized
    monkeypatch.setattr(from_hf, "ROW_BLOCK_BYTES", 1)
    leaves = from_hf.lazy_leaves(from_hf.open_source(tmp_path / "hf"))["params"]
    assert leaves[("embed", "embedding")].chunk == (128, 160)
    assert leaves[("head", "kernel")].chunk == (160, 128)
    assert (
        convert_cli.main(["from-hf", f"--hf-dir={tmp_path / 'hf'}", f"--out={tmp_path / 'step'}"])
        == 0
    )
    assert assert_imported_exactly(tmp_path / "step", cfg, reference, quantized) > 10
