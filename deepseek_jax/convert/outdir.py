"""Atomic outputs: write under a temporary sibling name, rename into place only when complete.

An interrupted or failed conversion leaves no half-written output under the requested name, and an
existing output is replaced only with --overwrite, and only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from collections.abc import Iterator

from deepseek_jax.convert.errors import ConversionError


def check_target(out: pathlib.Path, overwrite: bool) -> None:
    """Fails early (before any heavy work) when `out` exists and may not be replaced."""
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise ConversionError(f"{out.parent}: output parent directory does not exist")


@contextlib.contextmanager
def atomic_path(out: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yields a fresh temporary path next to `out` (not created); on success renames it to `out`.

    The body creates the file or directory at the yielded path. On any exception the temporary
    output is removed and an existing `out` is left untouched.
    """
    out = pathlib.Path(out)
    check_target(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise AssertionError(f"{tmp}: nothing was written")
        if out.exists():  # --overwrite: move the old one aside only now that the new one is done
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    finally:
        _remove(tmp)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
