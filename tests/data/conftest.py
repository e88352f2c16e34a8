"""Fixtures shared by the data tests: a small text corpus and an offline-trained tokenizer.json."""

import pytest

from tests.data import corpora


@pytest.fixture
def text_dir(tmp_path):
    return corpora.write_docs(str(tmp_path / "corpus"))


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory):
    """A tiny byte-level BPE (GPT-2 style) trained here, offline, on a few strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpora.DOCS.values()) * 3, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)
