"""Peak host memory of checkpoint conversion on a synthetic multi-shard checkpoint of a few GB.

  PYTHONPATH=. python bench/convert_memory.py [--workdir=/tmp/convert_bench] [--shard-size=1GB]

Writes an official-style checkpoint for a wide config (~1.5 B parameters: bf16 embeddings, norms
and router; the linear weights of odd layers and of the MTP layer in FP8 with 128x128 scales, of
even layers in bf16), then runs, each in its own process, `from-hf` on it, `to-hf` (bf16) back
from the result, and `from-hf` on a tiny checkpoint (the fixed cost of the libraries). Peak RSS
comes from GNU time (/usr/bin/time -f %M). The target: from-hf peak < 1.5 x largest shard + the
fixed cost.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import zlib

import ml_dtypes
import numpy as np

from deepseek_jax.convert import fp8, hf_config, mapping
from deepseek_jax.convert import safetensors_io as st
from deepseek_jax.model import config as config_lib

WIDE = config_lib.ModelConfig(
    vocab_size=32000,
    d_model=2048,
    n_layers=6,
    first_k_dense_replace=1,
    intermediate_size=5632,
    n_heads=16,
    q_lora_rank=768,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=32,
    n_shared_experts=1,
    moe_intermediate_size=1024,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    mtp_depth=1,
)
TINY = config_lib.ModelConfig(mtp_depth=1)
BF16 = np.dtype(ml_dtypes.bfloat16)


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def write_checkpoint(cfg: config_lib.ModelConfig, out: pathlib.Path, shard_size: int) -> None:
    """Random official-style checkpoint, generated and written one tensor at a time."""
    out.mkdir(parents=True)
    planned, source = [], {}
    for spec in mapping.tensor_specs(cfg):
        layer = _layer(spec.hf_name)
        quantized = spec.fp8_quantized and layer is not None and layer % 2 == 1
        seed_name = spec.copy_of or spec.hf_name  # copies hold the same values
        if quantized:
            planned.append(st.Planned(spec.hf_name, spec.hf_shape, fp8.E4M3))
            planned.append(
                st.Planned(
                    fp8.scale_name(spec.hf_name),
                    fp8.scale_shape(spec.hf_shape),
                    np.dtype(np.float32),
                )
            )
            source[fp8.scale_name(spec.hf_name)] = (seed_name, "scale")
            source[spec.hf_name] = (seed_name, "q")
        else:
            dtype = np.dtype(np.float32) if spec.bias else BF16
            planned.append(st.Planned(spec.hf_name, spec.hf_shape, dtype))
            source[spec.hf_name] = (seed_name, "plain")
    shapes = {s.hf_name: s.hf_shape for s in mapping.tensor_specs(cfg)}
    last: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def values(seed_name: str, shape) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(seed_name.encode()))
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    def produce(p: st.Planned) -> np.ndarray:
        seed_name, kind = source[p.name]
        if kind == "plain":
            return values(seed_name, p.shape).astype(p.dtype)
        if seed_name not in last:  # the weight comes right before its scale
            last.clear()
            last[seed_name] = fp8.quantize(values(seed_name, shapes[seed_name]))
        q, s = last[seed_name]
        return q if kind == "q" else s

    st.write_sharded(out, planned, shard_size, produce)
    hf = hf_config.to_hf_config(cfg, torch_dtype="bfloat16")
    hf["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (out / "config.json").write_text(json.dumps(hf, indent=2))


def run(argv: list[str], work: pathlib.Path) -> tuple[int, float]:
    """(peak RSS bytes, wall seconds) of one command.

    GNU time forks the command from its own small process: rusage of a child forked from this
    (big) one would count the pages it shared with us before exec."""
    report = work / "time.txt"
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-o", str(report), "-f", "%M"] + argv,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}")
    return int(report.read_text().split()[-1]) * 1024, time.perf_counter() - start


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/convert_bench"))
    p.add_argument("--shard-size", default="1GB")
    args = p.parse_args()
    work = args.workdir
    shard_size = st.parse_size(args.shard_size)
    hf_dir, tiny_dir = work / f"hf_{args.shard_size}", work / "hf_tiny"
    if not hf_dir.exists():
        t = time.perf_counter()
        write_checkpoint(WIDE, hf_dir, shard_size)
        print(f"wrote synthetic checkpoint in {time.perf_counter() - t:.0f}s")
    if not tiny_dir.exists():
        write_checkpoint(TINY, tiny_dir, shard_size)
    shards = sorted(hf_dir.glob("*.safetensors"))
    sizes = [s.stat().st_size for s in shards]
    n_params = sum(
        int(np.prod(s.hf_shape)) for s in mapping.tensor_specs(WIDE) if s.copy_of is None
    )
    cli = [sys.executable, "-m", "deepseek_jax.convert"]
    for d in ("step", "step_tiny", "hf_back"):
        shutil.rmtree(work / d, ignore_errors=True)
    fixed, _ = run(cli + ["from-hf", f"--hf-dir={tiny_dir}", f"--out={work / 'step_tiny'}"], work)
    peak, wall = run(cli + ["from-hf", f"--hf-dir={hf_dir}", f"--out={work / 'step'}"], work)
    back_peak, back_wall = run(
        cli
        + [
            "to-hf",
            f"--checkpoint={work / 'step'}",
            f"--out={work / 'hf_back'}",
            f"--shard-size={args.shard_size}",
        ],
        work,
    )
    out_bytes = sum(f.stat().st_size for f in (work / "step").rglob("*") if f.is_file())
    print(
        f"checkpoint: {len(shards)} shards, {gb(sum(sizes))} total, largest {gb(max(sizes))}; "
        f"{n_params / 1e9:.2f} B params -> {gb(out_bytes)} float32 orbax output"
    )
    print(f"fixed cost (from-hf of a tiny model): peak RSS {gb(fixed)}")
    print(
        f"from-hf: peak RSS {gb(peak)} in {wall:.0f}s; 1.5 x largest shard + fixed = "
        f"{gb(1.5 * max(sizes) + fixed)}; over fixed: {gb(peak - fixed)} "
        f"= {(peak - fixed) / max(sizes):.2f} x largest shard"
    )
    print(f"to-hf (bf16): peak RSS {gb(back_peak)} in {back_wall:.0f}s")


if __name__ == "__main__":
    main()
