"""Name and layout mapping between our parameter tree and Hugging Face DeepseekV3 tensors.

One table, `tensor_specs(cfg)`, lists every HF tensor: its name, HF shape, where it lives in our
state (path + leading indices into stacked arrays) and how to transform it. Linear kernels are
stored [in..., out...] here and [out, in] (flattened) in torch; RoPE rows need no permutation
because both sides use the official interleaved pair layout. MTP depth k sits at HF layer index
n_layers + k with copies of the shared embedding and head (official layout). `leaf_slots` inverts
the table per stored array, which is how both conversion directions stream slice by slice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from deepseek_jax.model import config as config_lib

Path = tuple[str, ...]
_NOT_QUANTIZED = ("mlp.gate.weight", "eh_proj.weight", "lm_head.weight", "shared_head.head.weight")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    hf_shape: tuple[int, ...]
    path: Path  # flat path of the variable in our state
    index: tuple[int, ...]  # leading indices into our (stacked) array
    in_rank: int | None  # linear kernel: number of input dims in our layout; None: same layout
    bias: bool = False  # lives in the ExpertBias collection, not in params
    copy_of: str | None = None  # an HF duplicate of another tensor (MTP embed/head copies)

    @property
    def collection(self) -> str:
        """The checkpoint collection holding it: the correction bias is not a gradient param."""
        return "expert_bias" if self.bias else "params"

    @property
    def fp8_quantized(self) -> bool:
        """Whether the official FP8 checkpoints store it as e4m3 + scales (reference §4): every
        linear weight except the router, eh_proj and the output heads."""
        return (
            self.in_rank is not None
            and self.copy_of is None
            and not self.hf_name.endswith(_NOT_QUANTIZED)
        )

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.in_rank is None:
            return ours.reshape(self.hf_shape)
        n_in = math.prod(ours.shape[: self.in_rank])
        return ours.reshape(n_in, -1).T

    def from_hf(self, theirs: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
        if self.in_rank is None:
            return theirs.reshape(our_shape)
        return theirs.T.reshape(our_shape)


def _block_specs(
    cfg: config_lib.ModelConfig, hf_prefix: str, path: Path, index: tuple[int, ...], moe: bool
) -> list[TensorSpec]:
    D, H = cfg.d_model, cfg.n_heads
    N, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    out: list[TensorSpec] = []

    def add(
        hf: str,
        shape,
        sub: Path,
        in_rank: int | None,
        extra: tuple[int, ...] = (),
        bias: bool = False,
    ):
        out.append(
            TensorSpec(f"{hf_prefix}.{hf}", tuple(shape), path + sub, index + extra, in_rank, bias)
        )

    add("input_layernorm.weight", (D,), ("attn_norm", "weight"), None)
    if cfg.q_lora_rank is None:
        add("self_attn.q_proj.weight", (H * (N + R), D), ("attn", "wq", "kernel"), 1)
    else:
        Q = cfg.q_lora_rank
        add("self_attn.q_a_proj.weight", (Q, D), ("attn", "wq_a", "kernel"), 1)
        add("self_attn.q_a_layernorm.weight", (Q,), ("attn", "q_norm", "weight"), None)
        add("self_attn.q_b_proj.weight", (H * (N + R), Q), ("attn", "wq_b", "kernel"), 1)
    add("self_attn.kv_a_proj_with_mqa.weight", (C + R, D), ("attn", "wkv_a", "kernel"), 1)
    add("self_attn.kv_a_layernorm.weight", (C,), ("attn", "kv_norm", "weight"), None)
    add("self_attn.kv_b_proj.weight", (H * (N + V), C), ("attn", "wkv_b", "kernel"), 1)
    add("self_attn.o_proj.weight", (D, H * V), ("attn", "wo", "kernel"), 2)
    add("post_attention_layernorm.weight", (D,), ("ffn_norm", "weight"), None)
    if not moe:
        F = cfg.intermediate_size
        add("mlp.gate_proj.weight", (F, D), ("ffn", "w1", "kernel"), 1)
        add("mlp.up_proj.weight", (F, D), ("ffn", "w3", "kernel"), 1)
        add("mlp.down_proj.weight", (D, F), ("ffn", "w2", "kernel"), 1)
        return out
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    add("mlp.gate.weight", (E, D), ("ffn", "gate", "kernel"), 1)
    if cfg.topk_method is config_lib.TopkMethod.NOAUX_TC:
        add("mlp.gate.e_score_correction_bias", (E,), ("ffn", "gate", "bias"), None, bias=True)
    for e in range(E):
        add(f"mlp.experts.{e}.gate_proj.weight", (F, D), ("ffn", "w1"), 1, (e,))
        add(f"mlp.experts.{e}.up_proj.weight", (F, D), ("ffn", "w3"), 1, (e,))
        add(f"mlp.experts.{e}.down_proj.weight", (D, F), ("ffn", "w2"), 1, (e,))
    if cfg.n_shared_experts:
        Fs = cfg.n_shared_experts * F
        add("mlp.shared_experts.gate_proj.weight", (Fs, D), ("ffn", "shared", "w1", "kernel"), 1)
        add("mlp.shared_experts.up_proj.weight", (Fs, D), ("ffn", "shared", "w3", "kernel"), 1)
        add("mlp.shared_experts.down_proj.weight", (D, Fs), ("ffn", "shared", "w2", "kernel"), 1)
    return out


def tensor_specs(cfg: config_lib.ModelConfig, *, with_mtp: bool = True) -> list[TensorSpec]:
    """Every HF tensor of the model, in a deterministic order."""
    D, Y = cfg.d_model, cfg.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", (Y, D), ("embed", "embedding"), (), None)]
    for layer in range(cfg.n_layers):
        moe = layer >= cfg.n_dense_layers
        stack = ("moe_layers",) if moe else ("dense_layers",)
        i = layer - cfg.n_dense_layers if moe else layer
        specs += _block_specs(cfg, f"model.layers.{layer}", stack, (i,), moe)
    specs.append(TensorSpec("model.norm.weight", (D,), ("norm", "weight"), (), None))
    head = ("embed", "embedding") if cfg.tie_embeddings else ("head", "kernel")
    head_in_rank = None if cfg.tie_embeddings else 1
    if not cfg.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (Y, D), head, (), head_in_rank))
    if not with_mtp:
        return specs
    for k in range(cfg.mtp_depth):
        pre = f"model.layers.{cfg.n_layers + k}"
        mtp = ("mtp", "layers")
        specs += [
            TensorSpec(f"{pre}.enorm.weight", (D,), mtp + ("enorm", "weight"), (k,), None),
            TensorSpec(f"{pre}.hnorm.weight", (D,), mtp + ("hnorm", "weight"), (k,), None),
            TensorSpec(f"{pre}.eh_proj.weight", (D, 2 * D), mtp + ("eh_proj", "kernel"), (k,), 1),
            TensorSpec(
                f"{pre}.shared_head.norm.weight", (D,), mtp + ("head_norm", "weight"), (k,), None
            ),
            TensorSpec(
                f"{pre}.embed_tokens.weight",
                (Y, D),
                ("embed", "embedding"),
                (),
                None,
                copy_of="model.embed_tokens.weight",
            ),
            TensorSpec(
                f"{pre}.shared_head.head.weight",
                (Y, D),
                head,
                (),
                head_in_rank,
                copy_of="lm_head.weight" if not cfg.tie_embeddings else "model.embed_tokens.weight",
            ),
        ]
        specs += _block_specs(cfg, pre, mtp + ("block",), (k,), cfg.mtp_is_moe)
    return specs


def export_tensors(
    cfg: config_lib.ModelConfig, arrays: Mapping[Path, Any], *, with_mtp: bool = True
) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, numpy array) for every tensor, from flat {path: array} of params and biases."""
    for spec in tensor_specs(cfg, with_mtp=with_mtp):
        ours = (
            np.asarray(arrays[spec.path])[spec.index]
            if spec.index
            else np.asarray(arrays[spec.path])
        )
        theirs = spec.to_hf(ours)
        if theirs.shape != spec.hf_shape:
            raise AssertionError(f"{spec.hf_name}: produced {theirs.shape}, want {spec.hf_shape}")
        yield spec.hf_name, theirs


