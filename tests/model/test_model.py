"""Whole-model properties on a tiny config with MoE and MTP on: shapes, dtypes, causality,
scan = unrolled loop, remat = no remat, MTP wiring, aux-loss-free balancing."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import layers, losses, stack, transformer, tree

CFG = config_lib.ModelConfig(
    vocab_size=32,
    d_model=32,
    n_layers=3,
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
    n_group=2,
    topk_group=1,
    mtp_depth=2,
    init_std=0.2,
)
B, S = 2, 8


@functools.cache
def build(cfg=CFG, seed=0):
    """(graphdef, params, expert biases), shared by the tests (call under enable_x64 for float64
    configs). The arrays come from one compiled init: run eagerly, every initialiser and every
    op of a forward compiles on its own, which cost more than the tests' own work."""
    new = lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, _, _ = nnx.split(nnx.eval_shape(new), nnx.Param, layers.ExpertBias)
    params, biases = jax.jit(lambda: nnx.split(new(), nnx.Param, layers.ExpertBias)[1:])()
    return graphdef, params, biases


def graphdef_of(cfg):
    return nnx.split(
        nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0))),
        nnx.Param,
        layers.ExpertBias,
    )[0]


def forward(graphdef, params, biases, ids):
    return jax.jit(lambda p, b, t: nnx.merge(graphdef, p, b)(t))(params, biases, ids)


@pytest.fixture(scope="module")
def tiny():
    return build()


def tokens(seed=0, vocab=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), (B, S), 0, vocab)


def test_shapes_dtypes_and_logical_axes():
    cfg = dataclasses.replace(CFG, compute_dtype=config_lib.DType.BFLOAT16)
    graphdef, params, biases = build(cfg)
    out = forward(graphdef, params, biases, tokens())
    assert out.logits_BSY.shape == (B, S, CFG.vocab_size) and out.logits_BSY.dtype == jnp.float32
    assert out.mtp_logits_JBSY.shape == (2, B, S, CFG.vocab_size)
    assert out.moe_stats.load_E.shape == (2, 8) and out.mtp_stats.load_E.shape == (2, 8)
    np.testing.assert_array_equal(np.asarray(out.moe_stats.load_E).sum(-1), B * S * 2)
    for path, var in tree.variables(params).items():
        assert var.get_value().dtype == jnp.float32, path
        assert len(var.get_metadata()["logical_axes"]) == var.get_value().ndim, path
    axes = tree.logical_axes(params)
    assert axes[("moe_layers", "ffn", "w1")] == ("layers", "expert", "embed", "expert_mlp")
    assert axes[("moe_layers", "attn", "wq_b", "kernel")] == (
        "layers",
        "q_lora",
        "heads",
        "qk_head",
    )
    assert axes[("mtp", "layers", "eh_proj", "kernel")] == ("mtp_layers", "mtp_in", "embed")
    assert tree.arrays(biases)[("moe_layers", "ffn", "gate", "bias")].shape == (2, 8)


def test_causality_main_and_mtp(tiny):
    """d logits[t] / d Emb(token at s) is exactly 0 for s > t (main) and s > t+k (MTP depth k)."""
    graphdef, params, biases = tiny
    ids = jnp.asarray(
        np.stack([np.random.default_rng(i).permutation(CFG.vocab_size)[:S] for i in range(B)])
    )  # distinct tokens within each row
    proj = jax.random.normal(jax.random.key(5), (CFG.vocab_size,))
    table = tree.arrays(params)[("embed", "embedding")]

    def per_position(tbl):
        p = tree.with_arrays(params, lambda path, a: tbl if path == ("embed", "embedding") else a)
        out = nnx.merge(graphdef, p, biases)(ids)
        main = out.logits_BSY @ proj  # [B, S]
        mtp = out.mtp_logits_JBSY @ proj  # [D, B, S]
        return jnp.concatenate([main[None], mtp], axis=0)  # [1+D, B, S]

    # One compiled VJP, pulled back once per output (jacrev would vmap ragged_dot: NYI).
    values, pullback = jax.vjp(jax.jit(per_position), table)
    pullback = jax.jit(pullback)
    ids_np = np.asarray(ids)
    for depth in range(CFG.mtp_depth + 1):
        for b in range(B):
            for t in range(S):
                cot = jnp.zeros_like(values).at[depth, b, t].set(1.0)
                row_norm = np.abs(np.asarray(pullback(cot)[0])).sum(-1)  # [Y]
                horizon = t + depth
                assert np.all(row_norm[ids_np[b, horizon + 1 :]] == 0), (depth, b, t)
                if horizon < S:  # it does depend on the newest token it may see
                    assert row_norm[ids_np[b, horizon]] > 0, (depth, b, t)


def unrolled_logits(graphdef, params, biases, ids):
    model = nnx.merge(graphdef, params, biases)
    cos, sin = model.rope_tables(*ids.shape)
    h = model.embed(ids)
    for stk in (model.dense_layers, model.moe_layers):
        for i in range(stack.num_layers(stk)):
            h, _ = stack.layer(stk, i)(h, cos, sin)
    return model.logits(model.norm(h)), h, model


F64 = dataclasses.replace(
    CFG, param_dtype=config_lib.DType.FLOAT64, compute_dtype=config_lib.DType.FLOAT64
)


