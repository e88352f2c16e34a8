"""Tokenizers: round trips, byte counts per token, special ids, vocab checks."""

import json

import numpy as np
import pytest

from deepseek_jax.data import config, sources, tokenizers

TEXT = "Grüße aus Köln — ünïcödé ✓ 日本語 new words never seen: ẞ 😀\n\ttabs and  spaces"


def test_byte_tokenizer_round_trip_and_ids():
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    assert tok.decode(np.append(ids, [tok.eos_id, tok.pad_id])) == TEXT  # specials are dropped
    assert int(tok.token_bytes[ids].sum()) == len(TEXT.encode("utf-8"))
    assert tok.token_bytes[tok.eos_id] == 0 and tok.token_bytes[tok.pad_id] == 0


def test_hf_tokenizer_round_trip_and_token_bytes(hf_tokenizer_path):
    tok = tokenizers.build_tokenizer(
        config.DataConfig(tokenizer=config.TokenizerKind.HF, tokenizer_path=hf_tokenizer_path)
    )
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges were learned, so this is not bytes
    # Byte-level BPE: the bytes of the tokens are exactly the text's bytes.
    assert int(tok.token_bytes[ids].sum()) == len(TEXT.encode("utf-8"))
    assert tok.eos_id == 0 and tok.pad_id == 0 and tok.token_bytes[0] == 0
    assert tok.vocab_size == 320


def test_hf_explicit_special_tokens(hf_tokenizer_path):
    tok = tokenizers.HFTokenizer(hf_tokenizer_path, eos_token="<|endoftext|>", pad_token="<pad>")
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    with pytest.raises(sources.DataError, match=r"data.eos_token: '</s>' is not in the vocab"):
        tokenizers.HFTokenizer(hf_tokenizer_path, eos_token="</s>")


def test_hf_without_a_known_eos_asks_for_data_eos_token(tmp_path, hf_tokenizer_path):
    spec = json.loads(open(hf_tokenizer_path, encoding="utf-8").read())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|endoftext|>"]
    del spec["model"]["vocab"]["<|endoftext|>"]
    path = tmp_path / "noeos.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(sources.DataError, match="set data.eos_token"):
        tokenizers.HFTokenizer(str(path))


def test_hf_truncation_in_the_file_is_ignored(tmp_path, hf_tokenizer_path):
    spec = json.loads(open(hf_tokenizer_path, encoding="utf-8").read())
    spec["truncation"] = {
        "direction": "Right",
        "max_length": 4,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    path = tmp_path / "trunc.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    tok = tokenizers.HFTokenizer(str(path))
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_missing_and_malformed_tokenizer_files(tmp_path):
    with pytest.raises(sources.DataError, match="no such file.*never downloaded"):
        tokenizers.HFTokenizer(str(tmp_path / "tokenizer.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(sources.DataError, match="is not a valid tokenizer.json"):
        tokenizers.HFTokenizer(str(bad))


def test_vocab_larger_than_the_model_names_both_numbers(hf_tokenizer_path):
    tok = tokenizers.HFTokenizer(hf_tokenizer_path)
    tokenizers.check_vocab(tok, 320)
    with pytest.raises(
        sources.DataError, match=r"has 320 token ids but the model's vocab_size is 300"
    ):
        tokenizers.check_vocab(tok, 300)
    with pytest.raises(sources.DataError, match=r"258 token ids .* vocab_size is 257"):
        tokenizers.check_vocab(tokenizers.ByteTokenizer(), 257)


def test_sentencepiece_style_token_byte_lengths():
    table = {c: b for b, c in tokenizers._bytes_to_unicode().items()}
    assert tokenizers._token_byte_length("\u2581the", False, table) == 4
    assert tokenizers._token_byte_length("<0xE2>", False, table) == 1
    assert tokenizers._token_byte_length("Ġthe", True, table) == 4
    assert tokenizers._token_byte_length("Ã¼", True, table) == 2  # "ü" spelled as two bytes
