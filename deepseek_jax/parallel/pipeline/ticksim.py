"""Symbolic execution of a tick table, and deliberately broken tables to prove the check bites.

`check(table)` runs the table the way the JAX executor will, reading only the `TickTable` arrays:
every tick each rank runs its op against its `act`/`grd` slot buffers, puts its outputs on the
flagged channels, the channels move them along `perms`/`loopback`, and each inbox is written to the
`recv` slot. Payloads are tags naming what they are (stream, stage, micro-batch), so a read of a
slot that holds the wrong payload or nothing, a payload with nowhere to go, a receive slot with
nothing arriving, or a write over a value some op still has to read all raise ValueError. Finally
every rank's executed ops must be complete (`schedules.check_order`).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel.pipeline import schedules, ticks
from deepseek_jax.parallel.pipeline.schedules import OpKind
from deepseek_jax.parallel.pipeline.ticks import Channel, TickTable

Tag = tuple[str, int, int, int]  # ("act" | "grd", stream, stage it belongs to, micro-batch)


def _stream(table: TickTable, c: int) -> int:
    # DualPipe's two chunks carry different micro-batches; DualPipeV's chunks share one stream.
    return c if table.schedule is schedules.Schedule.DUALPIPE else 0


def _exact(table: TickTable) -> bool:
    return table.split is parallel_config.BackwardSplit.EXACT


def _reads(table: TickTable) -> list[collections.Counter]:
    """Per rank, how many times each (buffer, chunk, micro-batch) value will be read."""
    reads = [collections.Counter() for _ in range(table.pp)]
    for r in range(table.pp):
        for op in table.rank_ops(r):
            for kind, c, m in op.parts():
                first, last = table.is_first[r, c], table.is_last[r, c]
                if kind is OpKind.W and _exact(table):
                    reads[r]["wres", c, m] += 1  # the exact W reads only Bi's residuals
                    continue
                if kind is not OpKind.F or not first:
                    reads[r]["act", c, m] += 1
                if kind is not OpKind.F and not last:
                    reads[r]["grd", c, m] += 1
    return reads


def check(table: TickTable) -> None:
    """Run `table` symbolically; raise ValueError at the first inconsistency."""
    P = table.pp
    bufs = {
        "act": [[None] * table.act_slots for _ in range(P)],
        "grd": [[None] * table.grd_slots for _ in range(P)],
        "wres": [[None] * table.wres_slots for _ in range(P)],
    }
    owner: dict[tuple[str, int, int], tuple[int, int]] = {}  # (buffer, rank, slot) -> (c, m)
    pending = _reads(table)
    executed: list[set] = [set() for _ in range(P)]

    def where(t: int, r: int) -> str:
        return f"tick {t} rank {r}"

    def write(t: int, r: int, buf: str, slot: int, tag: Tag, cm: tuple[int, int]) -> None:
        if not 0 <= slot < len(bufs[buf][r]):
            raise ValueError(f"{where(t, r)}: {buf} slot {slot} out of range")
        old = owner.get((buf, r, slot))
        if old is not None and pending[r][(buf, *old)] > 0:
            raise ValueError(f"{where(t, r)}: {buf} slot {slot} overwritten while {old} is live")
        bufs[buf][r][slot] = tag
        owner[(buf, r, slot)] = cm

    def read(t: int, r: int, buf: str, slot: int, tag: Tag, cm: tuple[int, int]) -> None:
        if not 0 <= slot < len(bufs[buf][r]) or bufs[buf][r][slot] != tag:
            held = bufs[buf][r][slot] if 0 <= slot < len(bufs[buf][r]) else "out of range"
            raise ValueError(f"{where(t, r)}: {buf} slot {slot} holds {held}, needs {tag}")
        pending[r][(buf, *cm)] -= 1

    for t in range(table.num_ticks):
        outbox = np.full((P, 4), None, dtype=object)
        for r in range(P):
            op = table.op(t, r)
            for i, (kind, c, m) in enumerate(op.parts() if op else ()):
                act = int((table.act2 if i else table.act)[t, r])
                grd = int((table.grd2 if i else table.grd)[t, r])
                s, stage = _stream(table, c), int(table.stage[r, c])
                first, last = table.is_first[r, c], table.is_last[r, c]
                own = ("act", s, stage, m)
                if kind is OpKind.F:
                    (write if first else read)(t, r, "act", act, own, (c, m))
                    if not last:
                        outbox[r, ticks.act_channel(c)] = ("act", s, stage + 1, m)
                    executed[r].add(("F", c, m))
                    continue
                need = ("F", c, m) if kind is not OpKind.W else ("Bi", c, m)
                if need not in executed[r]:
                    raise ValueError(f"{where(t, r)}: {kind.value}({c},{m}) before its {need[0]}")
                wres, res = int(table.wres[t, r]), ("wres", s, stage, m)
                if kind is OpKind.W and _exact(table):
                    read(t, r, "wres", wres, res, (c, m))
                    executed[r].add(("W", c, m))
                    continue
                if kind is OpKind.BI and _exact(table):
                    write(t, r, "wres", wres, res, (c, m))
                read(t, r, "act", act, own, (c, m))
                if last:
                    if grd != -1:
                        raise ValueError(f"{where(t, r)}: last stage has grd slot {grd}")
                else:
                    read(t, r, "grd", grd, ("grd", s, stage, m), (c, m))
                if kind is not OpKind.W and not first:
                    outbox[r, ticks.grd_channel(c)] = ("grd", s, stage - 1, m)
                executed[r].add(("Bi" if kind is OpKind.BI else kind.value, c, m))
        for r in range(P):
            for ch in Channel:
                if bool(table.send[t, r, ch]) != (outbox[r, ch] is not None):
                    raise ValueError(f"{where(t, r)}: send flag on {ch.name} disagrees with the op")
        inbox = np.full((P, 4), None, dtype=object)
        for ch, pairs in enumerate(table.perms):
            for src, dst in pairs:
                inbox[dst, ch] = outbox[src, ch]
        for r, src_ch, dst_ch in table.loopback:
            inbox[r, dst_ch] = outbox[r, src_ch]
        for r in range(P):
            for ch in Channel:
                payload, slot = inbox[r, ch], int(table.recv[t, r, ch])
                if payload is None and slot != -1:
                    raise ValueError(f"{where(t, r)}: recv slot {slot} on {ch.name}, nothing sent")
                if payload is not None and slot == -1:
                    raise ValueError(f"{where(t, r)}: {payload} arrives on {ch.name}, no slot")
                if payload is not None:
                    buf = "act" if ch in (Channel.ACT0, Channel.ACT1) else "grd"
                    c = 0 if ch in (Channel.ACT0, Channel.GRD0) else 1
                    write(t, r, buf, slot, payload, (c, payload[3]))

    ranks = tuple(tuple(table.rank_ops(r)) for r in range(P))
    schedules.check_order(schedules.OpOrders(table.schedule, P, table.microbatches, ranks))


# Broken tables, for tests that must see `check` (and later the executor) fail.


def _replace(table: TickTable, **arrays: np.ndarray) -> TickTable:
    for a in arrays.values():
        a.setflags(write=False)
    return dataclasses.replace(table, **arrays)


def drop_op(table: TickTable, kind: OpKind = OpKind.W, index: int = 0) -> TickTable:
    """The table with the `index`-th op of `kind` (in tick, then rank order) made idle."""
    hits = np.argwhere(table.code == ticks.Code[kind.name])
    t, r = hits[index]
    cols = ("c", "m", "c2", "m2", "act", "grd", "act2", "grd2", "wres")
    arrays = {k: getattr(table, k).copy() for k in ("code", "send") + cols}
    arrays["code"][t, r] = ticks.Code.IDLE
    arrays["send"][t, r] = 0
    for k in cols:
        arrays[k][t, r] = -1
    return _replace(table, **arrays)


def swap_recv(table: TickTable, channel: Channel = Channel.ACT0) -> TickTable:
    """The table with the receive slots of the first two payloads on `channel` at one rank
    swapped, where they differ: the executor would store both, each in the other's slot."""
    for r in range(table.pp):
        ts = np.flatnonzero(table.recv[:, r, channel] >= 0)
        for a, b in zip(ts, ts[1:]):
            if table.recv[a, r, channel] != table.recv[b, r, channel]:
                recv = table.recv.copy()
                recv[[a, b], r, channel] = recv[[b, a], r, channel]
                return _replace(table, recv=recv)
    raise ValueError(f"no two distinct receive slots on {channel.name}")


def swap_wres(table: TickTable) -> TickTable:
    """The table with the residual slots of the first two Ws at one rank swapped, where they
    differ: each W would read the other Bi's residuals (exact split)."""
    for r in range(table.pp):
        ts = np.flatnonzero(table.code[:, r] == ticks.Code.W)
        for a, b in zip(ts, ts[1:]):
            if table.wres[a, r] != table.wres[b, r]:
                wres = table.wres.copy()
                wres[[a, b], r] = wres[[b, a], r]
                return _replace(table, wres=wres)
    raise ValueError("no two Ws with distinct residual slots")
