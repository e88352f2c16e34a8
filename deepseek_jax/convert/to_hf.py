"""Our checkpoint -> a Hugging Face DeepseekV3 (or V2) directory that transformers loads as is.

Output: config.json (the legacy rope_theta/rope_scaling keys and transformers 5's rope_parameters),
`model-0000i-of-0000N.safetensors` shards of at most --shard-size and model.safetensors.index.json;
one tensor per expert, the official interleaved RoPE rows (no permutation: we use the same layout),
and MTP depth k at layer index num_hidden_layers + k with the embed_tokens / shared_head.head
copies, num_nextn_predict_layers set to match (0 with --no-mtp).

Tensors are written in leaf-major order (all slices of one stored array, then the next), so every
storage chunk of our checkpoint is read once and memory holds one chunk plus one tensor. The
index maps names to shards, so readers do not depend on the order. The expert-selection bias is
always written in float32, as in the official checkpoints: bf16 would move routing decisions.
"""

from __future__ import annotations

import enum
import json
import pathlib

import ml_dtypes
import numpy as np

from deepseek_jax.convert import ckpt_io, hf_config, mapping, outdir
from deepseek_jax.convert import safetensors_io as st


class ExportDType(enum.Enum):
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"

    @property
    def np(self) -> np.dtype:
        return np.dtype(ml_dtypes.bfloat16 if self is ExportDType.BFLOAT16 else np.float32)


def export_order(specs: list[mapping.TensorSpec], slots: mapping.Slots) -> list[mapping.TensorSpec]:
    """Leaf-major: each stored array's slices in index order, then the copies of whole leaves."""
    ordered = [spec for by_index in slots.values() for _, spec in sorted(by_index.items())]
    return ordered + [s for s in specs if s.copy_of is not None]


def convert(
    checkpoint: pathlib.Path,
    out: pathlib.Path,
    *,
    step: int | None = None,
    dtype: ExportDType = ExportDType.BFLOAT16,
    shard_size: int = 5 * 10**9,
    with_mtp: bool = True,
    overwrite: bool = False,
) -> list[str]:
    out = pathlib.Path(out)
    outdir.check_target(out, overwrite)
    step_dir = ckpt_io.resolve_step_dir(pathlib.Path(checkpoint), step)
    cfg = ckpt_io.model_config(step_dir)
    reader = ckpt_io.StateReader(step_dir)
    want = mapping.model_leaves(cfg)
    reader.check(want, allow_missing=() if with_mtp else ("mtp",))
    specs = mapping.tensor_specs(cfg, with_mtp=with_mtp)
    slots = mapping.leaf_slots(specs, want, complete=with_mtp)
    ordered = export_order(specs, slots)
    by_name = {s.hf_name: s for s in ordered}

    def out_dtype(spec: mapping.TensorSpec) -> np.dtype:
        return np.dtype(np.float32) if spec.bias else dtype.np

    planned = [st.Planned(s.hf_name, s.hf_shape, out_dtype(s)) for s in ordered]

    def produce(p: st.Planned) -> np.ndarray:
        spec = by_name[p.name]
        ours = reader.read(spec.collection, spec.path, spec.index)
        # float32 -> bf16 rounds to nearest even (ml_dtypes), as torch's .to(bfloat16) does.
        return spec.to_hf(ours).astype(p.dtype)

    hf = hf_config.to_hf_config(cfg, torch_dtype=dtype.value)
    hf["num_nextn_predict_layers"] = cfg.mtp_depth if with_mtp else 0
    with outdir.atomic_path(out, overwrite) as tmp:
        tmp.mkdir()
        names = st.write_sharded(tmp, planned, shard_size, produce)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return names
