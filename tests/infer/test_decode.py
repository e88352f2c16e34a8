"""Prefill + cached decode (absorbed, naive) against the full forward; k+1 verify; cache sizes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import config as exp_config
from deepseek_jax.infer import decode, experts, kv_cache
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import dispatch, rope, stack, transformer
from tests.infer import tiny

Mode = kv_cache.DecodeMode
YARN = config_lib.RopeConfig(
    scaling=config_lib.RopeScaling.YARN,
    factor=40.0,
    original_max_position=16,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)
BASE = tiny.config()
CASES = {
    "qlora_yarn": dataclasses.replace(BASE, rope=YARN),  # decode: the training dispatch
    # 16 experts: a 3-row decode step (6 expert rows) reads only the chosen experts' weights
    "direct_q_rope": dataclasses.replace(BASE, q_lora_rank=None, n_routed_experts=16),
}
LENGTHS = np.array([5, 9, 7])  # unequal prompt lengths in one batch
STEPS = 4  # decode steps after the prefill


def with_dtype(cfg, dtype):
    d = config_lib.DType(dtype)
    return dataclasses.replace(cfg, param_dtype=d, compute_dtype=d)


def sequences(cfg):
    B, T = len(LENGTHS), int(LENGTHS.max()) + STEPS
    return ((np.arange(B * T).reshape(B, T) * 29 + 7) % cfg.vocab_size).astype(np.int32)


@functools.cache
def built(name, dtype):
    cfg = with_dtype(CASES[name], dtype)
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    return cfg, graphdef, state


def jitted(graphdef):
    full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, with_mtp=False).logits_BSY)
    pre = jax.jit(lambda s, t, n, c: decode.prefill(nnx.merge(graphdef, s), t, n, c))

    @jax.jit
    def step(s, t, c):
        logits, _, c = decode.forward(nnx.merge(graphdef, s), t, c)
        return logits, c.with_length(c.length_B + t.shape[1])

    return full, pre, step


def run_cached(cfg, graphdef, state, mode, pre=None, step=None):
    """Prefill each row's prompt, then STEPS single-token steps: logits [B, STEPS+1, Y]."""
    _, pre_, step_ = jitted(graphdef)
    pre, step = pre or pre_, step or step_
    seq = sequences(cfg)
    B = len(LENGTHS)
    cache = kv_cache.init(cfg, B, seq.shape[1] + 1, mode, cfg.compute_dtype.jnp)
    prompts = np.where(
        np.arange(LENGTHS.max())[None] < LENGTHS[:, None], seq[:, : LENGTHS.max()], 0
    )
    first, _, cache = pre(state, jnp.asarray(prompts), jnp.asarray(LENGTHS, jnp.int32), cache)
    out = [first]
    for j in range(STEPS):
        ids = seq[np.arange(B), LENGTHS + j][:, None]
        logits, cache = step(state, jnp.asarray(ids), cache)
        out.append(logits[:, 0])
    return np.stack([np.asarray(o) for o in out], axis=1), cache


def reference(cfg, graphdef, state):
    full, _, _ = jitted(graphdef)
    logits = np.asarray(full(state, jnp.asarray(sequences(cfg))))
    B = len(LENGTHS)
    idx = LENGTHS[:, None] - 1 + np.arange(STEPS + 1)[None]
    return logits[np.arange(B)[:, None], idx]


TOL = {"float32": 1e-5, "float64": 1e-10}


def test_decode_expert_choice():
    k = BASE.num_experts_per_tok
    assert not experts.use_gathered(len(LENGTHS), k, CASES["qlora_yarn"].n_routed_experts)
    assert experts.use_gathered(len(LENGTHS), k, CASES["direct_q_rope"].n_routed_experts)


