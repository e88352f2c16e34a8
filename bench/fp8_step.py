"""Train-step time under each matmul policy, and whether XLA emitted FP8 GEMMs (bench/fp8_gpu.sh).

    python bench/fp8_step.py [--config=configs/small.py] [--policies=bf16,fp8_blockwise]
        [--steps=10] [--set FIELD=VALUE ...] [--hlo_dir=DIR] [--json=FILE] [--target=h100]

For each policy: the jitted train step (train/step.py, what the trainer runs on one device) on a
synthetic batch, compiled once; the optimized HLO written to `--hlo_dir/<policy>.hlo.txt`; then
`--steps` timed steps after a warm-up. Step times are reported as ratios to the first policy.

The HLO census counts, in the optimized module (fused computations included):
- `f8_dots`: dot / convolution instructions with a float8_e4m3fn operand: an FP8 GEMM that XLA
  kept as a dot (Triton/XLA emitters),
- `f8_gemm_custom_calls`: cuBLAS(Lt) GEMM custom-calls with an f8 operand (XLA's FP8 rewriter,
  target `__cublas$lt$matmul$f8`),
- `f8_fed_gemm_fusions`: fusions that contain a dot and take an f8 parameter: the dequantize fused
  into the GEMM's prologue, the GEMM itself then in the dequantized (wider) type,
- `dots`: all dot / convolution instructions, and `gemm_custom_calls`: all cuBLAS GEMM calls,
- `f8_values`: instructions whose result is float8_e4m3fn: the quantized operands themselves (0
  means the quantization was optimised away).
On CPU every count with f8 but the last is 0 by construction (model/fp8.py upcasts before the
dot: emulation); the question is what XLA:GPU on Hopper makes of the same program.

`--target=h100` compiles for an H100 without one (the CUDA PJRT plugin's deviceless mode, the
GPU target config of bench/grouped_hlo.py; run with JAX_PLATFORMS=cpu in an environment that has
jax-cuda12-plugin and jax-cuda12-pjrt) and reports the census only: no step runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import train_step as train_step_bench  # noqa: E402  (bench/, next to this script)

from deepseek_jax import config as config_lib  # noqa: E402
from deepseek_jax.model import config as model_config  # noqa: E402
from deepseek_jax.model import counting  # noqa: E402
from deepseek_jax.train import state as state_lib  # noqa: E402

F8 = "f8e4m3fn"
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
# name = type opcode(operands...; the type may be a tuple "(f32[..]{..}, s8[0]{0})".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\((.*)$")
_GEMM_TARGET = re.compile(r'custom_call_target="(__cublas\$lt\$matmul[^"]*|__cublas\$gemm)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_NAME = re.compile(r"%([\w.\-]+)")


def _operand_text(args: str) -> str:
    """The operand list of an instruction (`args`: the text after `opcode(`), up to its paren."""
    depth = 1
    for i, ch in enumerate(args):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return args[:i]
    return args


def hlo_census(text: str) -> dict[str, int]:
    """Counts of (FP8) GEMMs in an optimized HLO module's text (see the module docstring)."""
    types: dict[str, str] = {}  # instruction name -> its result type (names are module-unique)
    ops: list[tuple[str, str, str, str]] = []  # (computation, opcode, operand text, whole line)
    current = ""
    for line in text.splitlines():
        if (m := _COMPUTATION.match(line)) and "=" not in line.split("(")[0]:
            current = m.group(1)
        elif m := _INSTRUCTION.match(line):
            types[m.group(1)] = m.group(2)
            ops.append((current, m.group(3), m.group(4), line))
    keys = ("dots", "f8_dots", "gemm_custom_calls", "f8_gemm_custom_calls", "f8_fed_gemm_fusions")
    counts = dict.fromkeys((*keys, "f8_values"), 0)
    has_dot, has_f8_param = set(), set()

    def f8_operand(args: str) -> bool:
        # Newer XLA prints bare `%x` operands (types looked up), older `f8e4m3fn[..] %x`.
        operands = _operand_text(args)
        return F8 in operands or any(
            types.get(n, "").startswith(F8) for n in _NAME.findall(operands)
        )

    for comp, op, args, line in ops:
        counts["f8_values"] += op != "parameter" and line.split("=", 1)[1].lstrip().startswith(F8)
        if op in ("dot", "convolution"):
            has_dot.add(comp)
            counts["dots"] += 1
            counts["f8_dots"] += f8_operand(args)
        elif op == "custom-call" and _GEMM_TARGET.search(line):
            counts["gemm_custom_calls"] += 1
            counts["f8_gemm_custom_calls"] += f8_operand(args)
        elif op == "parameter" and line.split("=", 1)[1].lstrip().startswith(F8):
            has_f8_param.add(comp)
    for _, op, _, line in ops:
        if op == "fusion" and (c := _CALLS.search(line)):
            counts["f8_fed_gemm_fusions"] += c.group(1) in has_dot and c.group(1) in has_f8_param
    return counts


