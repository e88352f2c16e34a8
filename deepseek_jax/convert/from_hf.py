"""Hugging Face / official DeepSeek checkpoint -> our checkpoint (or in-memory arrays for scoring).

Everything that can be wrong with the input is found from config.json and the safetensors headers
alone, before any tensor data is read: unknown model type, missing or extra tensors, shapes,
dtypes, FP8 scales. Then each leaf of our state is filled slice by slice: one HF tensor is read
(a pread of exactly its bytes), dequantised if FP8, transposed into our layout and written, so host
memory holds about one tensor at a time; the embedding and head, the largest single tensors, are
read and written in blocks of rows.

MTP: config.json's num_nextn_predict_layers (transformers' default is 1 even for models saved
without MTP weights) is trusted only when tensors at layer index num_hidden_layers exist; with no
such tensors the model is imported without MTP. The MTP copies of the embedding and head
(`embed_tokens`, `shared_head.head`) must be present but are not read: our MTP shares the main
embedding and head, as every released implementation does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np

from deepseek_jax.convert import ckpt_io, fp8, hf_config, mapping, outdir
from deepseek_jax.convert import safetensors_io as st
from deepseek_jax.convert.errors import ConversionError, first_few
from deepseek_jax.model import config as config_lib

WEIGHT_DTYPES = ("F32", "BF16", "F16", "F64")  # plus F8_E4M3 with a scale
ROW_BLOCK_BYTES = 32 * 2**20  # unstacked 2-D leaves above this (float32) go in row blocks


@dataclasses.dataclass
class Source:
    path: pathlib.Path
    hf: dict[str, Any]  # config.json
    cfg: config_lib.ModelConfig
    files: st.HFDirectory
    block: int  # FP8 block size
    specs: list[mapping.TensorSpec]
    notes: list[str]


def read_hf_config(hf_dir: pathlib.Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: not found (is {hf_dir} a Hugging Face checkpoint?)")
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return d


def open_source(hf_dir: pathlib.Path) -> Source:
    """Reads config.json and every header, and validates the tensor set; reads no tensor data."""
    hf_dir = pathlib.Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a directory")
    hf = read_hf_config(hf_dir)
    try:
        cfg = hf_config.from_hf_config(hf)
    except (ValueError, TypeError) as e:  # TypeError: a value of the wrong JSON type
        raise ConversionError(
            f"{hf_dir / 'config.json'}: {str(e).removeprefix('config.json: ')}"
        ) from None
    block = fp8.block_size(hf) or fp8.DEFAULT_BLOCK
    files = st.HFDirectory(hf_dir)
    notes = []
    mtp_prefix = f"model.layers.{cfg.n_layers}."
    if cfg.mtp_depth and not any(n.startswith(mtp_prefix) for n in files.where):
        notes.append(
            f"config.json says num_nextn_predict_layers={cfg.mtp_depth} but there are "
            f"no {mtp_prefix}* tensors: importing without MTP"
        )
        cfg = dataclasses.replace(cfg, mtp_depth=0)
    specs = mapping.tensor_specs(cfg)
    _validate(files, specs, block)
    return Source(hf_dir, hf, cfg, files, block, specs, notes)


def _validate(files: st.HFDirectory, specs: list[mapping.TensorSpec], block: int) -> None:
    expected = {s.hf_name: s for s in specs}
    present = set(files.where)
    missing = expected.keys() - present
    if missing:
        raise ConversionError(f"{files.path}: missing tensors {first_few(missing)}")
    scales = {fp8.scale_name(n) for n in expected if files.info(n).dtype == "F8_E4M3"}
    extra = present - expected.keys() - scales
    if extra:
        where = sorted({files.where[n].path.name for n in extra})
        raise ConversionError(
            f"{files.path}: unexpected tensors {first_few(extra)} (in "
            f"{first_few(where, 3)}); they are not part of this config"
        )
    for name, spec in expected.items():
        info, file = files.info(name), files.where[name].path.name
        if info.shape != spec.hf_shape:
            raise ConversionError(
                f"tensor {name} in {file}: shape {list(info.shape)}, expected {list(spec.hf_shape)}"
            )
        if info.dtype == "F8_E4M3":
            _validate_scale(files, name, info, block)
        elif info.dtype not in WEIGHT_DTYPES:
            raise ConversionError(
                f"tensor {name} in {file}: dtype {info.dtype} is not a "
                f"floating-point weight ({', '.join(WEIGHT_DTYPES)}, or "
                "F8_E4M3 with a _scale_inv)"
            )


def _validate_scale(files: st.HFDirectory, name: str, info: st.TensorInfo, block: int) -> None:
    sname = fp8.scale_name(name)
    file = files.where[name].path.name
    if len(info.shape) != 2:
        raise ConversionError(f"tensor {name} in {file}: F8_E4M3 but not a matrix")
    if sname not in files.where:
        raise ConversionError(f"tensor {name} in {file}: F8_E4M3 without its scale {sname}")
    s = files.info(sname)
    want = fp8.scale_shape(info.shape, block)
    if s.dtype != "F32" or s.shape != want:
        raise ConversionError(
            f"tensor {sname} in {files.where[sname].path.name}: "
            f"{s.dtype}{list(s.shape)}, expected F32{list(want)} for "
            f"{block}x{block} blocks of {list(info.shape)}"
        )


def read_float32(src: Source, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """One HF tensor (or rows [a, b), a block-aligned) as float32, dequantised if FP8."""
    arr = src.files.read(name, rows)
    if src.files.info(name).dtype == "F8_E4M3":
        scale = src.files.read(fp8.scale_name(name))
        if rows is not None:
            scale = scale[rows[0] // src.block : -(-rows[1] // src.block)]
        return fp8.dequantize(arr, scale, src.block)
    return arr.astype(np.float32)


def _leaf(
    src: Source,
    shape: tuple[int, ...],
    dtype: np.dtype,
    by_index: dict[tuple[int, ...], mapping.TensorSpec],
) -> ckpt_io.LazyLeaf:
    lead = len(next(iter(by_index)))
    spec = next(iter(by_index.values()))
    if (
        lead == 0
        and len(shape) == 2
        and spec.in_rank in (None, 1)
        and math.prod(shape) * 4 > ROW_BLOCK_BYTES
    ):
        # Embedding / output head: written in blocks of HF rows, read as byte ranges, so neither
        # the HF tensor nor our float32 leaf is ever whole in memory. HF rows are our rows for
        # the embedding and our columns for a [in, out] kernel.
        axis = 0 if spec.in_rank is None else 1
        row_bytes = spec.hf_shape[1] * 4
        rows = max(src.block, ROW_BLOCK_BYTES // row_bytes // src.block * src.block)
        chunk = (rows, shape[1]) if axis == 0 else (shape[0], rows)

        def fill_rows(region: tuple[slice, ...]) -> np.ndarray:
            r = region[axis]
            block = read_float32(src, spec.hf_name, (r.start, r.stop))
            return (block if axis == 0 else block.T).astype(dtype, copy=False)

        return ckpt_io.LazyLeaf(shape, dtype, chunk, fill_rows)
    chunk = (1,) * lead + shape[lead:]

    def fill(region: tuple[slice, ...]) -> np.ndarray:
        s = by_index[tuple(r.start for r in region[:lead])]
        ours = s.from_hf(read_float32(src, s.hf_name), shape[lead:])
        return ours.astype(dtype, copy=False).reshape(chunk)

    return ckpt_io.LazyLeaf(shape, dtype, chunk, fill)


def lazy_leaves(src: Source) -> dict[str, dict[mapping.Path, ckpt_io.LazyLeaf]]:
    """Our state as LazyLeafs whose fill reads, dequantises and transposes HF tensors."""
    leaves = mapping.model_leaves(src.cfg)
    out: dict[str, dict[mapping.Path, ckpt_io.LazyLeaf]] = {c: {} for c in leaves}
    for (collection, path), by_index in mapping.leaf_slots(src.specs, leaves).items():
        shape, dtype = leaves[collection][path]
        out[collection][path] = _leaf(src, shape, dtype, by_index)
    return out


def load_arrays(src: Source) -> dict[str, dict[mapping.Path, np.ndarray]]:
    """The whole state in memory (for scoring an HF directory directly)."""
    out: dict[str, dict[mapping.Path, np.ndarray]] = {}
    for collection, leaves in lazy_leaves(src).items():
        out[collection] = {}
        for path, leaf in leaves.items():
            arr = np.empty(leaf.shape, leaf.dtype)
            for region in leaf.regions():
                arr[region] = leaf.fill(region)
            out[collection][path] = arr
    return out


def convert(hf_dir: pathlib.Path, out: pathlib.Path, *, overwrite: bool = False) -> Source:
    """from-hf: validates everything, then writes a step-0 checkpoint directory at `out`."""
    out = pathlib.Path(out)
    outdir.check_target(out, overwrite)
    src = open_source(hf_dir)
    for note in src.notes:
        print(f"note: {note}")
    state = lazy_leaves(src)
    config = {
        "model": src.cfg.to_dict(),
        "source": {
            "format": "huggingface",
            "path": str(pathlib.Path(hf_dir).resolve()),
            "model_type": src.hf.get("model_type"),
            "fp8": any(f.dtype == "F8_E4M3" for f in _all_infos(src)),
        },
    }
    with outdir.atomic_path(out, overwrite) as tmp:
        ckpt_io.write_step(
            tmp,
            config,
            ckpt_io.nest(state[ckpt_io.PARAMS]),
            ckpt_io.nest(state[ckpt_io.EXPERT_BIAS]),
            step=0,
        )
    return src


def _all_infos(src: Source):
    for f in src.files.files:
        yield from f.tensors.values()
