"""Where a jitted step's time goes, from a real jax.profiler trace of XLA:CPU's per-op events.

Method (no ablation, no estimate): run the compiled step under `jax.profiler.trace`, read the
perfetto JSON it writes, and keep XLA:CPU's thunk events (one per executed HLO instruction, with
its name in `args.hlo_op`; control-flow thunks — while, conditional, call — are dropped because
their bodies' instructions have their own events). Each instruction of the *optimised* HLO module
carries a `stack_frame_id`; the module proto's stack-frame index turns it into the Python stack
that traced it (decoded here from the serialized HloModuleProto wire format: no XLA protos ship
with jaxlib), and the innermost frame that names a known part of the model decides the category.
Fusions carry the frames of the instruction XLA fused them around. Backward ops keep the frames of
their forward op, so a category is forward + backward.

Times are summed per category over all threads; XLA:CPU runs independent thunks concurrently, so
the sum can exceed the step's wall time (both are printed).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import linecache
import os
import re
import tempfile

import jax

CATEGORIES = (
    "head + CE",
    "attention (MLA)",
    "MoE routing",
    "MoE sort/dispatch",
    "MoE grouped matmul",
    "MoE combine",
    "FFN (dense + shared expert)",
    "norms / RoPE",
    "embedding",
    "optimizer (clip + AdamW)",
    "other",
)
CONTROL_FLOW = {"while", "conditional", "call"}


def _varint(b: bytes, i: int):
    r = s = 0
    while True:
        x = b[i]
        i += 1
        r |= (x & 0x7F) << s
        s += 7
        if x < 128:
            return r, i


def _fields(b: bytes):
    """Protobuf wire format -> [(field, value)] (varints as ints, length-delimited as bytes)."""
    i, out = 0, []
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i : i + n], i + n
        elif wire == 5:
            v, i = b[i : i + 4], i + 4
        elif wire == 1:
            v, i = b[i : i + 8], i + 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((field, v))
    return out


def stack_frames(module_proto: bytes) -> dict[int, list[tuple[str, str, int]]]:
    """stack_frame_id -> [(file, function, line)], innermost first, from HloModuleProto field 17
    (StackFrameIndexProto: file_names 1, function_names 2, file_locations 3, stack_frames 4;
    ids are 1-based, 0 = none)."""
    index = [v for f, v in _fields(module_proto) if f == 17]
    if not index:
        return {}
    sub = _fields(index[0])
    files = [v.decode() for f, v in sub if f == 1]
    funcs = [v.decode() for f, v in sub if f == 2]
    locs = [dict(_fields(v)) for f, v in sub if f == 3]
    frames = [dict(_fields(v)) for f, v in sub if f == 4]
    out = {}
    for fid in range(1, len(frames) + 1):
        chain, cur = [], fid
        while cur:
            fr = frames[cur - 1]
            loc = locs[fr.get(1, 1) - 1]
            chain.append((files[loc.get(1, 1) - 1], funcs[loc.get(2, 1) - 1], loc.get(3, 0)))
            cur = fr.get(2, 0)
        out[fid] = chain
    return out


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\S+|\(.*?\)) ([a-z][\w\-]*)\(")
_FRAME = re.compile(r"stack_frame_id=(\d+)")


def instructions(hlo_text: str) -> dict[str, tuple[str, int]]:
    """HLO instruction name -> (opcode, stack_frame_id or 0), from the optimised module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            f = _FRAME.search(line)
            out[m.group(1)] = (m.group(2), int(f.group(1)) if f else 0)
    return out


def frame_category(file: str, func: str, line: int) -> str | None:
    base = os.path.basename(file)
    if "optax" in file or base == "optim.py" or func.startswith("apply_update"):
        return "optimizer (clip + AdamW)"
    if base in ("head_loss.py", "losses.py") or func in (
        "Transformer.logits",
        "Transformer.head_weight",
        "Embed.attend",
    ):
        return "head + CE"
    if base == "rope.py" or func in ("rms_norm", "RMSNorm.__call__"):
        return "norms / RoPE"
    if base == "routing.py" or func == "Gate.__call__":
        return "MoE routing"
    if func in ("ragged_dot", "grouped_swiglu") or re.search(r"gmm|grouped|tiled", base):
        return "MoE grouped matmul"
    if func == "sort_by_expert":
        return "MoE sort/dispatch"
    if func == "combine":
        return "MoE combine"
    if base == "dispatch.py":  # the gathers around the grouped matmul, by the line's text
        text = linecache.getline(file, line)
        return "MoE combine" if ("inverse" in text or "y_" in text) else "MoE sort/dispatch"
    if func == "MLP.__call__":
        return "FFN (dense + shared expert)"
    if func == "Embed.__call__":
        return "embedding"
    if base in ("mla.py", "attention.py") or "flash" in base or "blockwise" in base:
        return "attention (MLA)"
    if base == "moe.py":
        return "MoE routing"  # the MoE layer's own glue: reshapes, load statistics
    return None


def category(chain) -> str:
    for file, func, line in chain:
        c = frame_category(file, func, line)
        if c is not None:
            return c
    return "other"


def trace_events(run, steps: int) -> tuple[list[dict], float]:
    """Perfetto 'X' events of `steps` calls of run() (already compiled), and wall seconds."""
    import time

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        wall = time.perf_counter() - t0
        path = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"], wall


def breakdown(compiled, run, steps: int = 3) -> dict:
    """ms per step per category for a compiled step; `run()` executes one step to completion."""
    module = compiled.runtime_executable().hlo_modules()[0]
    frames = stack_frames(module.as_serialized_hlo_module_proto())
    instrs = instructions(compiled.as_text())
    events, wall = trace_events(run, steps)
    ms = collections.Counter()
    other_ops = collections.Counter()
    unmatched = 0.0
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if op is None:
            continue
        dur_ms = e["dur"] / 1e3
        if op not in instrs:
            unmatched += dur_ms
            other_ops[f"unmatched {op}"] += dur_ms
            continue
        opcode, fid = instrs[op]
        if opcode in CONTROL_FLOW:
            continue
        chain = frames.get(fid, [])
        cat = category(chain)
        ms[cat] += dur_ms
        if cat == "other":
            where = next((f"{os.path.basename(f)}:{fn}:{ln}" for f, fn, ln in chain), "no frame")
            other_ops[f"{opcode} @ {where}"] += dur_ms
    ms["other"] += unmatched
    per_step = {c: ms.get(c, 0.0) / steps for c in CATEGORIES}
    return {
        "ms_per_step": per_step,
        "op_ms_sum": sum(per_step.values()),
        "wall_ms_per_step": 1e3 * wall / steps,
        "unmatched_ms_per_step": unmatched / steps,
        "top_other_ms_per_step": {k: v / steps for k, v in other_ops.most_common(8)},
    }
