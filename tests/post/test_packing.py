"""Isolated packing: samples share rows but no target crosses a sample, MTP depths included, and
a masked target cannot change the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.batch import Batch
from deepseek_jax.data import sources
from deepseek_jax.data import tokenizers as tok_lib
from deepseek_jax.model import losses, transformer
from deepseek_jax.post import chat, packing

BYTES = tok_lib.ByteTokenizer()
TEMPLATE = chat.byte_template(BYTES)
S, DEPTH = 96, 3


def samples(n: int = 9) -> list[chat.Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        words = ["".join(rng.choice(list("abcdef"), rng.integers(1, 9))) for _ in range(2)]
        messages = [
            {"role": "user", "content": words[0]},
            {"role": "assistant", "content": words[1]},
        ]
        out.extend(chat.tokenize(TEMPLATE, BYTES, messages, origin=f"s:{i}"))
    return out


@pytest.fixture(scope="module")
def rows():
    return packing.pack(samples(), S, pad_id=BYTES.pad_id, token_bytes=BYTES.token_bytes)


def test_every_sample_is_in_one_row_with_its_own_positions_and_targets(rows):
    got = []
    for r in range(rows["inputs"].shape[0]):
        seg = rows["segment_ids"][r]
        for k in range(1, seg.max() + 1):
            at = np.flatnonzero(seg == k)
            assert (np.diff(at) == 1).all()  # contiguous
            np.testing.assert_array_equal(rows["positions"][r, at], np.arange(at.size))
            ids = np.concatenate([rows["inputs"][r, at], rows["targets"][r, at[-1:]]])
            np.testing.assert_array_equal(rows["targets"][r, at], ids[1:])
            got.append((ids, rows["loss_mask"][r, at]))
        pad = seg == 0
        assert (rows["loss_mask"][r, pad] == 0).all() and (rows["positions"][r, pad] == 0).all()
    want = samples()
    assert len(got) == len(want)
    assert rows["inputs"].shape[0] < len(want)  # several samples per row
    for s in want:  # each sample appears exactly, with its target mask
        assert (
            sum(
                ids.size == s.ids.size and (ids == s.ids).all() and (m == s.target[1:]).all()
                for ids, m in got
            )
            == 1
        )
    assert Batch.from_dict(rows).segment_ids is rows["segment_ids"]
    byte_targets = (rows["loss_mask"] > 0) & (rows["targets"] < 256)  # EOS has no bytes
    np.testing.assert_array_equal(rows["target_bytes"], byte_targets.astype(np.int32))


def test_no_mtp_target_crosses_a_sample(rows):
    """Brute force per sample: depth k's target at i counts iff i+k is in i's sample and a
    target there is an assistant token."""
    seg, mask = rows["segment_ids"], rows["loss_mask"]
    _, m_JBS = losses.mtp_targets(
        jnp.asarray(rows["targets"]), jnp.asarray(mask), DEPTH, jnp.asarray(seg)
    )
    B = seg.shape[0]
    want = np.zeros((DEPTH, B, S), np.float32)
    for k in range(1, DEPTH + 1):
        for b in range(B):
            for i in range(S - k):
                want[k - 1, b, i] = mask[b, i + k] if seg[b, i] == seg[b, i + k] else 0.0
    np.testing.assert_array_equal(np.asarray(m_JBS), want)
    # Chat samples start with prompt text, so only deep MTP would cross; samples whose targets
    # start at once (prompt-free) cross at depth 1 without segment ids.
    dense = [chat.Sample(np.arange(n, dtype=np.int32), np.arange(n) > 0, "d") for n in (4, 5)]
    row = packing.pack(dense, 8, pad_id=0, token_bytes=np.ones(10, np.int32))
    args = [jnp.asarray(row[k]) for k in ("targets", "loss_mask", "segment_ids")]
    _, m = losses.mtp_targets(args[0], args[1], 1, args[2])
    _, crossing = losses.mtp_targets(*args[:2], 1)
    np.testing.assert_array_equal(np.asarray(m)[0, 0], [1, 1, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(crossing)[0, 0], [1, 1, 1, 1, 1, 1, 0, 0])


def test_a_masked_target_leaves_loss_and_gradients_bit_identical(rows):
    batch = Batch.from_dict(jax.tree.map(jnp.asarray, rows))
    rng = np.random.default_rng(1)
    B, V = batch.inputs.shape[0], BYTES.vocab_size
    logits = jnp.asarray(rng.normal(size=(B, S, V)), jnp.float32)
    mtp_logits = jnp.asarray(rng.normal(size=(DEPTH, B, S, V)), jnp.float32)

    def loss(logits, mtp_logits, batch):
        out = transformer.Outputs(logits, mtp_logits, None, None)
        weights = losses.Weights(jnp.asarray(0.3, jnp.float32), 0.0)
        return losses.objective(out, batch, losses.norms(batch, DEPTH, jnp.float32), weights)[0]

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    masked = rows["loss_mask"] == 0
    changed = np.where(masked, rng.integers(0, V, size=masked.shape), rows["targets"])
    assert (changed != rows["targets"]).sum() > 20
    a = grad(logits, mtp_logits, batch)
    b = grad(logits, mtp_logits, Batch(**{**batch.to_dict(), "targets": jnp.asarray(changed)}))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # and the main CE is token_nll over assistant targets only, by hand
    nll = np.asarray(losses.token_nll(logits, batch.targets))
    want = (nll * rows["loss_mask"]).sum() / rows["loss_mask"].sum()
    lm = float(loss(logits, None, batch))
    np.testing.assert_allclose(lm, want, rtol=1e-6)


def test_batches_pad_whole_rows_and_long_samples_fail(rows):
    out = packing.batches(rows, 4, pad_id=BYTES.pad_id)
    assert all(b["inputs"].shape == (4, S) for b in out)
    last = out[-1]
    empty = last["segment_ids"].sum(axis=1) == 0
    assert (last["inputs"][empty] == BYTES.pad_id).all() and (last["loss_mask"][empty] == 0).all()
    with pytest.raises(sources.DataError, match="s:0: the rendered conversation is .* longer"):
        packing.pack(samples(1), 5, pad_id=BYTES.pad_id, token_bytes=BYTES.token_bytes)
