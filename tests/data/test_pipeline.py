"""The grain pipeline: batch format, determinism, per-host sharding, exact iterator state, eval."""

import collections
import itertools
import json

import numpy as np
import pytest

from deepseek_jax.data import config, corpus, packing, pipeline, tokenizers

BYTES = tokenizers.ByteTokenizer()


def _cfg(text_dir, **kw):
    kw.setdefault("eval_fraction", 0.25)
    return config.DataConfig(source=config.SourceKind.TEXT, paths=(text_dir,), **kw)


def _train(cfg, *, seq_len=16, batch=4, seed=0, vocab=258, **kw):
    return pipeline.make_train_iterator(
        cfg, seq_len=seq_len, global_batch_size=batch, model_vocab_size=vocab, seed=seed, **kw
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _concat_hosts(host_batches):
    return {k: np.concatenate([b[k] for b in host_batches]) for k in host_batches[0]}


def _valid_tokens(batches):
    """Real tokens of every row: its first input plus every unmasked target."""
    out = []
    for b in batches:
        for inputs, targets, mask in zip(b["inputs"], b["targets"], b["loss_mask"]):
            if mask.any():
                out.append(np.concatenate([inputs[:1], targets[mask > 0]]))
    return np.concatenate(out)


def test_batch_format(text_dir):
    it = _train(_cfg(text_dir), seq_len=16, batch=4)
    b = next(it)
    spec = packing.batch_spec(4, 16)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == spec
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert it.info.local_batch_size == 4 and it.info.vocab_size == 258


def test_one_epoch_of_train_is_exactly_the_train_split(text_dir):
    cfg = _cfg(text_dir)
    it = _train(cfg, seq_len=8, batch=1)
    batches = _take(it, it.info.sequences_per_epoch)
    c = corpus.load_corpus(cfg, BYTES)
    split = corpus.split_documents(c, cfg.eval_fraction, cfg.split_seed)
    assert split.eval.size > 0
    want = np.concatenate([c.tokens[c.offsets[i] : c.offsets[i + 1]] for i in split.train])
    assert collections.Counter(_valid_tokens(batches).tolist()) == collections.Counter(
        want.tolist()
    )


def test_same_seed_same_batches_other_seed_other_batches(text_dir):
    cfg = _cfg(text_dir)
    _assert_same(_take(_train(cfg, seed=5), 6), _take(_train(cfg, seed=5), 6))
    a, b = _take(_train(cfg, seed=5), 6), _take(_train(cfg, seed=6), 6)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_local_batches_concatenate_to_the_one_host_batch(text_dir, hosts):
    cfg = _cfg(text_dir, num_threads=0)
    whole = _take(_train(cfg, batch=8, seed=1), 12)  # 12 batches of 8 span several epochs
    per_host = [
        _take(_train(cfg, batch=8, seed=1, process_index=h, process_count=hosts), 12)
        for h in range(hosts)
    ]
    assert per_host[0][0]["inputs"].shape == (8 // hosts, 16)
    _assert_same(whole, [_concat_hosts(bs) for bs in zip(*per_host)])


@pytest.mark.parametrize("threads", [0, 2])
def test_restored_state_continues_the_exact_sequence(text_dir, threads):
    cfg = _cfg(text_dir, num_threads=threads)
    it = _train(cfg, batch=4, seed=2)
    per_epoch = -(-it.info.sequences_per_epoch // 4)
    k, n = per_epoch - 1, 2 * per_epoch  # save just before an epoch boundary, run across two
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, n)
    fresh = _train(cfg, batch=4, seed=2)
    next(fresh)  # a used iterator must be restorable too
    fresh.set_state(state)
    _assert_same(expected, _take(fresh, n))


def test_state_saved_on_one_host_restores_on_two(text_dir):
    cfg = _cfg(text_dir, num_threads=0)
    it = _train(cfg, batch=4, seed=3)
    _take(it, 5)
    state = it.get_state()
    expected = _take(it, 4)
    hosts = [_train(cfg, batch=4, seed=3, process_index=h, process_count=2) for h in range(2)]
    for h in hosts:
        h.set_state(state)
    _assert_same(expected, [_concat_hosts([next(h) for h in hosts]) for _ in range(4)])


def test_state_from_another_pipeline_is_refused(text_dir):
    cfg = _cfg(text_dir)
    state = _train(cfg, seed=1).get_state()
    with pytest.raises(ValueError, match="saved for a different pipeline"):
        _train(cfg, seed=2).set_state(state)
    with pytest.raises(ValueError, match="saved for a different pipeline"):
        _train(cfg, seed=1, seq_len=32).set_state(state)
    with pytest.raises(ValueError, match="not a data iterator state"):
        _train(cfg, seed=1).set_state({"next_index": 3})


def test_grain_checkpoint_handler_saves_and_restores_it(text_dir, tmp_path):
    grain = pytest.importorskip("grain")
    pytest.importorskip("orbax.checkpoint")
    from etils import epath

    cfg = _cfg(text_dir)
    it = _train(cfg, seed=4)
    _take(it, 3)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
    expected = _take(it, 3)
    restored = handler.restore(
        epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(_train(cfg, seed=4))
    )
    _assert_same(expected, _take(restored, 3))


def test_eval_covers_the_held_out_split_once_in_order(text_dir):
    cfg = _cfg(text_dir)
    ev = pipeline.make_eval_iterator(cfg, seq_len=8, batch_size=4, model_vocab_size=258)
    batches = list(ev)
    assert len(batches) == len(ev) == -(-ev.info.sequences_per_epoch // 4)
    _assert_same(batches, list(ev))  # re-iterable and deterministic
    c = corpus.load_corpus(cfg, BYTES)
    split = corpus.split_documents(c, cfg.eval_fraction, cfg.split_seed)
    want = np.concatenate([c.tokens[c.offsets[i] : c.offsets[i + 1]] for i in split.eval])
    np.testing.assert_array_equal(_valid_tokens(batches), want)
    assert batches[-1]["loss_mask"][-1].sum() < 8  # the tail is padding, masked out


def test_eval_num_batches_and_hosts(text_dir):
    cfg = _cfg(text_dir, eval_fraction=0.6)
    kw = dict(seq_len=4, batch_size=4, model_vocab_size=258)
    whole = list(pipeline.make_eval_iterator(cfg, **kw))
    assert len(whole) > 3
    _assert_same(list(pipeline.make_eval_iterator(cfg, num_batches=3, **kw)), whole[:3])
    assert len(pipeline.make_eval_iterator(cfg, num_batches=10_000, **kw)) == len(whole)
    hosts = [
        list(pipeline.make_eval_iterator(cfg, process_index=h, process_count=2, **kw))
        for h in range(2)
    ]
    _assert_same(whole, [_concat_hosts(bs) for bs in zip(*hosts)])


def test_hf_tokenizer_pipeline_counts_bytes(text_dir, hf_tokenizer_path):
    cfg = _cfg(text_dir, tokenizer=config.TokenizerKind.HF, tokenizer_path=hf_tokenizer_path)
    it = _train(cfg, seq_len=8, batch=1, vocab=320)
    batches = _take(it, it.info.sequences_per_epoch)
    c = corpus.load_corpus(cfg, it.tokenizer)
    split = corpus.split_documents(c, cfg.eval_fraction, cfg.split_seed)
    text_bytes = sum(
        len(it.tokenizer.decode(c.tokens[c.offsets[i] : c.offsets[i + 1]]).encode())
        for i in split.train
    )
    # Every train byte is a target exactly once, except each row's first token (never a target).
    first_bytes = sum(int(it.tokenizer.token_bytes[b["inputs"][0, 0]]) for b in batches)
    got = sum(int((b["target_bytes"] * b["loss_mask"]).sum()) for b in batches)
    assert got + first_bytes == text_bytes


def test_stdlib_corpus_smoke():
    it = pipeline.make_train_iterator(
        config.DataConfig(), seq_len=128, global_batch_size=4, model_vocab_size=258, seed=0
    )
    for b in itertools.islice(it, 3):
        assert b["inputs"].shape == (4, 128) and b["inputs"].max() < 258
    assert it.info.num_documents > 500 and it.info.num_tokens > 5_000_000
    ev = pipeline.make_eval_iterator(
        config.DataConfig(), seq_len=128, batch_size=4, model_vocab_size=258, num_batches=2
    )
    assert len(ev) == 2 and len(list(ev)) == 2
