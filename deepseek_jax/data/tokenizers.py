"""Tokenizers: the byte-level default and a local Hugging Face tokenizer.json.

Both expose the same small interface: `encode`/`encode_batch` (no special tokens added; the packer
appends EOS), `decode`, `vocab_size`, `eos_id`, `pad_id`, and `token_bytes`, the number of UTF-8
bytes each token id stands for (0 for special tokens). `token_bytes` is what makes bits per byte
tokenizer-independent: bits/byte = sum(nll * mask) / ln 2 / sum(token_bytes[target] * mask).
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from deepseek_jax.data import config as config_lib
from deepseek_jax.data import sources

# Special tokens tried, in order, when data.eos_token is not set: DeepSeek's, GPT-2's, Llama 3's,
# SentencePiece's.
_KNOWN_EOS = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer(abc.ABC):
    """Text <-> token ids. `token_bytes[i]` is the UTF-8 byte length token i decodes to."""

    vocab_size: int
    eos_id: int
    pad_id: int
    token_bytes: np.ndarray  # int32 [vocab_size]
    fingerprint: str  # identifies the id mapping; part of the token-cache key

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (unsigned or int32 arrays), without special tokens."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens are dropped."""

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encode_batch([text])[0], dtype=np.int32)

    @abc.abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [N], character spans int64 [N, 2]) of one tokenization of `text`.

        Special tokens spelled in the text are recognised where the tokenizer has any (HF added
        tokens); the chat code maps rendered character spans to tokens with the spans, so a
        conversation is tokenized once, never piece by piece.
        """


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, EOS = 256, PAD = 257: vocab_size 258.

    Needs no file, is exact for any text, and makes bits per byte equal to the loss in bits per
    token, which is why it is the default for the CPU smoke run.
    """

    EOS = 256
    PAD = 257

    def __init__(self) -> None:
        self.vocab_size = 258
        self.eos_id = self.EOS
        self.pad_id = self.PAD
        self.token_bytes = np.array([1] * 256 + [0, 0], dtype=np.int32)
        self.fingerprint = "byte-v1"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids, spans = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids.extend(b)
            spans.extend([(i, i + 1)] * len(b))  # a character's bytes all map to it
        return np.asarray(ids, np.int32), np.asarray(spans, np.int64).reshape(-1, 2)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids, dtype=np.int64)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A local tokenizer.json via the `tokenizers` library (Rust; batch encoding is parallel)."""

    def __init__(
        self, path: str, eos_token: str | None = None, pad_token: str | None = None
    ) -> None:
        import tokenizers  # imported here so the byte path does not pay for it

        if not os.path.isfile(path):
            raise sources.DataError(
                f"data.tokenizer_path: no such file: {path!r} (tokenizers are "
                f"never downloaded; give a local tokenizer.json)"
            )
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise sources.DataError(
                f"data.tokenizer_path: {path} is not a valid tokenizer.json ({e})"
            ) from e
        self.path = path
        # A tokenizer.json may carry truncation/padding settings for inference; applied here they
        # would silently cut documents.
        self._tok.no_truncation()
        self._tok.no_padding()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Ids need not be dense; the embedding must cover the largest one.
        self.vocab_size = max(vocab.values()) + 1
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        self.eos_id = self._special_id(vocab, eos_token, "eos_token", _KNOWN_EOS)
        self.pad_id = (
            self.eos_id
            if pad_token is None
            else self._special_id(vocab, pad_token, "pad_token", ())
        )
        spec = json.loads(self._tok.to_str())
        byte_level = _mentions_byte_level(spec.get("pre_tokenizer")) or _mentions_byte_level(
            spec.get("decoder")
        )
        unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for token, i in vocab.items():
            if token in special:
                continue
            lengths[i] = _token_byte_length(token, byte_level, unicode_to_byte)
        self.token_bytes = lengths
        self.fingerprint = (
            "hf-" + hashlib.sha256(raw + f"\0{self.eos_id}\0{self.pad_id}".encode()).hexdigest()
        )

    def _special_id(
        self, vocab: dict[str, int], token: str | None, field: str, known: Sequence[str]
    ) -> int:
        if token is not None:
            if token not in vocab:
                raise sources.DataError(
                    f"data.{field}: {token!r} is not in the vocabulary of {self.path}"
                )
            return vocab[token]
        for candidate in known:
            if candidate in vocab:
                return vocab[candidate]
        raise sources.DataError(
            f"{self.path} has none of the known end-of-document tokens "
            f"{list(known)}; set data.{field}"
        )

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        e = self._tok.encode(text, add_special_tokens=False)
        return np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int64).reshape(-1, 2)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(cfg: config_lib.DataConfig) -> Tokenizer:
    """The tokenizer `cfg` asks for. A missing or malformed tokenizer.json raises DataError."""
    if cfg.tokenizer is config_lib.TokenizerKind.BYTE:
        return ByteTokenizer()
    assert cfg.tokenizer_path is not None  # DataConfig enforces it
    return HFTokenizer(cfg.tokenizer_path, cfg.eos_token, cfg.pad_token)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fails before training if the tokenizer can produce ids the model has no embedding for.

    An out-of-range id would not crash on an accelerator: gathers clamp, so training would
    silently read the wrong embedding row. Hence a hard error here.
    """
    if not isinstance(model_vocab_size, int) or model_vocab_size <= 0:
        raise ValueError(f"model vocab_size must be a positive int, got {model_vocab_size!r}")
    if tokenizer.vocab_size > model_vocab_size:
        name = getattr(tokenizer, "path", type(tokenizer).__name__)
        raise sources.DataError(
            f"tokenizer {name} has {tokenizer.vocab_size} token ids but the model's vocab_size "
            f"is {model_vocab_size}: ids >= {model_vocab_size} would have no embedding row; "
            f"raise the model's vocab_size to at least {tokenizer.vocab_size}"
        )


def _mentions_byte_level(node: object) -> bool:
    """Whether a pre_tokenizer/decoder spec (possibly a Sequence of them) is ByteLevel."""
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return True
        return any(_mentions_byte_level(v) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
        return any(_mentions_byte_level(v) for v in node)
    return False


def _token_byte_length(token: str, byte_level: bool, unicode_to_byte: dict[str, int]) -> int:
    if byte_level:
        # GPT-2 style: every byte is spelled as one printable character; a character outside
        # the table is an ordinary (e.g. merged non-byte-level) character.
        return sum(1 if c in unicode_to_byte else len(c.encode("utf-8")) for c in token)
    if _BYTE_FALLBACK.match(token):  # SentencePiece byte fallback, e.g. <0xE2>
        return 1
    return len(token.replace("\u2581", " ").encode("utf-8"))  # SentencePiece's word marker


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel tokenizers."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
