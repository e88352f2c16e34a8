"""Shared pieces of the conversion tests: configs, random states, our forward, HF loading."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from deepseek_jax.convert import ckpt_io, mapping
from deepseek_jax.model import config as config_lib

YARN = config_lib.RopeConfig(
    scaling=config_lib.RopeScaling.YARN,
    factor=40.0,
    original_max_position=4096,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)

CONFIGS = {
    # q low-rank path; 4 groups of which 2 are kept, non-zero bias; YaRN; one dense layer; MTP 1
    "v3_qlora_groups_yarn": config_lib.ModelConfig(
        vocab_size=128,
        d_model=48,
        n_layers=3,
        first_k_dense_replace=1,
        intermediate_size=96,
        n_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        rope=YARN,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=16,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        mtp_depth=1,
    ),
    # direct q projection, plain RoPE, two dense layers, no group limit; MTP depth 2
    "v3_direct_q_two_dense": config_lib.ModelConfig(
        vocab_size=96,
        d_model=32,
        n_layers=4,
        first_k_dense_replace=2,
        intermediate_size=64,
        n_heads=2,
        q_lora_rank=None,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=2,
        moe_intermediate_size=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        mtp_depth=2,
    ),
    # V2-Lite style (exports as deepseek_v2): softmax, greedy, no bias, YaRN mscale 0.707
    "v2_softmax_greedy": config_lib.ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        first_k_dense_replace=1,
        intermediate_size=48,
        n_heads=2,
        q_lora_rank=None,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        rope=dataclasses.replace(YARN, mscale=0.707, mscale_all_dim=0.707),
        n_routed_experts=6,
        n_shared_experts=2,
        moe_intermediate_size=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        score_func=config_lib.ScoreFunc.SOFTMAX,
        topk_method=config_lib.TopkMethod.GREEDY,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        mtp_depth=0,
    ),
    # tied embedding/head (no lm_head tensor; the MTP head copy is the embedding); MTP 1
    "v3_tied_embeddings": config_lib.ModelConfig(
        vocab_size=80,
        d_model=32,
        n_layers=2,
        first_k_dense_replace=1,
        intermediate_size=64,
        n_heads=2,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        tie_embeddings=True,
        mtp_depth=1,
    ),
}

State = dict[str, dict[mapping.Path, np.ndarray]]


def tokens_for(cfg: config_lib.ModelConfig, batch: int = 2, seq: int = 12) -> np.ndarray:
    return ((np.arange(batch * seq).reshape(batch, seq) * 37 + 11) % cfg.vocab_size).astype(
        np.int32
    )


def random_state(cfg: config_lib.ModelConfig, seed: int = 0) -> State:
    """Weights drawn like tests/hf_reference.py, per HF tensor: norms 1 +- 0.1, matrices
    N(0, 1/fan_in), correction bias 0.1 N(0, 1) (big enough to change routing)."""
    rng = np.random.default_rng(seed)
    leaves = mapping.model_leaves(cfg)
    state = {c: {p: np.zeros(s, d) for p, (s, d) in ls.items()} for c, ls in leaves.items()}
    for (collection, path), by_index in mapping.leaf_slots(
        mapping.tensor_specs(cfg), leaves
    ).items():
        target = state[collection][path]
        for index, spec in by_index.items():
            shape = spec.hf_shape
            if spec.bias:
                hf = 0.1 * rng.standard_normal(shape)
            elif len(shape) == 1:
                hf = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                hf = rng.standard_normal(shape) / np.sqrt(shape[-1])
            target[index] = spec.from_hf(hf.astype(np.float32), target.shape[len(index) :])
    return state


def save_state(step_dir: pathlib.Path, cfg: config_lib.ModelConfig, state: State) -> None:
    ckpt_io.write_step(
        step_dir,
        {"model": cfg.to_dict()},
        ckpt_io.nest(state["params"]),
        ckpt_io.nest(state["expert_bias"]),
    )


def our_outputs(cfg: config_lib.ModelConfig, state: State, tokens: np.ndarray):
    """(logits [B,S,Y], mtp logits [D,B,S,Y] or None) of our model, float32."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from deepseek_jax.model import layers, transformer, tree

    model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, biases = nnx.split(model, nnx.Param, layers.ExpertBias)
    params = tree.with_arrays(params, lambda p, _: jnp.asarray(state["params"][p]))
    biases = tree.with_arrays(biases, lambda p, _: jnp.asarray(state["expert_bias"][p]))
    out = jax.jit(lambda p, b, t: nnx.merge(graphdef, p, b)(t))(params, biases, jnp.asarray(tokens))
    mtp = None if out.mtp_logits_JBSY is None else np.asarray(out.mtp_logits_JBSY)
    return np.asarray(out.logits_BSY), mtp


def hf_from_pretrained(path: pathlib.Path, model_cls=None):
    """(model, loading info) in float32 with eager attention (the reference numerics)."""
    import torch
    import transformers

    cls = model_cls or transformers.AutoModelForCausalLM
    model, info = cls.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    return model, info


def torch_logits(model, tokens: np.ndarray, **kwargs):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long), **kwargs)