def census_only(exp, target: str, hlo_path: pathlib.Path | None) -> dict:
    """The optimised HLO's census of the train step compiled for `target` without its device."""
    import grouped_hlo
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    topo = topologies.get_topology_desc(
        platform="cuda", topology="1x1x1", target_config=grouped_hlo.GPU_TARGETS[target]
    )
    rep = NamedSharding(Mesh(np.array(topo.devices), ("x",)), PartitionSpec())
    tx, fn = train_step_bench.build(exp)

    def on_target(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), tree)

    state = on_target(state_lib.abstract_state(exp.model, tx))
    batch = on_target(jax.eval_shape(lambda: train_step_bench.synthetic_batch(exp)))
    t0 = time.perf_counter()
    text = fn.lower(state, batch).compile().as_text()
    if hlo_path is not None:
        hlo_path.write_text(text)
    return {
        "policy": exp.model.matmul_policy.value,
        "compile_s": round(time.perf_counter() - t0, 2),
        "hlo": hlo_census(text),
    }


def measure(exp, steps: int, hlo_path: pathlib.Path | None) -> dict:
    tx, fn = train_step_bench.build(exp)
    state = state_lib.init_state(exp.model, tx, 0)
    batch = train_step_bench.synthetic_batch(exp)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    if hlo_path is not None:
        hlo_path.write_text(text)
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    return {
        "policy": exp.model.matmul_policy.value,
        "compile_s": round(compile_s, 2),
        "step_s": step_s,
        "loss": float(metrics["loss"]),
        "hlo": hlo_census(text),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "small.py"))
    p.add_argument("--policies", default="bf16,fp8_blockwise", help="the first is the reference")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--set", action="append", default=[], help="FIELD=VALUE config override")
    p.add_argument("--hlo_dir", default=None, help="write <policy>.hlo.txt (optimized HLO) here")
    p.add_argument("--json", default=None)
    p.add_argument("--target", default=None, help="compile for this GPU without one: h100")
    args = p.parse_args()
    policies = [model_config.MatmulPolicy(v) for v in args.policies.split(",")]
    hlo_dir = pathlib.Path(args.hlo_dir) if args.hlo_dir else None
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
    base = config_lib.parse_overrides(args.set)
    rows = []
    for pol in policies:
        exp = config_lib.load(args.config, {**base, "model.matmul_policy": pol.value})
        path = hlo_dir / f"{pol.value}.hlo.txt" if hlo_dir else None
        if args.target:
            rows.append(census_only(exp, args.target, path))
        else:
            rows.append(measure(exp, args.steps, path))
        print(json.dumps(rows[-1]), flush=True)
    if args.target:
        return 0
    counts = counting.count(exp.model, exp.train.seq_len)
    tokens = exp.train.global_batch_size * exp.train.seq_len
    print(f"device: {jax.devices()[0].device_kind}, {tokens} tokens/step")
    print(
        "| policy | step ms | vs first | TFLOP/s | f8 dots | FP8 cuBLASLt | f8-fed GEMM fusions "
        "| dots | cuBLAS GEMMs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h = r["hlo"]
        r["vs_first"] = r["step_s"] / rows[0]["step_s"]
        r["model_tflops_per_s"] = tokens * counts.train_flops_per_token / r["step_s"] / 1e12
        print(
            f"| {r['policy']} | {1e3 * r['step_s']:.2f} | {r['vs_first']:.3f} "
            f"| {r['model_tflops_per_s']:.1f} | {h['f8_dots']} | {h['f8_gemm_custom_calls']} "
            f"| {h['f8_fed_gemm_fusions']} | {h['dots']} | {h['gemm_custom_calls']} |"
        )
    fp8 = [r for r in rows if r["policy"].startswith("fp8")]
    for r in fp8:
        h = r["hlo"]
        verdict = (
            "FP8 GEMMs emitted"
            if h["f8_dots"] or h["f8_gemm_custom_calls"]
            else "dequantize fused into wider GEMMs"
            if h["f8_fed_gemm_fusions"]
            else "no FP8 GEMM: dequantize, then a wider GEMM"
        )
        print(f"{r['policy']}: {verdict}")
    out = {
        "config": args.config,
        "overrides": args.set,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "tokens_per_step": tokens,
        "train_flops_per_token": counts.train_flops_per_token,
        "rows": rows,
    }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
