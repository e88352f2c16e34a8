"""Safetensors files and sharded checkpoint directories, read and written one tensor at a time.

We parse the format ourselves (8-byte little-endian header length, a JSON header, then the raw
tensor bytes) instead of using `safetensors.numpy`, for three reasons: numpy has no bfloat16 or
float8 dtypes (`safe_open(framework="np")` fails on both), so those are reinterpreted with
ml_dtypes; every header can be validated against the file size before any data is read, so a
truncated or corrupt shard is reported by name up front; and each read is a `pread` of exactly one
tensor, so host memory holds one tensor, never a whole shard. Nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from deepseek_jax.convert.errors import ConversionError, first_few

if sys.byteorder != "little":  # safetensors is little-endian and we reinterpret raw bytes
    raise ImportError("deepseek_jax.convert needs a little-endian host")

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


class SafetensorsFile:
    """Header of one file, validated against its size; `read` fetches one tensor."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.tensors, self.metadata = _read_header(self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or rows [a, b) of its first dimension (a contiguous byte range)."""
        info = self.tensors[name]
        offset, nbytes, shape = info.offset, info.nbytes, info.shape
        if rows is not None:
            a, b = rows
            row_bytes = nbytes // shape[0] if shape[0] else 0
            offset, nbytes = offset + a * row_bytes, (b - a) * row_bytes
            shape = (b - a,) + shape[1:]
        buf = np.empty(nbytes, np.uint8)
        view = memoryview(buf)
        done = 0
        with open(self.path, "rb") as f:
            fd = f.fileno()
            while done < nbytes:  # pread returns at most ~2 GiB per call
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise ConversionError(f"{self.path}: truncated while reading tensor {name}")
                done += n
        return buf.view(DTYPES[info.dtype]).reshape(shape)


def _read_header(path: pathlib.Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{path}: truncated ({size} bytes; not a safetensors file)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise ConversionError(
                    f"{path}: corrupt or truncated safetensors file (header "
                    f"length {n} does not fit in {size} bytes)"
                )
            raw = f.read(n)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_len = 8 + n, size - 8 - n
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"bad shape {entry['shape']}")
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{path}: corrupt header entry for tensor {name} ({e})") from None
        if dtype not in DTYPES:
            raise ConversionError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise ConversionError(
                f"{path}: corrupt header, tensor {name} spans bytes "
                f"[{begin}, {end}) but {dtype}{list(shape)} needs {expected}"
            )
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, expected)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise ConversionError(
                f"{path}: corrupt header, tensor {name} starts at byte {begin}, "
                f"expected {pos} (holes or overlaps)"
            )
        pos = end
    if pos > data_len:
        raise ConversionError(
            f"{path}: truncated, the header describes {pos} bytes of tensor "
            f"data but the file holds {data_len}"
        )
    if pos < data_len:
        raise ConversionError(
            f"{path}: corrupt, {data_len - pos} trailing bytes not described by the header"
        )
    return tensors, metadata


class HFDirectory:
    """All tensors of a Hugging Face checkpoint directory (single file or index + shards)."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        index = self.path / INDEX_NAME
        if index.exists():
            self._open_indexed(index)
        elif (self.path / SINGLE_NAME).exists():
            self._add(SafetensorsFile(self.path / SINGLE_NAME))
        else:
            pickles = [p.name for p in self.path.glob("*") if p.suffix in _PICKLE_SUFFIXES]
            hint = (
                f"; found {first_few(pickles)}, which are pickle files and are never loaded"
                " (convert them to safetensors first)"
                if pickles
                else ""
            )
            raise ConversionError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME}{hint}")

    def _open_indexed(self, index: pathlib.Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a valid safetensors index ({e})") from None
        for shard in sorted(set(weight_map.values())):
            shard_path = self.path / shard
            if pathlib.PurePath(shard).name != shard or not shard.endswith(".safetensors"):
                raise ConversionError(
                    f"{index}: shard name {shard!r} is not a .safetensors file in this directory"
                )
            if not shard_path.exists():
                raise ConversionError(f"{index}: names shard {shard}, which does not exist")
            self._add(SafetensorsFile(shard_path))
        for name, shard in weight_map.items():
            if name not in self.where:
                raise ConversionError(
                    f"tensor {name}: {index.name} maps it to {shard}, which does not contain it"
                )
            if self.where[name].path.name != shard:
                raise ConversionError(
                    f"tensor {name}: {index.name} maps it to {shard} but it is "
                    f"in {self.where[name].path.name}"
                )
        unlisted = set(self.where) - set(weight_map)
        if unlisted:
            raise ConversionError(
                f"{index}: tensors present in shards but not in the index: {first_few(unlisted)}"
            )

    def _add(self, f: SafetensorsFile) -> None:
        for name in f.tensors:
            if name in self.where:
                raise ConversionError(
                    f"tensor {name}: in both {self.where[name].path.name} and {f.path.name}"
                )
            self.where[name] = f
        self.files.append(f)

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.where[name].read(name, rows)


# -- writing ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Planned:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '2GiB' -> 2**31, '500MB', '1024' (bytes): transformers' conventions."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConversionError(f"--shard-size: cannot parse {text!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise ConversionError(f"--shard-size: must be positive, got {text!r}")
    return size


def plan_shards(tensors: Iterable[Planned], max_bytes: int) -> list[list[Planned]]:
    """Greedy packing in the given order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[Planned]] = [[]]
    used = 0
    for t in tensors:
        if shards[-1] and used + t.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += t.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_file(
    path: pathlib.Path,
    tensors: list[Planned],
    produce: Callable[[Planned], np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes the header for `tensors`, then each tensor's bytes as `produce` returns it."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    pos = 0
    for t in tensors:
        header[t.name] = {
            "dtype": CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            arr = np.asarray(produce(t))
            if not arr.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
                arr = arr.copy(order="C")
            if arr.shape != t.shape or arr.dtype != t.dtype:
                raise AssertionError(
                    f"{t.name}: produced {arr.dtype}{arr.shape}, planned {t.dtype}{t.shape}"
                )
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def write_sharded(
    out_dir: pathlib.Path,
    tensors: list[Planned],
    max_bytes: int,
    produce: Callable[[Planned], np.ndarray],
) -> list[str]:
    """Shards + model.safetensors.index.json (written even for one shard); returns file names."""
    shards = plan_shards(tensors, max_bytes)
    names = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        write_file(out_dir / name, shard, produce)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names
