"""Sources: listing order and keys, and the documents each kind yields."""

import json
import os

import pytest

from deepseek_jax.data import config, sources
from tests.data import corpora


def _text_cfg(*paths, **kw):
    return config.DataConfig(source=config.SourceKind.TEXT, paths=tuple(paths), **kw)


def _docs(cfg):
    skipped = []
    return list(sources.read_documents(cfg, sources.list_files(cfg), skipped)), skipped


def test_stdlib_listing_is_sorted_python_only_and_excludes_third_party_and_tests():
    files = sources.list_files(config.DataConfig())
    keys = [f.key for f in files]
    assert keys == sorted(keys) and len(keys) == len(set(keys))
    assert "os.py" in keys and "json/__init__.py" in keys
    assert all(k.endswith(".py") for k in keys)
    parts = {p for k in keys for p in k.split("/")[:-1]}
    assert not parts & {"site-packages", "dist-packages", "__pycache__", "test", "tests"}
    with_tests = [f.key for f in sources.list_files(config.DataConfig(stdlib_include_tests=True))]
    assert set(keys) < set(with_tests)
    assert any(k.startswith("test/") for k in with_tests)
    assert all(f.path.startswith(sources.stdlib_root()) for f in files)


def test_text_directory_file_and_glob_keys(text_dir):
    docs, skipped = _docs(_text_cfg(text_dir))
    assert not skipped
    assert [d.key for d in docs] == sorted(f"corpus/{k}" for k in corpora.DOCS)
    assert {d.key: d.text for d in docs}["corpus/sub/e.txt"] == corpora.DOCS["sub/e.txt"]
    one, _ = _docs(_text_cfg(os.path.join(text_dir, "a.txt")))
    assert [d.key for d in one] == ["corpus/a.txt"]
    globbed, _ = _docs(_text_cfg(os.path.join(text_dir, "sub", "*.txt")))
    assert [d.key for d in globbed] == ["sub/e.txt", "sub/f.txt", "sub/g.txt"]


def test_overlapping_entries_count_each_file_once_and_hidden_files_are_ignored(text_dir):
    with open(os.path.join(text_dir, ".hidden"), "w") as fh:
        fh.write("secret")
    docs, _ = _docs(_text_cfg(text_dir, os.path.join(text_dir, "sub")))
    keys = [d.key for d in docs]
    assert len(keys) == len(corpora.DOCS) and not any("hidden" in k for k in keys)


def test_jsonl_documents_are_lines_with_the_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"body": "first ü"}), "", json.dumps({"body": "second", "id": 2}), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    cfg = config.DataConfig(source=config.SourceKind.JSONL, paths=(str(path),), text_field="body")
    docs, skipped = _docs(cfg)
    assert [(d.key, d.text) for d in docs] == [
        (f"{tmp_path.name}/d.jsonl:1", "first ü"),
        (f"{tmp_path.name}/d.jsonl:3", "second"),
    ]
    assert not skipped


def test_array_record_documents_are_records(tmp_path):
    path = tmp_path / "d.array_record"
    corpora.write_array_record(path, [b"one", "zwei \xfc".encode(), b"three"])
    cfg = config.DataConfig(source=config.SourceKind.ARRAY_RECORD, paths=(str(path),))
    docs, _ = _docs(cfg)
    assert [d.text for d in docs] == ["one", "zwei \xfc", "three"]
    assert docs[1].key.endswith("d.array_record#1")


def test_missing_path_glob_without_match_and_empty_directory(tmp_path, text_dir):
    with pytest.raises(sources.DataError, match=r"data.paths\[1\]: no such file or directory"):
        sources.list_files(_text_cfg(text_dir, str(tmp_path / "nope.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.DataError, match=r"data.paths\[0\]: the glob .* matches no files"):
        sources.list_files(_text_cfg(str(tmp_path / "*.txt")))
    with pytest.raises(sources.DataError, match=r"directory .* contains no files"):
        sources.list_files(_text_cfg(str(tmp_path / "empty")))


def test_fingerprint_changes_when_a_file_changes(text_dir):
    cfg = _text_cfg(text_dir)
    before = sources.fingerprint(cfg, sources.list_files(cfg))
    with open(os.path.join(text_dir, "c.txt"), "a") as fh:
        fh.write("more")
    assert sources.fingerprint(cfg, sources.list_files(cfg)) != before
