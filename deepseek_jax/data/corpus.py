"""The tokenised corpus (one flat token array) and its deterministic held-out split by document.

The whole corpus is read and tokenised once at start-up, which is where every bad document is
found: nothing fails later, mid-run. The result is one flat array in which every document is
followed by EOS, plus document offsets, so the packer can cut any sequence of any epoch with a
couple of slices. For the stdlib with the byte tokenizer this takes well under a second; a slower
tokenizer can keep the result under `data.cache_dir`, keyed by the files' names, sizes and mtimes,
the source options and the tokenizer, so a changed file or tokenizer never reuses a stale cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time

import numpy as np

from deepseek_jax.data import config as config_lib
from deepseek_jax.data import sources, tokenizers

_log = logging.getLogger(__name__)
_ENCODE_CHUNK = 256  # documents per encode_batch call: parallel in Rust, bounded memory
_MEMO: dict[str, Corpus] = {}  # train and eval iterators of one run share one corpus
_MEMO_LOCK = threading.Lock()
_MEMO_SIZE = 2
_SLOW_BUILD_S = 5.0  # above this, suggest data.cache_dir


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """All documents, tokenised. Document i is tokens[offsets[i]:offsets[i+1]], EOS last."""

    tokens: np.ndarray  # uint16 when the vocabulary fits, else int32
    offsets: np.ndarray  # int64 [num_documents + 1]
    keys: tuple[str, ...]  # stable document names, decide the split
    skipped: tuple[str, ...]  # "location: reason" of every skipped document
    fingerprint: str

    @property
    def num_documents(self) -> int:
        return len(self.keys)


@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray  # document indices into the Corpus, ascending
    eval: np.ndarray


def load_corpus(cfg: config_lib.DataConfig, tokenizer: tokenizers.Tokenizer) -> Corpus:
    """Reads and tokenises the configured source (or reuses the in-process or on-disk copy)."""
    files = sources.list_files(cfg)
    key = hashlib.sha256(
        f"corpus-v1\0{sources.fingerprint(cfg, files)}\0{tokenizer.fingerprint}".encode()
    ).hexdigest()
    with _MEMO_LOCK:
        if key in _MEMO:
            return _MEMO[key]
    path = os.path.join(cfg.cache_dir, f"corpus-{key[:32]}.npz") if cfg.cache_dir else None
    corpus = _read_cache(path, key) if path else None
    if corpus is None:
        start = time.perf_counter()
        corpus = _build(cfg, files, tokenizer, key)
        seconds = time.perf_counter() - start
        _log.info(
            "tokenised %d documents (%d tokens) in %.2fs",
            corpus.num_documents,
            corpus.tokens.size,
            seconds,
        )
        if seconds > _SLOW_BUILD_S and not path:
            _log.warning(
                "tokenising the corpus took %.0fs; set data.cache_dir to reuse it", seconds
            )
        if path:
            _write_cache(path, corpus)
    if corpus.skipped:
        # For the stdlib these are its empty files and legacy-encoded fixtures, by definition.
        level = logging.INFO if cfg.source is sources.SourceKind.STDLIB else logging.WARNING
        _log.log(level, "skipped %d documents, first: %s", len(corpus.skipped), corpus.skipped[0])
    with _MEMO_LOCK:
        _MEMO[key] = corpus
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
    return corpus


def split_documents(corpus: Corpus, eval_fraction: float, split_seed: int) -> Split:
    """Held-out split by document: a document is held out iff hash(seed, key) < eval_fraction.

    The hash of the key (not the position) keeps a document on the same side when others are added
    or removed. A tiny corpus whose hashes all land on one side gets its most extreme document
    moved across, so both splits are non-empty whenever there are two documents.
    """
    n = corpus.num_documents
    if n < 2:
        raise sources.DataError(
            f"the corpus has {n} document(s) ({corpus.skipped and 'skipped: ' + corpus.skipped[0]}"
            f"); the held-out split is by document, so at least 2 are needed"
        )
    u = np.array([_unit_hash(split_seed, k) for k in corpus.keys])
    held = u < eval_fraction
    if not held.any():
        held[np.argmin(u)] = True
    if held.all():
        held[np.argmax(u)] = False
    return Split(train=np.flatnonzero(~held), eval=np.flatnonzero(held))


def check_token_range(corpus: Corpus, model_vocab_size: int) -> None:
    """Names the first document holding an id the model has no embedding for."""
    if corpus.tokens.size == 0 or int(corpus.tokens.max()) < model_vocab_size:
        return
    first = int(np.argmax(corpus.tokens >= model_vocab_size))
    doc = int(np.searchsorted(corpus.offsets, first, side="right")) - 1
    raise sources.DataError(
        f"document {corpus.keys[doc]} has token id {int(corpus.tokens[first])}, outside the "
        f"model's vocab_size {model_vocab_size}"
    )


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _build(
    cfg: config_lib.DataConfig,
    files: list[sources.SourceFile],
    tokenizer: tokenizers.Tokenizer,
    key: str,
) -> Corpus:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    skipped: list[str] = []
    keys: list[str] = []
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    pending: list[sources.Document] = []

    def flush() -> None:
        for doc, ids in zip(pending, tokenizer.encode_batch([d.text for d in pending])):
            keys.append(doc.key)
            parts.extend((ids, eos))
            lengths.append(len(ids) + 1)
        pending.clear()

    for doc in sources.read_documents(cfg, files, skipped):
        pending.append(doc)
        if len(pending) == _ENCODE_CHUNK:
            flush()
    flush()
    if not keys:
        detail = f"; {len(skipped)} skipped, first: {skipped[0]}" if skipped else ""
        raise sources.DataError(f"the {cfg.source.name} source has no usable documents{detail}")
    tokens = np.concatenate(parts).astype(dtype, copy=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Corpus(tokens, offsets, tuple(keys), tuple(skipped), key)


def _read_cache(path: str, key: str) -> Corpus | None:
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            corpus = Corpus(
                z["tokens"],
                z["offsets"],
                tuple(str(k) for k in z["keys"]),
                tuple(str(s) for s in z["skipped"]),
                key,
            )
        if corpus.offsets[-1] != corpus.tokens.size or len(corpus.keys) + 1 != len(corpus.offsets):
            raise ValueError("inconsistent arrays")
        return corpus
    except (OSError, ValueError, KeyError) as e:
        _log.warning("ignoring unreadable token cache %s (%s); rebuilding", path, e)
        return None


def _write_cache(path: str, corpus: Corpus) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write then rename: concurrent processes (one per host on a shared disk) never see a torn file.
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp.npz"
    np.savez(
        tmp,
        tokens=corpus.tokens,
        offsets=corpus.offsets,
        keys=np.array(corpus.keys, dtype=str),
        skipped=np.array(corpus.skipped, dtype=str),
    )
    os.replace(tmp, path)
