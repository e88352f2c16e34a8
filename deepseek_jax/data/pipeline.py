"""The grain pipeline: train and eval iterators, per-host sharding, checkpointable state.

Why `grain.MapDataset` (random access) rather than an `IterDataset` packer: packing here is a pure
function of the sample index (packing.PackedStream), so the dataset is `range -> map -> batch` and
its iterator state is one integer, the next batch index. That makes the state tiny, exactly
restorable, independent of prefetching, and valid for any number of hosts. Expensive work (reading
and tokenising) happens once at construction (corpus.py); assembling a batch is a few slices, so
grain's prefetch threads are plenty and worker processes would only add pickling.

Sharding: global batch b holds samples b*G .. b*G + G - 1 of the stream (G = global batch size).
Host h of P builds only rows h*L .. h*L + L - 1 of it (L = G / P). So the global batch, the hosts'
local batches concatenated in process order, is the same for every P, and a state saved with P
hosts restores with any other P that divides G.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import grain

from deepseek_jax.data import config as config_lib
from deepseek_jax.data import corpus as corpus_lib
from deepseek_jax.data import packing, sources, tokenizers

_log = logging.getLogger(__name__)
_STATE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
    """What a pipeline covers, for logs and for the trainer's bookkeeping."""

    num_documents: int  # documents of this split
    num_tokens: int  # tokens of this split per epoch, EOS separators included
    sequences_per_epoch: int
    seq_len: int
    global_batch_size: int
    local_batch_size: int
    vocab_size: int  # the tokenizer's
    num_skipped: int  # documents skipped as bad (or excluded from the stdlib corpus)


class DataIterator(grain.DatasetIterator):
    """Infinite iterator of local train batches with a JSON-serialisable, exact state.

    It is a grain `DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` /
    `CheckpointRestore(it)` and orbax's checkpointable-iterator protocol work on it directly.
    The state also carries a fingerprint of everything that decides the batch sequence (corpus,
    split, seq_len, global batch, seed); restoring into a different pipeline is an error rather
    than a silent change of data order.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        fingerprint: str,
        info: PipelineInfo,
        tokenizer: tokenizers.Tokenizer,
    ) -> None:
        super().__init__(parent)
        self._fingerprint = fingerprint
        self.info = info
        self.tokenizer = tokenizer

    def __next__(self) -> packing.Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "fingerprint": self._fingerprint,
            "grain": self._parent.get_state(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a data iterator state (format {_STATE_FORMAT}): {state!r}")
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                f"data iterator state was saved for a different pipeline (fingerprint "
                f"{state.get('fingerprint')} vs {self._fingerprint}): the corpus, split, seq_len, "
                f"global batch size or seed changed, so the saved position means other data"
            )
        self._parent.set_state(state["grain"])


class EvalBatches:
    """Finite, deterministic eval batches; every `iter()` starts again from the first batch."""

    def __init__(
        self, dataset: grain.MapDataset, read_options: grain.ReadOptions, info: PipelineInfo
    ) -> None:
        self._dataset = dataset
        self._read_options = read_options
        self.info = info

    def __len__(self) -> int:
        return len(self._dataset)

    def __iter__(self) -> Iterator[packing.Batch]:
        return iter(self._dataset.to_iter_dataset(self._read_options))


def make_train_iterator(
    cfg: config_lib.DataConfig,
    *,
    seq_len: int,
    global_batch_size: int,
    model_vocab_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> DataIterator:
    """Endless shuffled train batches of this host's rows; see the module docstring.

    Args:
      cfg: the data config.
      seq_len: tokens per row of `inputs` (each row packs seq_len + 1 tokens).
      global_batch_size: rows per step over all hosts; must be divisible by process_count.
      model_vocab_size: the model's embedding rows; a tokenizer with more ids is an error.
      seed: shuffle seed (document and sequence order per epoch); the split uses cfg.split_seed.
      process_index, process_count: this host and the number of hosts (jax.process_index/count).
    """
    _check_int("seed", seed, 0)
    tokenizer, corpus, split, local = _prepare(
        cfg, seq_len, global_batch_size, model_vocab_size, process_index, process_count
    )
    if split.train.size == 0:  # unreachable through split_documents; kept as a guard
        raise sources.DataError("the train split is empty")
    stream = packing.PackedStream(
        corpus,
        split.train,
        seq_len,
        pad_id=tokenizer.pad_id,
        seed=seed,
        shuffle=cfg.shuffle,
        repeat=True,
    )
    rows = _Rows(stream, tokenizer, global_batch_size, local, process_index)
    num_samples = (sys.maxsize // global_batch_size) * local
    dataset = grain.MapDataset.range(num_samples).map(rows).batch(local, drop_remainder=True)
    info = _info(split.train, stream, seq_len, global_batch_size, local, tokenizer, corpus)
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                corpus.fingerprint,
                cfg.split_seed,
                cfg.eval_fraction,
                cfg.shuffle,
                seq_len,
                global_batch_size,
                seed,
            ]
        ).encode()
    ).hexdigest()[:16]
    _log.info("train data: %s", info)
    parent = iter(dataset.to_iter_dataset(_read_options(cfg)))
    return DataIterator(parent, fingerprint, info, tokenizer)


def make_eval_iterator(
    cfg: config_lib.DataConfig,
    *,
    seq_len: int,
    batch_size: int,
    model_vocab_size: int,
    num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> EvalBatches:
    """The held-out split in a fixed order, unshuffled, as batches of `batch_size` global rows.

    `num_batches=None` covers the whole split once; otherwise the first min(num_batches, whole)
    batches. Rows past the end of the split are all padding (loss_mask 0), so every host sees the
    same number of batches of the same shape.
    """
    tokenizer, corpus, split, local = _prepare(
        cfg, seq_len, batch_size, model_vocab_size, process_index, process_count
    )
    stream = packing.PackedStream(
        corpus, split.eval, seq_len, pad_id=tokenizer.pad_id, seed=0, shuffle=False, repeat=False
    )
    whole = -(-stream.num_windows // batch_size)
    if num_batches is not None:
        _check_int("num_batches", num_batches, 1)
        if num_batches > whole:
            _log.info("eval: %d batches asked, the held-out split fills %d", num_batches, whole)
        whole = min(whole, num_batches)
    rows = _Rows(stream, tokenizer, batch_size, local, process_index)
    dataset = grain.MapDataset.range(whole * local).map(rows).batch(local, drop_remainder=True)
    info = _info(split.eval, stream, seq_len, batch_size, local, tokenizer, corpus)
    return EvalBatches(dataset, _read_options(cfg), info)


class _Rows:
    """Local sample index -> this host's row of the global batch (a picklable grain map fn)."""

    def __init__(
        self,
        stream: packing.PackedStream,
        tokenizer: tokenizers.Tokenizer,
        global_batch: int,
        local_batch: int,
        process_index: int,
    ) -> None:
        self._stream = stream
        self._token_bytes = tokenizer.token_bytes
        self._global = global_batch
        self._local = local_batch
        self._offset = process_index * local_batch

    def __call__(self, m: int) -> packing.Batch:
        b, j = divmod(m, self._local)
        window, valid = self._stream.window_tokens(b * self._global + self._offset + j)
        return packing.make_example(window, valid, self._token_bytes)


