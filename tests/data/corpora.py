"""Small corpora written on the fly for the data tests."""

import os

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


def write_array_record(path, records: list[bytes]) -> None:
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