def import_tensors(
    cfg: config_lib.ModelConfig,
    shapes: Mapping[Path, tuple[tuple[int, ...], Any]],
    read: Callable[[str], np.ndarray],
    *,
    with_mtp: bool = True,
) -> dict[Path, np.ndarray]:
    """Fills {path: numpy array} for our state from `read(hf_name)`; copies are not read."""
    out = {path: np.zeros(shape, dtype) for path, (shape, dtype) in shapes.items()}
    for spec in tensor_specs(cfg, with_mtp=with_mtp):
        if spec.copy_of is not None:
            continue
        theirs = read(spec.hf_name)
        if tuple(theirs.shape) != spec.hf_shape:
            raise ValueError(
                f"tensor {spec.hf_name}: shape {tuple(theirs.shape)}, expected {spec.hf_shape}"
            )
        target = out[spec.path]
        slot_shape = target.shape[len(spec.index) :]
        target[spec.index] = spec.from_hf(np.asarray(theirs), slot_shape)
    return out


Leaves = dict[str, dict[Path, tuple[tuple[int, ...], np.dtype]]]


def model_leaves(cfg: config_lib.ModelConfig) -> Leaves:
    """{collection: {path: (shape, dtype)}} of our state (params, expert_bias), not allocated."""
    from flax import nnx

    from deepseek_jax.model import layers, transformer, tree

    model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    _, params, biases = nnx.split(model, nnx.Param, layers.ExpertBias)
    return {
        name: {path: (tuple(a.shape), np.dtype(a.dtype)) for path, a in tree.arrays(st).items()}
        for name, st in (("params", params), ("expert_bias", biases))
    }


Slots = dict[tuple[str, Path], dict[tuple[int, ...], TensorSpec]]


def leaf_slots(specs: list[TensorSpec], leaves: Leaves, *, complete: bool = True) -> Slots:
    """For each leaf, the HF tensor behind each leading index, in order of first appearance.

    Copies (copy_of) are left out. Checks that every slot is filled exactly once; with
    complete=False, leaves no spec touches (MTP when exporting without it) may be absent.
    A failure here is a bug in this table, not bad input.
    """
    out: Slots = {}
    for spec in specs:
        if spec.copy_of is not None:
            continue
        key = (spec.collection, spec.path)
        if spec.path not in leaves[spec.collection]:
            raise AssertionError(f"{spec.hf_name}: no leaf {key} in our state")
        slots = out.setdefault(key, {})
        if spec.index in slots:
            raise AssertionError(
                f"{spec.hf_name} and {slots[spec.index].hf_name} both fill {key}{list(spec.index)}"
            )
        slots[spec.index] = spec
    for collection, paths in leaves.items():
        for path, (shape, _) in paths.items():
            key = (collection, path)
            if key not in out:
                if complete:
                    raise AssertionError(f"no HF tensor fills {key}")
                continue
            lead = len(next(iter(out[key])))
            want = set(np.ndindex(*shape[:lead]))
            if set(out[key]) != want:
                raise AssertionError(f"{key}: HF tensors fill {len(out[key])} of {len(want)} slots")
    return out
