"""Packing: fixed-length windows over the concatenation of documents, and the batch format.

Each epoch lays the documents of a split end to end in an epoch-specific order, every document
followed by EOS, and cuts the stream into windows of seq_len + 1 tokens (inputs = window[:-1],
targets = window[1:]). The last window is padded; padding is masked out of the loss. Windows are
then visited in an epoch-specific pseudo-random order (grain's index_shuffle, a bijection that
needs no permutation table). So every epoch covers every token of the split exactly once, with
new document neighbours, new window boundaries and a new window order.

Document boundaries get no attention reset: a window may hold the end of one document, EOS, and
the start of the next, and the model attends across the EOS. That is DeepSeek-V3's own pretraining
setup ("packed without cross-sample attention masking", V3 report p.22), it keeps the model free of
segment ids, and wastes no tokens on padding. The EOS target teaches the model where documents end.

Everything here is a pure function of (corpus, split, seq_len, seed, sample index), which is what
makes the pipeline's iterator state a single integer and per-host sharding exact.
"""

from __future__ import annotations

import threading

import numpy as np
from grain import experimental as grain_experimental

from deepseek_jax.data import corpus as corpus_lib

Batch = dict[str, np.ndarray]
_LAYOUT_CACHE = 3  # epochs kept: prefetch threads may straddle an epoch boundary


class PackedStream:
    """Windows of `seq_len + 1` tokens over the documents `doc_ids` of `corpus`.

    Sample g of the (infinite, if `repeat`) stream is window `order_e(g mod N)` of epoch
    e = g // N, where N = `num_windows`. Without `shuffle`, documents keep ascending key order and
    windows come in stream order. Without `repeat`, samples past the end are all padding.
    """

    def __init__(
        self,
        corpus: corpus_lib.Corpus,
        doc_ids: np.ndarray,
        seq_len: int,
        *,
        pad_id: int,
        seed: int,
        shuffle: bool,
        repeat: bool,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self._tokens = corpus.tokens
        self._starts = corpus.offsets[doc_ids]
        self._lengths = corpus.offsets[doc_ids + 1] - self._starts
        self.window = seq_len + 1
        self.num_tokens = int(self._lengths.sum())
        self.num_windows = -(-self.num_tokens // self.window)
        self._pad_id = pad_id
        self._seed = seed
        self._shuffle = shuffle
        self._repeat = repeat
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def window_tokens(self, g: int) -> tuple[np.ndarray, int]:
        """Tokens of sample g (int32 [seq_len + 1], padded) and how many of them are real."""
        epoch, position = divmod(g, self.num_windows)
        out = np.full(self.window, self._pad_id, dtype=np.int32)
        if epoch > 0 and not self._repeat:
            return out, 0
        chunk = position
        if self._shuffle and self.num_windows > 1:
            chunk = grain_experimental.index_shuffle(
                position, max_index=self.num_windows - 1, seed=self._epoch_seed(epoch, 1), rounds=4
            )
        starts, lengths, ends = self._layout(epoch)
        begin = chunk * self.window
        stop = min(begin + self.window, self.num_tokens)
        k = int(np.searchsorted(ends, begin, side="right"))
        filled = 0
        while begin + filled < stop:
            doc_begin = int(ends[k] - lengths[k])
            a = begin + filled - doc_begin
            b = min(int(lengths[k]), stop - doc_begin)
            out[filled : filled + b - a] = self._tokens[starts[k] + a : starts[k] + b]
            filled += b - a
            k += 1
        return out, filled

    def _epoch_seed(self, epoch: int, stream: int) -> int:
        # SeedSequence mixes (seed, epoch, purpose) into independent 32-bit seeds.
        return int(np.random.SeedSequence([self._seed, epoch, stream]).generate_state(1)[0])

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document starts, lengths and stream end offsets in epoch `epoch`'s order."""
        with self._lock:
            layout = self._layouts.get(epoch)
            if layout is None:
                if self._shuffle:
                    rng = np.random.default_rng(self._epoch_seed(epoch, 0))
                    perm = rng.permutation(len(self._starts))
                    starts, lengths = self._starts[perm], self._lengths[perm]
                else:
                    starts, lengths = self._starts, self._lengths
                layout = (starts, lengths, np.cumsum(lengths))
                self._layouts[epoch] = layout
                while len(self._layouts) > _LAYOUT_CACHE:
                    self._layouts.pop(min(self._layouts))
            return layout


def make_example(window: np.ndarray, valid: int, token_bytes: np.ndarray) -> Batch:
    """One row of a batch from a packed window; see `batch_spec` for the fields."""
    inputs = window[:-1]
    targets = window[1:]
    # Target t is real iff window position t + 1 is: the padding tail is masked out of the loss.
    loss_mask = (np.arange(targets.size) < valid - 1).astype(np.float32)
    target_bytes = np.where(loss_mask > 0, token_bytes[targets], 0).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss_mask,
        "target_bytes": target_bytes,
    }


def batch_spec(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """Shape and dtype of every field of a batch.

    inputs        int32   [B, S]  token ids fed to the model
    targets       int32   [B, S]  next-token ids (inputs shifted by one)
    loss_mask     float32 [B, S]  1 for real targets (EOS included), 0 for padding
    target_bytes  int32   [B, S]  UTF-8 bytes of each target token; 0 for EOS and padding

    bits per byte = sum(nll * loss_mask) / ln(2) / sum(target_bytes * loss_mask).
    """
    shape = (batch_size, seq_len)
    return {
        "inputs": (shape, np.dtype(np.int32)),
        "targets": (shape, np.dtype(np.int32)),
        "loss_mask": (shape, np.dtype(np.float32)),
        "target_bytes": (shape, np.dtype(np.int32)),
    }


def bits_per_byte(nll: np.ndarray, batch: Batch) -> float:
    """Reference bits/byte of per-target negative log-likelihoods (nats) over one batch."""
    mask = batch["loss_mask"]
    return float((nll * mask).sum() / np.log(2.0) / (batch["target_bytes"] * mask).sum())
