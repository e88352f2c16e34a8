"""Parameter, FLOP and KV-cache accounting from abstract shapes (nothing is allocated).

Conventions (the ones Megatron, MaxText and DeepSeek's own figures use, deepseek_v3_facts.md §5.7):
- total_params: the main model, embedding and head included, MTP excluded (reported separately).
- active_params: parameters a token touches: everything except the routed experts it does not pick
  (top_k/E of each MoE layer's routed experts), input embedding included.
- matmul-active: active minus the input embedding lookup and 1-D (norm) weights; training FLOPs per
  token = 6 * matmul-active + 6 * causal attention (QK^T over qk_head_dim and PV over v_head_dim,
  S/2 keys on average), plus the MTP modules (their active matmuls, the shared head again, their
  attention) when mtp_depth > 0.
- KV cache per token: MLA caches (kv_lora_rank + rope dim) per layer; the MHA equivalent caches
  2 * heads * d_h per layer with d_h = v_head_dim (the paper's Table 1 convention).
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import transformer, tree


@dataclasses.dataclass(frozen=True)
class Counts:
    total_params: int
    active_params: int
    matmul_active_params: int
    embedding_params: int
    head_params: int
    mtp_params: int
    mtp_active_params: int
    kv_cache_bytes_per_token: int
    mha_kv_cache_bytes_per_token: int
    train_flops_per_token: float
    train_flops_per_token_no_mtp: float
    attention_flops_per_token: float
    seq_len: int


def _is_routed(path: tree.Path) -> bool:
    return len(path) >= 2 and path[-2] == "ffn" and path[-1] in ("w1", "w2", "w3")


def count(cfg: config_lib.ModelConfig, seq_len: int) -> Counts:
    model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    shapes = {path: tuple(a.shape) for path, a in tree.arrays(nnx.state(model, nnx.Param)).items()}
    size = {path: math.prod(s) for path, s in shapes.items()}
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0

    main = {p: n for p, n in size.items() if p[0] != "mtp"}
    mtp = {p: n for p, n in size.items() if p[0] == "mtp"}
    embedding = size[("embed", "embedding")]
    head = size[("head", "kernel")] if ("head", "kernel") in size else embedding

    def active(group: dict) -> float:
        return sum(n * frac if _is_routed(p) else n for p, n in group.items())

    def matmul_active(group: dict) -> float:
        return sum(
            n * frac if _is_routed(p) else n
            for p, n in group.items()
            if len(shapes[p]) - (1 if p[0] in ("dense_layers", "moe_layers", "mtp") else 0) > 1
            and p != ("embed", "embedding")
        )

    main_active = active(main)
    main_matmul = matmul_active(main)
    if cfg.tie_embeddings:
        main_matmul += embedding  # the tied head is a matmul against the embedding table
    attn_per_layer = (
        6
        * cfg.n_heads
        * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
        * seq_len
        / 2
    )
    attn = attn_per_layer * cfg.n_layers
    flops_main = 6 * main_matmul + attn
    flops_mtp = 0.0
    if cfg.mtp_depth:
        flops_mtp = 6 * (matmul_active(mtp) + cfg.mtp_depth * head) + attn_per_layer * cfg.mtp_depth

    nbytes = cfg.compute_dtype.jnp.itemsize
    return Counts(
        total_params=sum(main.values()),
        active_params=round(main_active),
        matmul_active_params=round(main_matmul),
        embedding_params=embedding,
        head_params=head,
        mtp_params=sum(mtp.values()),
        mtp_active_params=round(active(mtp)),
        kv_cache_bytes_per_token=(cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * nbytes,
        mha_kv_cache_bytes_per_token=2 * cfg.n_heads * cfg.v_head_dim * cfg.n_layers * nbytes,
        train_flops_per_token=flops_main + flops_mtp,
        train_flops_per_token_no_mtp=flops_main,
        attention_flops_per_token=attn,
        seq_len=seq_len,
    )