def test_gathered_experts_equal_dropless():
    X, k, E, D, F = 3, 2, 8, 16, 24
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (X, D))
    idx = jax.random.randint(keys[1], (X, k), 0, E)
    w = jax.nn.softmax(jax.random.normal(keys[2], (X, k)))
    w1, w3 = (jax.random.normal(kk, (E, D, F)) / 4 for kk in jax.random.split(keys[3]))
    w2 = jax.random.normal(keys[4], (E, F, D)) / 5
    np.testing.assert_allclose(
        experts.gathered_experts(x, idx, w, w1, w3, w2),
        dispatch.dropless_experts(x, idx, w, w1, w3, w2),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", [Mode.ABSORBED, Mode.NAIVE])
@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_plus_decode_equals_full_forward(name, mode, dtype):
    with jax.enable_x64(dtype == "float64"):
        cfg, graphdef, state = built(name, dtype)
        want = reference(cfg, graphdef, state)
        got, _ = run_cached(cfg, graphdef, state, mode)
        assert got.dtype == np.dtype(dtype)
        rel = np.abs(got - want).max() / np.abs(want).max()
        print(f"{name} {mode.value} {dtype}: max rel diff {rel:.2e}")
        assert rel <= TOL[dtype]


def test_verify_k_plus_1_equals_single_steps():
    """One call on k+1 = 4 tokens at start > 0 (unequal per row) equals 4 single-token steps."""
    cfg, graphdef, state = built("qlora_yarn", "float32")
    _, pre, step = jitted(graphdef)
    seq = sequences(cfg)
    B, k1 = len(LENGTHS), STEPS
    cache = kv_cache.init(cfg, B, seq.shape[1] + 1, Mode.ABSORBED)
    prompts = np.where(
        np.arange(LENGTHS.max())[None] < LENGTHS[:, None], seq[:, : LENGTHS.max()], 0
    )
    _, _, cache = pre(state, jnp.asarray(prompts), jnp.asarray(LENGTHS, jnp.int32), cache)
    ids = seq[np.arange(B)[:, None], LENGTHS[:, None] + np.arange(k1)[None]]
    together, cache_v = step(state, jnp.asarray(ids), cache)
    singles, cache_s = [], cache
    for j in range(k1):
        logits, cache_s = step(state, jnp.asarray(ids[:, j : j + 1]), cache_s)
        singles.append(logits[:, 0])
    singles = np.stack([np.asarray(s) for s in singles], axis=1)
    np.testing.assert_allclose(
        np.asarray(together), singles, rtol=1e-5, atol=1e-5 * np.abs(singles).max()
    )
    for a, b in zip(jax.tree.leaves(cache_v), jax.tree.leaves(cache_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_dropping_mscale_squared_breaks_equality(monkeypatch):
    """YaRN factor 40: decode with (N+R)^-0.5 instead of (N+R)^-0.5 * mscale^2 must not match."""
    cfg, graphdef, state = built("qlora_yarn", "float32")
    assert rope.softmax_scale(cfg.mla()) / cfg.mla().qk_head_dim ** -0.5 == pytest.approx(
        config_lib.yarn_mscale(40.0, 1.0) ** 2
    )
    want = reference(cfg, graphdef, state)
    _, pre, _ = jitted(graphdef)
    good, _ = run_cached(cfg, graphdef, state, Mode.ABSORBED, pre=pre)
    assert np.abs(good - want).max() / np.abs(want).max() <= 1e-5
    pre(state, *_prefill_args(cfg))  # the prefill stays compiled with the true scale
    monkeypatch.setattr(rope, "softmax_scale", lambda c: c.qk_head_dim**-0.5)
    _, _, step = jitted(graphdef)  # a fresh jit traces the decode step with the dropped factor
    bad, _ = run_cached(cfg, graphdef, state, Mode.ABSORBED, pre=pre, step=step)
    np.testing.assert_allclose(bad[:, 0], want[:, 0], rtol=1e-5, atol=1e-5)  # prefill: fine
    rel = np.abs(bad[:, 1:] - want[:, 1:]).max() / np.abs(want).max()
    print(f"without mscale^2: max rel diff {rel:.2e}")
    assert rel > 1e-2


def _prefill_args(cfg):
    seq = sequences(cfg)
    cache = kv_cache.init(cfg, len(LENGTHS), seq.shape[1] + 1, Mode.ABSORBED)
    return (jnp.asarray(seq[:, : LENGTHS.max()]), jnp.asarray(LENGTHS, jnp.int32), cache)


def test_cache_holds_latent_and_roped_key_only():
    cfg, graphdef, state = built("qlora_yarn", "float32")
    _, cache = run_cached(cfg, graphdef, state, Mode.ABSORBED)
    for kv in cache.stacks.values():
        assert set(vars(kv)) == {"c_kv_LBTC", "k_rope_LBTR"}
    # kv_norm(latent) of layer 0 equals what the model computes from the embedded prompt
    model = nnx.merge(graphdef, state)
    seq = jnp.asarray(sequences(cfg))
    layer0 = stack.layer(model.dense_layers, 0)
    cos, sin = model.rope_tables(*seq.shape)
    c, k_rope = layer0.attn.latent(layer0.attn_norm(model.embed(seq)), cos, sin)
    n = int(LENGTHS.min())
    np.testing.assert_allclose(
        np.asarray(cache.stacks["dense"].c_kv_LBTC[0, :, :n]), np.asarray(c[:, :n]), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(cache.stacks["dense"].k_rope_LBTR[0, :, :n]),
        np.asarray(k_rope[:, :n]),
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode", [Mode.ABSORBED, Mode.NAIVE])
def test_cache_bytes_per_token_match_formula(mode, dtype):
    cfg = CASES["qlora_yarn"]
    B, T = 3, 40
    cache = kv_cache.init(cfg, B, T, mode, dtype)
    measured = sum(a.nbytes for a in jax.tree.leaves(cache.stacks)) // (B * T)
    item = jnp.dtype(dtype).itemsize
    if mode is Mode.ABSORBED:
        want = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * item
    else:
        want = (
            cfg.n_heads
            * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
            * cfg.n_layers
            * item
        )
    assert measured == want == kv_cache.bytes_per_token(cfg, mode, dtype)


def test_v3_cache_at_128k_is_70272_bytes_per_token():
    cfg = exp_config.load("configs/deepseek_v3_671b.py").model
    T = 131_072
    shapes = jax.eval_shape(lambda: kv_cache.init(cfg, 1, T, Mode.ABSORBED, jnp.bfloat16))
    assert kv_cache.nbytes(shapes) == 70_272 * T
    assert {k: v.c_kv_LBTC.shape for k, v in shapes.stacks.items()} == {
        "dense": (3, 1, T, 512),
        "moe": (58, 1, T, 512),
    }
