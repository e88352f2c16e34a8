"""Shared setup of the parallel tests: one tiny model with MoE and MTP, the presets' 8-device
meshes, a batch, and helpers to compare trees by relative error."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from deepseek_jax.batch import Batch
from deepseek_jax.model import config as model_config
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.train import config as train_config

Preset = parallel_config.Preset

# Dense layer, MoE layer and an MoE MTP depth. init_std 0.2 (33x V3's 0.006) keeps the router's
# scores apart, so float32 reduction-order noise (~1e-7) cannot flip a top-k choice; every test
# also checks that the expert loads (the routing decisions) are exactly equal.
CFG = model_config.ModelConfig(
    vocab_size=32,
    d_model=32,
    n_layers=2,
    first_k_dense_replace=1,
    intermediate_size=48,
    n_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=8,
    n_shared_experts=1,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    mtp_depth=1,
    init_std=0.2,
)
CFG64 = dataclasses.replace(
    CFG, param_dtype=model_config.DType.FLOAT64, compute_dtype=model_config.DType.FLOAT64
)
B, S = 8, 16

# Clipping off, so Adam's first moment after one step is exactly (1 - b1) * gradient; warmup off,
# so the first step moves the parameters.
TRAIN = train_config.TrainConfig(global_batch_size=B, seq_len=S, warmup_steps=0, grad_clip=1e9)

# Each preset on 8 devices, with every axis it uses larger than 1.
MESHES = {
    Preset.DATA: dict(data=8),
    Preset.FSDP: dict(fsdp=8),
    Preset.FSDP_TP: dict(fsdp=4, tensor=2),
    Preset.DATA_EXPERT: dict(data=2, expert=4),
    Preset.FSDP_EXPERT_TP: dict(fsdp=2, expert=2, tensor=2),
}
EP_PRESETS = (Preset.DATA_EXPERT, Preset.FSDP_EXPERT_TP)


def parallel(preset: Preset, **kw) -> parallel_config.ParallelConfig:
    return parallel_config.ParallelConfig(preset=preset, **{**MESHES[preset], **kw})


def batch(seed: int = 0, b: int = B, s: int = S, vocab: int = CFG.vocab_size) -> Batch:
    """Host (numpy) batch with some padding, so the loss normalisation is a global count."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, s + 1)).astype(np.int32)
    mask = np.ones((b, s), np.float32)
    mask[0, -5:] = 0.0
    mask[3, -2:] = 0.0
    return Batch(
        inputs=ids[:, :-1],
        targets=ids[:, 1:],
        loss_mask=mask,
        target_bytes=np.ones((b, s), np.int32),
    )


def segment_positions(seg_BS: np.ndarray) -> np.ndarray:
    """Each token's index within its segment (restarting at 0 where the segment id changes)."""
    B, S = seg_BS.shape
    starts = np.concatenate([np.ones((B, 1), bool), seg_BS[:, 1:] != seg_BS[:, :-1]], axis=1)
    idx = np.arange(S)[None, :]
    return (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)).astype(np.int32)


def packed_batch() -> Batch:
    """batch() with rows of two or three samples each (a different cut per row): segment ids and
    positions restarting at 0 per sample."""
    seg = np.ones((B, S), np.int32)
    for r in range(B):
        for cut in sorted({3 + r % 4, S // 2 + r % 3}):
            seg[r, cut:] += 1
    return dataclasses.replace(batch(), segment_ids=seg, positions=segment_positions(seg))


def rel_err(got, want) -> float:
    """max |got - want| / max |want| over one array (0 when both are all zero)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.max(np.abs(want)) if want.size else 0.0
    diff = np.max(np.abs(got - want)) if want.size else 0.0
    return float(diff / scale) if scale else float(diff)


def worst(got_tree, want_tree) -> tuple[float, str]:
    """(largest per-leaf rel_err, that leaf's path) over two trees of the same structure."""
    pairs = zip(
        jax.tree_util.tree_flatten_with_path(want_tree)[0], jax.tree.leaves(got_tree), strict=True
    )
    errs = [(rel_err(g, w), jax.tree_util.keystr(p)) for (p, w), g in pairs]
    return max(errs)
