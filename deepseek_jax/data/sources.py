"""Document sources: the stdlib corpus, text files, JSON lines and ArrayRecord files.

A source is listed first (`list_files`: cheap, stat only, sorted, so every machine sees the same
order) and then read document by document (`read_documents`). Every problem is reported with the
file, and the line or record, that caused it. With `skip_bad_records` a bad document is skipped and
recorded instead; configuration errors (a missing path, a glob matching nothing) always raise.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator

from deepseek_jax import errors
from deepseek_jax.data import config as config_lib

SourceKind = config_lib.SourceKind

# Directories never part of the stdlib corpus: third-party code and bytecode caches.
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


class DataError(errors.UserError, ValueError):
    """Bad input data or a bad data path; the message names the file and line or record."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    path: str  # absolute path, for reading and messages
    key: str  # stable relative name: hashed for the split, part of document keys


@dataclasses.dataclass(frozen=True)
class Document:
    key: str  # stable identity, e.g. "json/a.jsonl:12"; decides the held-out split
    where: str  # location for messages, e.g. "/data/json/a.jsonl line 12"
    text: str


def stdlib_root() -> str:
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def list_files(cfg: config_lib.DataConfig) -> list[SourceFile]:
    """All files of the configured source, sorted by key, without reading them."""
    if cfg.source is SourceKind.STDLIB:
        return _list_stdlib(cfg.stdlib_include_tests)
    files: list[SourceFile] = []
    seen_real: set[str] = set()
    seen_keys: dict[str, str] = {}
    for i, entry in enumerate(cfg.paths):
        for f in _expand_entry(i, entry):
            real = os.path.realpath(f.path)
            if real in seen_real:  # the same file named twice (e.g. a dir and a glob) counts once
                continue
            seen_real.add(real)
            if f.key in seen_keys:
                raise DataError(
                    f"data.paths: {seen_keys[f.key]} and {f.path} share the "
                    f"document key {f.key!r}; rename one of them"
                )
            seen_keys[f.key] = f.path
            files.append(f)
    files.sort(key=lambda f: f.key)
    return files