def test_scan_equals_unrolled_loop():
    # float64: a fused scan body and op-by-op layers round differently in float32 (~1e-6);
    # in float64 any structural difference would still show far above 1e-12.
    with jax.enable_x64(True):
        graphdef, params, biases = build(F64)
        ids = tokens(1)
        unrolled = jax.jit(lambda p, b, t: unrolled_logits(graphdef, p, b, t)[0])
        want = unrolled(params, biases, ids)
        got = forward(graphdef, params, biases, ids).logits_BSY
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-12)


def test_scan_layers_off_equals_the_scan_with_gradients():
    """model.scan_layers=False (a Python loop over the stacked layers) gives the scan's values
    and parameter gradients, MTP and the balance statistics included."""
    with jax.enable_x64(True):
        graphdef, params, biases = build(F64)
        loop_graphdef = graphdef_of(dataclasses.replace(F64, scan_layers=False))
        ids = tokens(1)

        def value_and_grad(g):
            def objective(p):
                out = nnx.merge(g, p, biases)(ids)
                stats = sum(s.sum() for s in jax.tree.leaves(out.moe_stats))
                return out.logits_BSY.sum() + out.mtp_logits_JBSY.sum() + stats

            return jax.jit(jax.value_and_grad(objective))(params)

        want, want_g = value_and_grad(graphdef)
        got, got_g = value_and_grad(loop_graphdef)
        np.testing.assert_allclose(got, want, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(a, b, atol=1e-12, rtol=1e-10)


def test_mtp_depth1_is_embedding_first_on_post_norm_hidden(tiny):
    graphdef, params, biases = tiny
    ids = tokens(2)

    @jax.jit
    def by_hand(params, biases, ids):
        _, h_last, model = unrolled_logits(graphdef, params, biases, ids)
        cos, sin = model.rope_tables(B, S)
        layer0 = stack.layer(model.mtp.layers, 0)
        nxt = jnp.concatenate([ids[:, 1:], jnp.zeros((B, 1), ids.dtype)], axis=1)  # t_{i+1}
        h_next = layer0.enorm(model.embed(nxt))
        x = layer0.eh_proj(jnp.concatenate([h_next, layer0.hnorm(model.norm(h_last))], axis=-1))
        y, _ = layer0.block(x, cos, sin)
        return model.logits(layer0.head_norm(y))

    want = by_hand(params, biases, ids)
    got = forward(graphdef, params, biases, ids).mtp_logits_JBSY[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_mtp_targets_alignment():
    targets = jnp.asarray([[1, 2, 3, 4, 5]])  # inputs would be [0, 1, 2, 3, 4]
    mask = jnp.ones((1, 5))
    t, m = losses.mtp_targets(targets, mask, 2)
    # depth 1 at position i predicts token i+2 = targets[i+1]; depth 2 predicts targets[i+2]
    np.testing.assert_array_equal(t[0, 0], [2, 3, 4, 5, 0])
    np.testing.assert_array_equal(m[0, 0], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(t[1, 0], [3, 4, 5, 0, 0])
    np.testing.assert_array_equal(m[1, 0], [1, 1, 1, 0, 0])
    from deepseek_jax.model import mtp

    inputs = jnp.asarray([[0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(mtp.shifted(inputs, 2)[:, 0], [[1, 2, 3, 4, 0], [2, 3, 4, 0, 0]])


@pytest.mark.parametrize("policy", [config_lib.RematPolicy.FULL, config_lib.RematPolicy.DOTS])
def test_remat_equals_no_remat(policy):
    with jax.enable_x64(True):
        graphdef, params, biases = build(F64)
        remat_graphdef = graphdef_of(dataclasses.replace(F64, remat=policy))
        ids = tokens(3)

        def loss(gd):
            def f(p):
                out = nnx.merge(gd, p, biases)(ids)
                return jnp.mean(out.logits_BSY**2) + jnp.mean(out.mtp_logits_JBSY**2)

            return jax.jit(jax.value_and_grad(f))

        v0, g0 = loss(graphdef)(params)
        v1, g1 = loss(remat_graphdef)(params)
        np.testing.assert_allclose(v0, v1, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_bias_update_evens_out_a_skewed_router():
    cfg = dataclasses.replace(
        CFG, n_layers=1, first_k_dense_replace=0, mtp_depth=0, n_group=1, topk_group=1
    )
    graphdef, params, biases = build(cfg)

    # Skew: every token gets a large constant feature 0, which the router reads as a strong
    # vote for experts 0 and 1 and against the others.
    def skewed(path, a):
        if path == ("embed", "embedding"):
            return a.at[:, 0].add(2.0)
        if path == ("moe_layers", "ffn", "gate", "kernel"):
            return a.at[:, 0, :2].add(0.5).at[:, 0, 2:].add(-0.5)
        return a

    params = tree.with_arrays(params, skewed)

    @jax.jit
    def step(biases, key):
        model = nnx.merge(graphdef, params, biases)
        ids = jax.random.randint(key, (16, 32), 0, cfg.vocab_size)
        out = model(ids)
        load = out.moe_stats.load_E[0]
        model.update_expert_bias(out.moe_stats, None, 0.005)
        return nnx.state(model, layers.ExpertBias), load.max() / load.mean()

    ratios = []
    for i in range(300):
        biases, ratio = step(biases, jax.random.key(i))
        ratios.append(float(ratio))
    assert np.mean(ratios[:5]) > 3.0  # skewed: 2 of 8 experts take (nearly) everything
    assert np.mean(ratios[-20:]) < 1.4
    final = tree.arrays(biases)[("moe_layers", "ffn", "gate", "bias")]
    assert final[0, :2].max() < final[0, 2:].min()  # the favoured experts were pushed down
