"""Packed samples with isolation: a row A|B|C|pad (segment ids + per-sample positions) gives B the
same logits, MTP logits and losses as B alone, with dense and blockwise attention; rows without
segment ids keep the pre-training graph."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import layers, losses, transformer
from tests.model import test_model

CFG = test_model.CFG  # the model tests' tiny MoE + MTP (D = 2) config
LENGTHS = (5, 7, 6)  # A, B, C
PAD = 2
S = sum(LENGTHS) + PAD
B_START, B_LEN = LENGTHS[0], LENGTHS[1]
ATTENTION = {
    "dense": config_lib.AttentionConfig(),
    # blocks smaller than the samples, so sample boundaries fall inside and across blocks
    "blockwise": config_lib.AttentionConfig(config_lib.AttentionImpl.BLOCKWISE, 4, 4),
}


def packed_row(seed=0):
    ids = np.array(jax.random.randint(jax.random.key(seed), (1, S), 1, CFG.vocab_size))
    ids[:, S - PAD :] = 0
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(LENGTHS)] + [np.zeros(PAD)])
    pos = np.concatenate([np.arange(n) for n in LENGTHS] + [np.arange(PAD)])
    return (
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(seg[None], jnp.int32),
        jnp.asarray(pos[None], jnp.int32),
    )


@pytest.fixture(scope="module", params=sorted(ATTENTION))
def model(request):
    cfg = dataclasses.replace(CFG, attention=ATTENTION[request.param])
    return nnx.split(transformer.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, layers.ExpertBias)


def forward(split, ids, seg=None, pos=None):
    graphdef, params, biases = split
    fn = jax.jit(
        lambda p, b, i, s, q: nnx.merge(graphdef, p, b)(i, segment_ids_BS=s, positions_BS=q)
    )
    return fn(params, biases, ids, seg, pos)


def sample_losses(logits_BSY, mtp_JBSY, ids_BS, start, n):
    """Main + per-depth MTP loss of the sample ids[start:start+n], only in-sample targets."""
    tgt = ids_BS[:, start + 1 : start + n]
    main = losses.token_nll(logits_BSY[:, start : start + n - 1], tgt).mean()
    mtp = [
        losses.token_nll(mtp_JBSY[k - 1, :, start : start + n - 1 - k], tgt[:, k:]).mean()
        for k in range(1, mtp_JBSY.shape[0] + 1)
    ]
    return jnp.stack([main, *mtp])


def test_packed_sample_equals_sample_alone(model):
    ids, seg, pos = packed_row()
    packed = forward(model, ids, seg, pos)
    alone = forward(model, ids[:, B_START : B_START + B_LEN])
    sl = slice(B_START, B_START + B_LEN)
    np.testing.assert_allclose(packed.logits_BSY[:, sl], alone.logits_BSY, atol=1e-5, rtol=0)
    # Depth k at position i reads token i+k: in-sample for i < len-k. The last k positions read
    # the next sample (their targets cross it and are masked); nothing earlier attends to them.
    for k in range(1, CFG.mtp_depth + 1):
        np.testing.assert_allclose(
            packed.mtp_logits_JBSY[k - 1, :, B_START : B_START + B_LEN - k],
            alone.mtp_logits_JBSY[k - 1, :, : B_LEN - k],
            atol=1e-5,
            rtol=0,
        )
    got = sample_losses(packed.logits_BSY, packed.mtp_logits_JBSY, ids, B_START, B_LEN)
    want = sample_losses(alone.logits_BSY, alone.mtp_logits_JBSY, ids[:, sl], 0, B_LEN)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_packing_changes_what_isolation_removes(model):
    """The test above can fail: without segment ids, B sees A and its logits move."""
    ids, _, pos = packed_row()
    leaky = forward(model, ids, None, pos)
    alone = forward(model, ids[:, B_START : B_START + B_LEN])
    assert np.abs(leaky.logits_BSY[:, B_START : B_START + B_LEN] - alone.logits_BSY).max() > 1e-3


def test_unsegmented_forward_keeps_its_graph(model):
    graphdef, params, biases = model
    ids, seg, pos = packed_row()

    def eqns(*extra):
        def f(p, b, i, *e):
            kw = dict(zip(("segment_ids_BS", "positions_BS"), e))
            return nnx.merge(graphdef, p, b)(i, **kw).logits_BSY

        jaxpr = jax.make_jaxpr(f)(params, biases, ids, *extra)
        return len(str(jaxpr).splitlines()), jaxpr

    n_plain, plain = eqns()
    n_nones, nones = eqns(None, None)
    n_seg, _ = eqns(seg, pos)
    assert str(plain) == str(nones)
    assert n_seg > n_plain  # the mask only exists when asked for
    # one sample filling the row, with explicit ids and positions, is the plain forward
    full_seg = jnp.ones_like(seg)
    full_pos = jnp.arange(S, dtype=jnp.int32)[None]
    a = forward(model, ids)
    b = forward(model, ids, full_seg, full_pos)
    np.testing.assert_allclose(a.logits_BSY, b.logits_BSY, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.mtp_logits_JBSY, b.mtp_logits_JBSY, atol=1e-6, rtol=0)