def fingerprint(cfg: config_lib.DataConfig, files: list[SourceFile]) -> str:
    """Hash of everything that decides the documents' text: names, sizes, mtimes and options."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [cfg.source.name, cfg.text_field, cfg.stdlib_include_tests, cfg.skip_bad_records]
        ).encode()
    )
    for f in files:
        try:
            st = os.stat(f.path)
            h.update(f"{f.key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f.key}\0unreadable\n".encode())  # reading reports it properly
    return h.hexdigest()


def read_documents(
    cfg: config_lib.DataConfig, files: list[SourceFile], skipped: list[str]
) -> Iterator[Document]:
    """Yields the documents of `files` in order; bad ones raise or are appended to `skipped`."""
    for f in files:
        if cfg.source is SourceKind.JSONL:
            yield from _read_jsonl(cfg, f, skipped)
        elif cfg.source is SourceKind.ARRAY_RECORD:
            yield from _read_array_record(cfg, f, skipped)
        else:
            # The stdlib ships deliberately empty __init__.py files and a few test fixtures in
            # legacy encodings; leaving those out is part of the corpus definition, not an error.
            lenient = cfg.source is SourceKind.STDLIB or cfg.skip_bad_records
            raw = _read_bytes(f.path, f.path, lenient, skipped)
            if raw is None:
                continue
            text = _decode(raw, f.path, lenient, skipped)
            if text is not None:
                yield Document(f.key, f.path, text)


def _bad(where: str, reason: str, skip: bool, skipped: list[str]) -> None:
    if not skip:
        raise DataError(
            f"{where}: {reason} (set data.skip_bad_records=True to skip and count such documents)"
        )
    skipped.append(f"{where}: {reason}")


def _read_bytes(path: str, where: str, skip: bool, skipped: list[str]) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        _bad(where, f"cannot read file ({e.strerror or e})", skip, skipped)
        return None
    if not raw:
        _bad(where, "empty document", skip, skipped)
        return None
    return raw


def _decode(raw: bytes, where: str, skip: bool, skipped: list[str]) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _bad(where, f"invalid UTF-8 at byte {e.start}", skip, skipped)
        return None


def _read_jsonl(
    cfg: config_lib.DataConfig, f: SourceFile, skipped: list[str]
) -> Iterator[Document]:
    skip = cfg.skip_bad_records
    raw = _read_bytes(f.path, f.path, skip, skipped)
    if raw is None:
        return
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():  # blank lines (e.g. a trailing newline) carry no document
            continue
        where = f"{f.path} line {lineno}"
        text = _decode(line, where, skip, skipped)
        if text is None:
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            _bad(where, f"invalid JSON ({e.msg} at column {e.colno})", skip, skipped)
            continue
        if not isinstance(obj, dict) or cfg.text_field not in obj:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            _bad(
                where, f"no field {cfg.text_field!r} (data.text_field); found {keys}", skip, skipped
            )
            continue
        value = obj[cfg.text_field]
        if not isinstance(value, str):
            _bad(
                where,
                f"field {cfg.text_field!r} is {type(value).__name__}, not a string",
                skip,
                skipped,
            )
            continue
        if not value:
            _bad(where, f"field {cfg.text_field!r} is an empty string", skip, skipped)
            continue
        yield Document(f"{f.key}:{lineno}", where, value)


def _read_array_record(
    cfg: config_lib.DataConfig, f: SourceFile, skipped: list[str]
) -> Iterator[Document]:
    from array_record.python import array_record_module  # only this source needs it

    skip = cfg.skip_bad_records
    try:
        reader = array_record_module.ArrayRecordReader(f.path)
        records = reader.read_all()
        reader.close()
    except (OSError, RuntimeError, ValueError) as e:
        _bad(f.path, f"cannot read ArrayRecord file ({e})", skip, skipped)
        return
    if not records:
        _bad(f.path, "ArrayRecord file has no records", skip, skipped)
        return
    for index, raw in enumerate(records):
        where = f"{f.path} record {index}"
        if not raw:
            _bad(where, "empty document", skip, skipped)
            continue
        text = _decode(raw, where, skip, skipped)
        if text is not None:
            yield Document(f"{f.key}#{index}", where, text)


def _list_stdlib(include_tests: bool) -> list[SourceFile]:
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        excluded = _STDLIB_EXCLUDED_DIRS | (frozenset() if include_tests else _STDLIB_TEST_DIRS)
        dirnames[:] = [d for d in dirnames if d not in excluded and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                files.append(SourceFile(path, os.path.relpath(path, root).replace(os.sep, "/")))
    files.sort(key=lambda f: f.key)
    return files


def _expand_entry(index: int, entry: str) -> list[SourceFile]:
    """Files named by one `data.paths` entry; keys are relative to the parent of its root dir."""
    path = os.path.abspath(os.path.expanduser(entry))
    if any(c in entry for c in "*?["):
        # The static part of the pattern is the root, so keys do not depend on the cwd.
        static = path
        while any(c in static for c in "*?["):
            static = os.path.dirname(static)
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
        if not found:
            raise DataError(f"data.paths[{index}]: the glob {entry!r} matches no files")
        return [_file(p, os.path.dirname(static)) for p in found]
    if os.path.isdir(path):
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [os.path.join(dirpath, n) for n in filenames if not n.startswith(".")]
        if not found:
            raise DataError(f"data.paths[{index}]: the directory {entry!r} contains no files")
        return [_file(p, os.path.dirname(path)) for p in found]
    if os.path.lexists(path):  # a file, or a broken link that reading will report
        return [_file(path, os.path.dirname(os.path.dirname(path)))]
    raise DataError(f"data.paths[{index}]: no such file or directory: {entry!r}")


def _file(path: str, base: str) -> SourceFile:
    return SourceFile(path, os.path.relpath(path, base).replace(os.sep, "/"))
