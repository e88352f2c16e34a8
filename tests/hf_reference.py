"""Independent reference: a randomised Hugging Face DeepseekV3/V2 model built from our config.

Weights are drawn in torch (norms 1 +- 0.1, linears N(0, 1/fan_in), a non-zero correction bias so it
changes routing), saved with `save_pretrained` (per-expert tensor names, as on disk) and read back
by the code under test. Logits come from eager attention in float32.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from deepseek_jax.convert import hf_config
from deepseek_jax.model import config as config_lib


def build_hf_model(cfg: config_lib.ModelConfig, seed: int = 0, bias_std: float = 0.1):
    import torch
    import transformers

    d = hf_config.to_hf_config(cfg)
    d["num_nextn_predict_layers"] = 0  # DeepseekV3ForCausalLM has no MTP layers
    cls_cfg = (
        transformers.DeepseekV3Config
        if d["model_type"] == "deepseek_v3"
        else transformers.DeepseekV2Config
    )
    hf_cfg = cls_cfg(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model_cls = (
        transformers.DeepseekV3ForCausalLM
        if d["model_type"] == "deepseek_v3"
        else transformers.DeepseekV2ForCausalLM
    )
    model = model_cls._from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_std * torch.randn(b.shape, generator=gen))
    model.eval()
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def save(model, out_dir: pathlib.Path) -> pathlib.Path:
    model.save_pretrained(out_dir)
    return out_dir


def read_safetensors_dir(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def read_config(path: pathlib.Path) -> dict:
    return json.loads((path / "config.json").read_text())
