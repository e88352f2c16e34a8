"""The exported MTP layer, computed from the HF tensors alone, reproduces our MTP logits.

Reference (hf_checkpoint_format.md §3, as vLLM/SGLang/transformers run the released weights):
    x_i = eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)])     embedding first
    logits = shared_head.head(shared_head.norm(Block(x)))
with h_i the main model's hidden state after its final norm. enorm/hnorm/eh_proj are written out in
torch here; the block, its norm and head run as a one-layer transformers model loaded from the
exported layer-(num_hidden_layers) tensors, renamed to layer 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepseek_jax.convert import safetensors_io as st
from tests.convert import helpers


def _rms(x, w, eps):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mtp_reference(e, tmp_path, *, embedding_first: bool = True) -> np.ndarray:
    import torch
    from safetensors.numpy import save_file

    files = st.HFDirectory(e.hf_dir)
    pre = f"model.layers.{e.cfg.n_layers}."

    def t(name):
        return torch.from_numpy(np.array(files.read(pre + name)))

    main, _ = helpers.hf_from_pretrained(e.hf_dir)
    ids = torch.as_tensor(e.tokens, dtype=torch.long)
    with torch.no_grad():
        h = main.model(ids).last_hidden_state[:, :-1]  # post-final-norm, positions 0..S-2
        emb = t("embed_tokens.weight")[ids[:, 1:]]  # Emb(t_{i+1}), from the exported copy
        parts = [
            _rms(emb, t("enorm.weight"), e.cfg.norm_eps),
            _rms(h, t("hnorm.weight"), e.cfg.norm_eps),
        ]
        if not embedding_first:
            parts = parts[::-1]
        x = torch.cat(parts, dim=-1) @ t("eh_proj.weight").T

    block_dir = tmp_path / ("block" if embedding_first else "block_reversed")
    if not block_dir.exists():
        block_dir.mkdir()
        rename = {
            "embed_tokens.weight": "model.embed_tokens.weight",
            "shared_head.norm.weight": "model.norm.weight",
            "shared_head.head.weight": "lm_head.weight",
        }
        skip = {"enorm.weight", "hnorm.weight", "eh_proj.weight"}
        tensors = {}
        for name in files.where:
            if name.startswith(pre) and name[len(pre) :] not in skip:
                rest = name[len(pre) :]
                tensors[rename.get(rest, f"model.layers.0.{rest}")] = np.array(files.read(name))
        save_file(tensors, block_dir / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((e.hf_dir / "config.json").read_text())
        cfg.update(
            num_hidden_layers=1,
            num_nextn_predict_layers=0,
            first_k_dense_replace=0 if e.cfg.mtp_is_moe else 1,
        )
        (block_dir / "config.json").write_text(json.dumps(cfg))
    block, info = helpers.hf_from_pretrained(block_dir)
    assert not any(info.values()), info
    with torch.no_grad():
        return block(inputs_embeds=x).logits.numpy()


@pytest.mark.parametrize("name", ["v3_qlora_groups_yarn", "v3_direct_q_two_dense"])
def test_mtp_depth1_matches_reference(name, exported, tmp_path):
    e = exported(name)
    ours = e.mtp_logits[0][:, :-1]  # the last position has no t_{i+1}
    want = mtp_reference(e, tmp_path)
    diff = np.abs(ours - want).max()
    print(
        f"{name}: MTP depth 1, max|reference(HF tensors) - ours| = {diff:.2e} "
        f"(max|logit| {np.abs(want).max():.2f})"
    )
    assert diff < 1e-4
    # The check can fail: the paper's printed order [h ; emb] gives clearly different logits.
    reversed_diff = np.abs(ours - mtp_reference(e, tmp_path, embedding_first=False)).max()
    print(f"{name}: with [hnorm(h) ; enorm(emb)] instead: {reversed_diff:.2f}")
    assert reversed_diff > 0.05
