"""Small corpora and an offline-trained tokenizer.json shared by the data tests."""

import os

import pytest

# Documents of very different lengths, with non-ASCII text, so windows straddle documents and
# multi-byte characters straddle windows.
DOCS = {
    "a.txt": "alpha " * 40,
    "b.txt": "Grüße aus Köln — ünïcödé ✓ " * 7,
    "c.txt": "x",
    "d.txt": "def f(x):\n    return x * 2\n" * 11,
    "sub/e.txt": "日本語のテキスト。" * 9,
    "sub/f.txt": "the quick brown fox jumps over the lazy dog\n" * 5,
    "sub/g.txt": "0123456789" * 23,
    "h.txt": "end.",
}


def write_docs(root: str, docs: dict[str, str] = DOCS) -> str:
    for rel, text in docs.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return root


@pytest.fixture
def text_dir(tmp_path):
    return write_docs(str(tmp_path / "corpus"))


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory):
    """A tiny byte-level BPE (GPT-2 style) trained here, offline, on a few strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(DOCS.values()) * 3, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)
