"""Our safetensors reader and writer against the safetensors library, byte for byte."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.convert import safetensors_io as st
from deepseek_jax.convert.errors import ConversionError


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.bf16": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),
        "c.f8": rng.standard_normal((4, 4)).astype(ml_dtypes.float8_e4m3fn),
        "d.i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "e.scalar": np.asarray(1.5, np.float32),
        "f.empty": np.zeros((0, 3), np.float32),
    }


def test_write_then_read_with_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import load_file

    tensors = _tensors()
    planned = [st.Planned(n, a.shape, a.dtype) for n, a in tensors.items()]
    st.write_file(tmp_path / "x.safetensors", planned, lambda p: tensors[p.name])
    theirs = load_file(tmp_path / "x.safetensors")
    assert set(theirs) == set(tensors)
    for name, arr in tensors.items():
        raw = theirs[name].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        assert raw == arr.tobytes() and tuple(theirs[name].shape) == arr.shape, name
    assert theirs["c.f8"].dtype == torch.float8_e4m3fn and theirs["b.bf16"].dtype == torch.bfloat16


def test_read_files_written_by_safetensors_library(tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    want = {
        "w": torch.randn(6, 9, generator=g).to(torch.float8_e4m3fn),
        "s": torch.randn(2, 3, generator=g),
        "h": torch.randn(5, generator=g).bfloat16(),
    }
    save_file(want, tmp_path / "y.safetensors", metadata={"format": "pt"})
    f = st.SafetensorsFile(tmp_path / "y.safetensors")
    assert f.metadata == {"format": "pt"}
    assert {n: i.dtype for n, i in f.tensors.items()} == {"w": "F8_E4M3", "s": "F32", "h": "BF16"}
    for name, t in want.items():
        got = f.read(name)
        assert got.tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes()
        assert got.shape == tuple(t.shape)


def test_sizes_and_shard_plan():
    assert st.parse_size("5GB") == 5 * 10**9 and st.parse_size("2GiB") == 2 * 2**30
    assert st.parse_size("500MB") == 500 * 10**6 and st.parse_size("1024") == 1024
    with pytest.raises(ConversionError, match="--shard-size"):
        st.parse_size("five gigs")
    f4 = np.dtype(np.float32)
    plan = st.plan_shards(
        [st.Planned(str(i), (n,), f4) for i, n in enumerate([10, 10, 40, 5])], max_bytes=80
    )
    assert [[t.name for t in s] for s in plan] == [["0", "1"], ["2"], ["3"]]  # 160 B alone


def test_rejects_holes_and_unknown_dtypes(tmp_path):
    import json

    def write(header: dict, data: bytes):
        raw = json.dumps(header).encode()
        (tmp_path / "z.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)

    write({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)
    with pytest.raises(ConversionError, match="z.safetensors.*tensor a starts at byte 4"):
        st.SafetensorsFile(tmp_path / "z.safetensors")
    write({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(ConversionError, match="tensor a has unknown dtype 'Q4'"):
        st.SafetensorsFile(tmp_path / "z.safetensors")
    write({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6)
    with pytest.raises(ConversionError, match="2 trailing bytes"):
        st.SafetensorsFile(tmp_path / "z.safetensors")
