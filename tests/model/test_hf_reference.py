"""Our forward pass against transformers' DeepseekV3/V2 (CPU, float32, eager attention)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.convert import hf_config, mapping
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import layers, transformer, tree
from tests import hf_reference

YARN = config_lib.RopeConfig(
    scaling=config_lib.RopeScaling.YARN,
    factor=40.0,
    original_max_position=4096,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)

CASES = {
    # q low-rank path, groups limited (2 of 4), YaRN, one dense layer
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
        mtp_depth=0,
    ),
    # direct q projection, plain RoPE, two dense layers, no group limit
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
        mtp_depth=0,
    ),
    # V2-Lite style: softmax scores, greedy top-k, no bias, no normalisation, YaRN mscale 0.707
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
}


def load_ours(cfg, tensors):
    model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, biases = nnx.split(model, nnx.Param, layers.ExpertBias)
    shapes = {
        path: (a.shape, np.float32)
        for state in (params, biases)
        for path, a in tree.arrays(state).items()
    }
    arrays = mapping.import_tensors(cfg, shapes, tensors.__getitem__, with_mtp=False)

    def fill(state):
        return tree.with_arrays(state, lambda path, _: jnp.asarray(arrays[path]))

    return graphdef, fill(params), fill(biases)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(name, tmp_path):
    cfg = CASES[name]
    hf_model = hf_reference.build_hf_model(cfg, seed=1)
    tokens = (np.arange(2 * 12).reshape(2, 12) * 37 + 11) % cfg.vocab_size
    want = hf_reference.hf_logits(hf_model, tokens)
    hf_reference.save(hf_model, tmp_path)
    tensors = hf_reference.read_safetensors_dir(tmp_path)
    graphdef, params, biases = load_ours(cfg, tensors)
    if cfg.topk_method is config_lib.TopkMethod.NOAUX_TC:
        assert np.abs(np.asarray(jax.tree.leaves(biases)[0])).max() > 0.01  # bias really used
    got = nnx.merge(graphdef, params, biases)(jnp.asarray(tokens), with_mtp=False).logits_BSY
    diff = np.abs(np.asarray(got) - want).max()
    print(f"{name}: max|ours - transformers| = {diff:.2e} (max|logit| {np.abs(want).max():.2f})")
    assert diff < 1e-4


def test_hf_config_round_trip():
    for cfg in CASES.values():
        assert hf_config.from_hf_config(hf_config.to_hf_config(cfg)) == cfg
