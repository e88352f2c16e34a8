"""Packing: every epoch covers every token once; EOS separators; padding; the example format."""

import collections

import numpy as np
import pytest

from deepseek_jax.data import config, corpus, packing, tokenizers

BYTES = tokenizers.ByteTokenizer()


@pytest.fixture
def docs_corpus(text_dir):
    return corpus.load_corpus(
        config.DataConfig(source=config.SourceKind.TEXT, paths=(text_dir,)), BYTES
    )


def _stream(c, seq_len, *, shuffle=True, seed=0, repeat=True, ids=None):
    ids = np.arange(c.num_documents) if ids is None else ids
    return packing.PackedStream(
        c, ids, seq_len, pad_id=BYTES.pad_id, seed=seed, shuffle=shuffle, repeat=repeat
    )


def _epoch(stream, epoch=0):
    n = stream.num_windows
    return [stream.window_tokens(epoch * n + i) for i in range(n)]


@pytest.mark.parametrize("seq_len", [1, 7, 64, 5000])
def test_unshuffled_epoch_is_the_concatenation_of_documents_with_eos(docs_corpus, seq_len):
    s = _stream(docs_corpus, seq_len, shuffle=False)
    windows = _epoch(s)
    assert all(w.shape == (seq_len + 1,) and w.dtype == np.int32 for w, _ in windows)
    joined = np.concatenate([w[:v] for w, v in windows])
    assert np.array_equal(joined, docs_corpus.tokens.astype(np.int32))
    assert all(v == seq_len + 1 for _, v in windows[:-1])
    last, valid = windows[-1]
    assert valid == s.num_tokens - (s.num_windows - 1) * (seq_len + 1)
    assert np.all(last[valid:] == BYTES.pad_id)


@pytest.mark.parametrize("seq_len", [3, 50])
def test_shuffled_epochs_cover_every_token_once_in_a_new_order(docs_corpus, seq_len):
    s = _stream(docs_corpus, seq_len, seed=7)
    want = collections.Counter(docs_corpus.tokens.tolist())
    epochs = []
    for e in range(3):
        windows = _epoch(s, e)
        got = collections.Counter(np.concatenate([w[:v] for w, v in windows]).tolist())
        assert got == want  # every token of the split exactly once, EOS included
        epochs.append(np.stack([w for w, _ in windows]))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_same_seed_same_stream_other_seed_other_stream(docs_corpus):
    a = np.stack([w for w, _ in _epoch(_stream(docs_corpus, 16, seed=3))])
    b = np.stack([w for w, _ in _epoch(_stream(docs_corpus, 16, seed=3))])
    c = np.stack([w for w, _ in _epoch(_stream(docs_corpus, 16, seed=4))])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_only_the_given_documents_are_packed(docs_corpus):
    ids = np.array([1, 4])
    s = _stream(docs_corpus, 9, ids=ids)
    got = collections.Counter(np.concatenate([w[:v] for w, v in _epoch(s)]).tolist())
    want = collections.Counter(
        np.concatenate(
            [docs_corpus.tokens[docs_corpus.offsets[i] : docs_corpus.offsets[i + 1]] for i in ids]
        ).tolist()
    )
    assert got == want


def test_finite_stream_pads_past_the_end(docs_corpus):
    s = _stream(docs_corpus, 32, shuffle=False, repeat=False)
    window, valid = s.window_tokens(s.num_windows + 2)
    assert valid == 0 and np.all(window == BYTES.pad_id)


def test_example_shift_mask_and_target_bytes():
    text = "hé!"  # 4 bytes
    window = np.array(
        [*BYTES.encode(text), BYTES.eos_id, 104, BYTES.pad_id, BYTES.pad_id], dtype=np.int32
    )
    ex = packing.make_example(window, 6, BYTES.token_bytes)
    assert np.array_equal(ex["inputs"], window[:-1]) and np.array_equal(ex["targets"], window[1:])
    assert ex["loss_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0]  # EOS and 'h' are targets; pads not
    assert ex["target_bytes"].tolist() == [1, 1, 1, 0, 1, 0, 0]  # EOS carries no bytes
    assert {k: v.dtype for k, v in ex.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "loss_mask": np.float32,
        "target_bytes": np.int32,
    }
    # Bits per byte of a uniform guess over 256 byte values is 8 bits per byte of text.
    nll = np.full(7, np.log(256.0))
    batch = {k: v[None] for k, v in ex.items()}
    assert packing.bits_per_byte(nll[None] * (ex["target_bytes"] > 0), batch) == pytest.approx(8)
