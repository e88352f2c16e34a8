"""Collectives of a compiled XLA program, read from its HLO text: kind, bytes, device groups.

Used by the tests (the expert-parallel step must contain the expert all-to-all) and by the
all-to-all byte benchmark. Bytes are those of the op's result on one device: for an all-to-all,
what each device receives per execution (its own chunk included), which equals what it sends.
`count` is how often the op runs per program execution: an op inside a scanned layer stack sits
once in a while-loop body, which runs `known_trip_count` times (XLA records it for scans).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
KINDS = (
    "all-to-all",
    "ragged-all-to-all",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
)
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.+?)\s+(?P<kind>"
    + "|".join(re.escape(k) for k in sorted(KINDS, key=len, reverse=True))
    + r")(?:-start)?\("
)
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[0-9,{}]*\})\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    result_type: str  # e.g. "(f32[1,32,32], f32[1,32,32])"
    bytes: int  # result bytes on one device
    groups: tuple[tuple[int, ...], ...] | None  # device groups, None when not printed
    op_name: str  # jax-level name from the metadata, e.g. ".../shard_map/all_to_all"
    count: int = 1  # executions per run of the program (while-loop trip counts multiplied)


def type_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(type_text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _groups(line: str) -> tuple[tuple[int, ...], ...] | None:
    if m := _GROUPS_LIST.search(line):
        return tuple(
            tuple(int(x) for x in g.split(",") if x)
            for g in re.findall(r"\{([0-9,]*)\}", m.group(1))
        )
    if m := _GROUPS_IOTA.search(line):
        shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return tuple(tuple(int(x) for x in row) for row in ids.reshape(shape))
    return None


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _multiplicities(lines: list[str]) -> dict[int, int]:
    """Line number -> executions per program run, for every line inside a computation."""
    owner: dict[int, str] = {}
    calls: dict[str, list[tuple[str, int]]] = {}  # callee -> [(caller, times per caller run)]
    entry, current = None, None
    for i, line in enumerate(lines):
        if current is None:
            if m := _COMPUTATION.match(line):
                current = m.group(1)
                entry = current if line.startswith("ENTRY") else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        owner[i] = current
        trip = int(t.group(1)) if (t := _TRIP.search(line)) else 1
        for kind, callee in _CALLEE.findall(line):
            calls.setdefault(callee, []).append((current, trip if kind == "body" else 1))
        if b := _BRANCHES.search(line):
            for callee in re.findall(r"%?([\w.\-]+)", b.group(1)):
                calls.setdefault(callee, []).append((current, 1))  # at most once each
    memo: dict[str, int] = {}

    def times(name: str, depth: int = 0) -> int:
        if name == entry or depth > 64:
            return 1
        if name not in memo:
            memo[name] = sum(times(c, depth + 1) * n for c, n in calls.get(name, [])) or 1
        return memo[name]

    return {i: times(name) for i, name in owner.items()}


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective op of an HLO module's text (async `-start` halves counted once)."""
    lines = hlo_text.splitlines()
    times = _multiplicities(lines)
    out = []
    for i, line in enumerate(lines):
        m = _OP.match(line)
        if not m:
            continue
        name = _OP_NAME.search(line)
        out.append(
            Collective(
                m.group("kind"),
                m.group("type"),
                type_bytes(m.group("type")),
                _groups(line),
                name.group(1) if name else "",
                times.get(i, 1),
            )
        )
    return out


def canonical_groups(groups) -> frozenset[frozenset[int]]:
    return frozenset(frozenset(g) for g in groups)
