"""The tokenised corpus, its held-out split, and the on-disk token cache."""

import os

import numpy as np
import pytest

from deepseek_jax.data import config, corpus, sources, tokenizers
from tests.data import corpora

BYTES = tokenizers.ByteTokenizer()


def _cfg(path, **kw):
    return config.DataConfig(source=config.SourceKind.TEXT, paths=(path,), **kw)


def test_corpus_is_documents_each_followed_by_eos(text_dir):
    c = corpus.load_corpus(_cfg(text_dir), BYTES)
    assert c.keys == tuple(sorted(f"corpus/{k}" for k in corpora.DOCS))
    for i, key in enumerate(c.keys):
        doc = c.tokens[c.offsets[i] : c.offsets[i + 1]]
        assert doc[-1] == BYTES.eos_id
        assert BYTES.decode(doc[:-1]) == corpora.DOCS[key[len("corpus/") :]]
    assert c.tokens.dtype == np.uint16


def test_split_is_disjoint_complete_deterministic_and_seeded(tmp_path):
    docs = {f"d{i:03d}.txt": f"document {i}" for i in range(200)}
    c = corpus.load_corpus(_cfg(corpora.write_docs(str(tmp_path / "many"), docs)), BYTES)
    s = corpus.split_documents(c, 0.25, split_seed=0)
    assert not set(s.train) & set(s.eval)
    assert sorted([*s.train, *s.eval]) == list(range(200))
    assert 25 <= s.eval.size <= 75  # a hash, not an exact count, but near 25% of 200
    again = corpus.split_documents(c, 0.25, split_seed=0)
    assert np.array_equal(again.eval, s.eval)
    assert not np.array_equal(corpus.split_documents(c, 0.25, split_seed=1).eval, s.eval)


def test_split_of_a_document_does_not_depend_on_the_other_documents(tmp_path):
    docs = {f"d{i:03d}.txt": f"document {i}" for i in range(60)}
    c1 = corpus.load_corpus(_cfg(corpora.write_docs(str(tmp_path / "c"), docs)), BYTES)
    held1 = {c1.keys[i] for i in corpus.split_documents(c1, 0.3, 0).eval}
    corpora.write_docs(str(tmp_path / "c"), {"zzz.txt": "a new document"})
    c2 = corpus.load_corpus(_cfg(str(tmp_path / "c")), BYTES)
    held2 = {c2.keys[i] for i in corpus.split_documents(c2, 0.3, 0).eval}
    assert held2 - {"c/zzz.txt"} == held1


def test_tiny_corpora_get_both_splits_and_one_document_is_an_error(tmp_path):
    two = corpora.write_docs(str(tmp_path / "two"), {"a": "x", "b": "y"})
    c = corpus.load_corpus(_cfg(two), BYTES)
    for fraction in (0.001, 0.999):
        s = corpus.split_documents(c, fraction, 0)
        assert s.train.size == 1 and s.eval.size == 1
    one = corpus.load_corpus(_cfg(corpora.write_docs(str(tmp_path / "one"), {"a": "x"})), BYTES)
    with pytest.raises(sources.DataError, match="corpus has 1 document.*at least 2"):
        corpus.split_documents(one, 0.5, 0)


def test_token_range_check_names_the_document():
    tokens = np.array([5, 9, 2, 7, 300, 2, 1, 2], dtype=np.int32)
    c = corpus.Corpus(tokens, np.array([0, 3, 6, 8]), ("a", "b", "c"), (), "fp")
    corpus.check_token_range(c, 301)
    with pytest.raises(
        sources.DataError, match=r"document b has token id 300, outside the model's vocab_size 300"
    ):
        corpus.check_token_range(c, 300)


def test_cache_is_written_reused_and_invalidated(tmp_path, monkeypatch):
    root = corpora.write_docs(str(tmp_path / "cached"))
    cfg = _cfg(root, cache_dir=str(tmp_path / "cache"))
    first = corpus.load_corpus(cfg, BYTES)
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].endswith(".npz")
    corpus._MEMO.clear()
    calls = []
    monkeypatch.setattr(corpus, "_build", lambda *a: calls.append(a) or first)
    second = corpus.load_corpus(cfg, BYTES)
    assert not calls  # read from disk, not rebuilt
    assert np.array_equal(second.tokens, first.tokens) and second.keys == first.keys
    monkeypatch.undo()
    with open(os.path.join(root, "a.txt"), "a") as fh:
        fh.write("changed")
    corpus._MEMO.clear()
    third = corpus.load_corpus(cfg, BYTES)
    assert third.tokens.size == first.tokens.size + len("changed")
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = corpora.write_docs(str(tmp_path / "c"))
    cfg = _cfg(root, cache_dir=str(tmp_path / "cache"))
    good = corpus.load_corpus(cfg, BYTES)
    (path,) = (tmp_path / "cache").iterdir()
    path.write_bytes(b"garbage")
    corpus._MEMO.clear()
    again = corpus.load_corpus(cfg, BYTES)
    assert np.array_equal(again.tokens, good.tokens)
