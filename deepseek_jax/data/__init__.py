"""Data pipeline: corpus sources, tokenizers, packing, and the grain train/eval iterators.

The trainer needs four calls (details in docs/data.md):

    cfg = DataConfig.from_dict(config.data)           # or DataConfig() for the stdlib corpus
    tokenizer = build_tokenizer(cfg)                  # .vocab_size, .eos_id, .pad_id, .token_bytes
    train = make_train_iterator(cfg, seq_len=S, global_batch_size=G, model_vocab_size=V,
                                seed=seed, process_index=jax.process_index(),
                                process_count=jax.process_count())
    evals = make_eval_iterator(cfg, seq_len=S, batch_size=G, model_vocab_size=V,
                               num_batches=None, process_index=..., process_count=...)

Each batch is a dict of numpy arrays, local to this host (B = G / process_count rows), keyed by the
fields of `deepseek_jax.batch.Batch` (the trainer turns it into one with `Batch.from_dict`, which
refuses unknown keys, when it shards the rows):
    inputs int32 [B, S], targets int32 [B, S], loss_mask float32 [B, S] (0 on padding),
    target_bytes int32 [B, S] (UTF-8 bytes of each target token; 0 for EOS and padding),
so bits/byte = sum(nll * loss_mask) / ln 2 / sum(target_bytes * loss_mask).

`train` is a grain DatasetIterator: `get_state()` is a JSON-ready dict and `set_state()` continues
the exact batch sequence; `grain.checkpoint.CheckpointSave(train)` works with orbax as is.
All bad data raises `DataError` (a ValueError) naming the file and line or record, at construction.
"""

from deepseek_jax.data.config import DataConfig, SourceKind, TokenizerKind
from deepseek_jax.data.packing import batch_spec, bits_per_byte
from deepseek_jax.data.pipeline import (
    DataIterator,
    EvalBatches,
    PipelineInfo,
    make_eval_iterator,
    make_train_iterator,
)
from deepseek_jax.data.sources import DataError
from deepseek_jax.data.tokenizers import ByteTokenizer, Tokenizer, build_tokenizer, check_vocab

__all__ = [
    "ByteTokenizer",
    "DataConfig",
    "DataError",
    "DataIterator",
    "EvalBatches",
    "PipelineInfo",
    "SourceKind",
    "Tokenizer",
    "TokenizerKind",
    "batch_spec",
    "bits_per_byte",
    "build_tokenizer",
    "check_vocab",
    "make_eval_iterator",
    "make_train_iterator",
]