def _prepare(
    cfg: config_lib.DataConfig,
    seq_len: int,
    global_batch: int,
    model_vocab_size: int,
    process_index: int,
    process_count: int,
):
    """Validates the arguments, then builds tokenizer, corpus and split, in that order."""
    if not isinstance(cfg, config_lib.DataConfig):
        raise ValueError(f"expected a DataConfig, got {type(cfg).__name__}")
    _check_int("seq_len", seq_len, 1)
    _check_int("batch size", global_batch, 1)
    _check_int("process_count", process_count, 1)
    _check_int("process_index", process_index, 0)
    if process_index >= process_count:
        raise ValueError(
            f"process_index {process_index} is not below process_count {process_count}"
        )
    if global_batch % process_count:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by process_count {process_count}"
        )
    tokenizer = tokenizers.build_tokenizer(cfg)
    tokenizers.check_vocab(tokenizer, model_vocab_size)
    corpus = corpus_lib.load_corpus(cfg, tokenizer)
    corpus_lib.check_token_range(corpus, model_vocab_size)
    split = corpus_lib.split_documents(corpus, cfg.eval_fraction, cfg.split_seed)
    return tokenizer, corpus, split, global_batch // process_count


def _info(
    doc_ids,
    stream: packing.PackedStream,
    seq_len: int,
    global_batch: int,
    local: int,
    tokenizer: tokenizers.Tokenizer,
    corpus: corpus_lib.Corpus,
) -> PipelineInfo:
    return PipelineInfo(
        num_documents=int(doc_ids.size),
        num_tokens=stream.num_tokens,
        sequences_per_epoch=stream.num_windows,
        seq_len=seq_len,
        global_batch_size=global_batch,
        local_batch_size=local,
        vocab_size=tokenizer.vocab_size,
        num_skipped=len(corpus.skipped),
    )


def _read_options(cfg: config_lib.DataConfig) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=cfg.num_threads,
        prefetch_buffer_size=cfg.prefetch_batches if cfg.num_threads else 0,
    )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
