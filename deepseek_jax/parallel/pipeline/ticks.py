"""Lock-step tick tables: a schedule's per-rank op orders as static arrays for the SPMD executor.

Every rank runs at most one op (or one F&B pair) per tick, then every rank takes part in the same
four ppermutes. A rank runs its next op, in its own order, at the first tick at which everything the
op needs was produced at an earlier tick; a payload sent at the end of tick t is usable from t+1.
Buffer slots come from colouring the live intervals of the stored stage inputs and gradients.
See docs/pipeline_schedules.md for the conventions; `ticksim` checks a table by running it.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel.pipeline import schedules
from deepseek_jax.parallel.pipeline.schedules import Op, OpKind, OpOrders


class Code(enum.IntEnum):
    """Per-(tick, rank) op code, the `lax.switch` branch index."""

    IDLE = 0
    F = 1
    B = 2
    BI = 3
    W = 4
    FB = 5


class Channel(enum.IntEnum):
    """The four ppermute channels, the last axis of `recv` and `send`."""

    ACT0 = 0  # chunk-0 activations, rank r -> r+1
    ACT1 = 1  # chunk-1 activations, rank r -> r-1
    GRD0 = 2  # chunk-0 input gradients, rank r -> r-1
    GRD1 = 3  # chunk-1 input gradients, rank r -> r+1


_KIND_CODE = {
    OpKind.F: Code.F,
    OpKind.B: Code.B,
    OpKind.BI: Code.BI,
    OpKind.W: Code.W,
    OpKind.FB: Code.FB,
}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}


def act_channel(chunk: int) -> Channel:
    return Channel.ACT0 if chunk == 0 else Channel.ACT1


def grd_channel(chunk: int) -> Channel:
    return Channel.GRD0 if chunk == 0 else Channel.GRD1


@dataclasses.dataclass(frozen=True, eq=False)
class TickTable:
    """Everything the executor needs, as static int32 numpy arrays (T ticks, P ranks, K chunks).

    Op per tick and rank, all [T, P]:
      code     `Code`: IDLE, F, B (full backward), BI (input-gradient only), W (deferred weight
               gradient of an earlier BI of the same (c, m) on this rank), FB (forward of (c, m)
               and full backward of (c2, m2) in one branch).
      c, m     chunk and micro-batch of the op (of the forward half for FB); -1 when IDLE.
      c2, m2   chunk and micro-batch of FB's backward half; -1 otherwise.
      act      slot of the `act` buffer holding the stage input of (c, m). F at a non-first stage
               reads it; F at a first stage (`is_first`) writes its batch input there (the
               executor may instead re-read the batch, the slot stays reserved); B, BI and W read
               it (recompute, or stored residuals kept under the same slot index).
      grd      slot of the `grd` buffer holding the output gradient of (c, m) received from
               downstream: read by B and BI, and by W as the stored cotangent. -1 for F, and for
               any op at a last stage (`is_last`), where the cotangent comes from the loss.
      act2, grd2  the same for FB's backward half (c2, m2); -1 otherwise.
      wres     with the exact split: slot of the `wres` buffers (the residuals W needs) that BI
               writes and its W reads; -1 for every other op and with the recompute split.
    Communication, after the op, every rank, every tick:
      send     [T, P, 4] 0/1: the op's output that goes out on channel `Channel` k this tick:
               F at a non-last stage sends its output on act_channel(c); B/BI at a non-first stage
               send the stage-input gradient on grd_channel(c). Unflagged channels carry zeros.
      recv     [T, P, 4]: the slot where the payload arriving on channel k at the end of tick t
               must be written (ACT0/ACT1 into `act`, GRD0/GRD1 into `grd`); -1: nothing arrives,
               write nothing. Write after the op's reads: a slot read at tick t may be refilled at
               the end of tick t.
      perms    per channel, the (source, destination) rank pairs of its ppermute (non-cyclic).
      loopback (rank, from_channel, to_channel): on that rank the channel's inbox is this rank's
               own outbox of `from_channel` instead of a ppermute result (DualPipeV's turn at rank
               P-1: ACT0 -> ACT1 and GRD1 -> GRD0). Empty for the other schedules.
    Placement, [P, K]:
      stage    the model stage each (rank, chunk) runs (index into a [num_stages] stage stack).
      is_first 1 where the chunk is a first stage (F reads micro-batch m from the step input).
      is_last  1 where the chunk is a last stage (F computes the loss, B/BI start from it).
    Sizes: act_slots / grd_slots / wres_slots are the buffer lengths (max over ranks of the peaks
    act_peak[P], grd_peak[P], wres_peak[P]). With the exact split W reads only its `wres` slot,
    so a stage input and its output gradient are live to the BI; with the recompute split W
    reads both, so they are live to the W and there is no `wres` buffer. per_chunk: micro-batches
    per chunk. m indexes the chunk's micro-batches: for DualPipe chunk 0's m is the step's
    micro-batch m and chunk 1's is per_chunk + m (the second half, fed at rank P-1); for the
    other schedules both chunks' m is the step's micro-batch m.
    Gradients: B and W add chunk c's weight gradient; BI adds none (its later W does), so every
    (c, m) contributes exactly once.
    """

    schedule: schedules.Schedule
    pp: int
    chunks: int
    microbatches: int
    per_chunk: int
    code: np.ndarray
    c: np.ndarray
    m: np.ndarray
    c2: np.ndarray
    m2: np.ndarray
    act: np.ndarray
    grd: np.ndarray
    act2: np.ndarray
    grd2: np.ndarray
    wres: np.ndarray
    send: np.ndarray
    recv: np.ndarray
    stage: np.ndarray
    is_first: np.ndarray
    is_last: np.ndarray
    act_peak: np.ndarray
    grd_peak: np.ndarray
    wres_peak: np.ndarray
    split: parallel_config.BackwardSplit
    perms: tuple[tuple[tuple[int, int], ...], ...]
    loopback: tuple[tuple[int, int, int], ...]

    @property
    def num_ticks(self) -> int:
        return self.code.shape[0]

    @property
    def act_slots(self) -> int:
        return int(self.act_peak.max())

    @property
    def grd_slots(self) -> int:
        return int(self.grd_peak.max())

    @property
    def wres_slots(self) -> int:
        return int(self.wres_peak.max())

    def op(self, t: int, r: int) -> Op | None:
        """The op at (tick, rank), or None when idle."""
        code = Code(int(self.code[t, r]))
        if code is Code.IDLE:
            return None
        kind = _CODE_KIND[code]
        if kind is OpKind.FB:
            return Op(
                kind, int(self.c[t, r]), int(self.m[t, r]), int(self.c2[t, r]), int(self.m2[t, r])
            )
        return Op(kind, int(self.c[t, r]), int(self.m[t, r]))

    def rank_ops(self, r: int) -> list[Op]:
        """Rank r's ops in tick order (what its executor should log)."""
        return [op for t in range(self.num_ticks) if (op := self.op(t, r)) is not None]


def assign_ticks(orders: OpOrders) -> list[list[Op | None]]:
    """grid[r][t]: the op rank r runs at tick t (None = idle), greedy in each rank's own order."""
    done: dict[schedules.Event, int] = {}  # event -> tick it happened

    def ready(r: int, kind: OpKind, c: int, m: int, t: int) -> bool:
        need = orders.needs(r, kind, c, m)
        return need is None or done.get(need, t) < t

    pos = [0] * orders.pp
    grid: list[list[Op | None]] = [[] for _ in range(orders.pp)]
    t = 0
    while any(pos[r] < len(orders.ranks[r]) for r in range(orders.pp)):
        started = []
        for r in range(orders.pp):
            op = orders.ranks[r][pos[r]] if pos[r] < len(orders.ranks[r]) else None
            if op is not None and not all(ready(r, *part, t) for part in op.parts()):
                op = None
            if op is not None:
                started.append((r, op))
                pos[r] += 1
            grid[r].append(op)
        if not started:
            stuck = {r: str(ops[pos[r]]) for r, ops in enumerate(orders.ranks) if pos[r] < len(ops)}
            raise ValueError(f"{orders.schedule.value}: deadlock at tick {t}, waiting: {stuck}")
        for r, op in started:  # recorded after the tick: nothing is usable within its own tick
            for part in op.parts():
                done[schedules.event(r, *part)] = t
        t += 1
    return grid


def _colour(intervals: dict) -> tuple[dict, int]:
    """Interval colouring: slots by increasing start, reusing a slot whose last read is before.

    Greedy in start order is optimal for intervals, so the slot count is the peak overlap.
    """
    free_from: list[int] = []  # per slot: first tick at which it may be written again
    slots = {}
    for key in sorted(intervals, key=lambda k: intervals[k]):
        start, end = intervals[key]
        slot = next((s for s, f in enumerate(free_from) if f <= start), len(free_from))
        if slot == len(free_from):
            free_from.append(0)
        free_from[slot] = end + 1
        slots[key] = slot
    return slots, len(free_from)


def _slots(
    orders: OpOrders, grid: list[list[Op | None]], split: parallel_config.BackwardSplit
) -> tuple[list[dict], list[dict], list[dict]]:
    """Per rank, {(chunk, mb): slot} for stage inputs (`act`), output gradients (`grd`) and W
    residuals (`wres`).

    A stage input is live from the tick it is written (its own F at a first stage, else the end
    of the upstream F's tick) to its last reader: B or Bi, and with the recompute split W after
    a Bi (W recomputes from it). An output gradient is live from its arrival to its B or Bi (or
    W with recompute). With the exact split a Bi's residuals are live from the Bi to its W.
    """
    exact = split is parallel_config.BackwardSplit.EXACT
    when: dict[tuple[int, int, int, OpKind], int] = {}  # (rank, chunk, mb, kind) -> tick
    for r, row in enumerate(grid):
        for t, op in enumerate(row):
            for kind, c, m in op.parts() if op else ():
                when[(r, c, m, kind)] = t

    def backward_tick(r: int, c: int, m: int) -> int:
        return when.get((r, c, m, OpKind.B), when.get((r, c, m, OpKind.BI)))

    def last_use(r: int, c: int, m: int) -> int:
        if exact:
            return backward_tick(r, c, m)
        return when.get((r, c, m, OpKind.W), backward_tick(r, c, m))

    act_iv: list[dict] = [{} for _ in range(orders.pp)]  # [first tick held, last tick read]
    grd_iv: list[dict] = [{} for _ in range(orders.pp)]
    wres_iv: list[dict] = [{} for _ in range(orders.pp)]
    for r, c in orders.cells():
        src, dst = orders.upstream(r, c), orders.downstream(r, c)
        for m in range(orders.per_chunk):
            start = when[(r, c, m, OpKind.F)] if src is None else when[(*src, m, OpKind.F)] + 1
            act_iv[r][(c, m)] = (start, last_use(r, c, m))
            if dst is not None:
                grd_iv[r][(c, m)] = (backward_tick(*dst, m) + 1, last_use(r, c, m))
            if exact and (r, c, m, OpKind.W) in when:
                wres_iv[r][(c, m)] = (when[(r, c, m, OpKind.BI)], when[(r, c, m, OpKind.W)])
    return tuple([_colour(iv)[0] for iv in ivs] for ivs in (act_iv, grd_iv, wres_iv))


def build(
    orders: OpOrders, split: parallel_config.BackwardSplit = parallel_config.BackwardSplit.EXACT
) -> TickTable:
    """The tick table of `orders` with buffer slots for `split`; `schedules.check_order` is run
    first."""
    schedules.check_order(orders)
    grid = assign_ticks(orders)
    T, P = len(grid[0]), orders.pp
    act_slot, grd_slot, wres_slot = _slots(orders, grid, split)
    act_peak, grd_peak, wres_peak = (
        [max(s.values(), default=-1) + 1 for s in slots]
        for slots in (act_slot, grd_slot, wres_slot)
    )

    names = ("c", "m", "c2", "m2", "act", "grd", "act2", "grd2", "wres")
    cols = {k: np.full((T, P), -1, np.int32) for k in names}
    code = np.zeros((T, P), np.int32)
    send = np.zeros((T, P, 4), np.int32)
    recv = np.full((T, P, 4), -1, np.int32)

    def deliver(rank: int, t: int, channel: Channel, slot: int) -> None:
        # Payloads land in the inbox of the receiving chunk's channel (ACT_c / GRD_c of that
        # chunk), which at DualPipeV's turn is not the channel they were sent on.
        if recv[t, rank, channel] != -1:
            raise AssertionError(f"two payloads on channel {channel.name} at tick {t}")
        recv[t, rank, channel] = slot

    for r in range(P):
        for t, op in enumerate(grid[r]):
            if op is None:
                continue
            code[t, r] = _KIND_CODE[op.kind]
            for i, (kind, c, m) in enumerate(op.parts()):
                sfx = "2" if i else ""
                cols["c" + sfx][t, r], cols["m" + sfx][t, r] = c, m
                if kind is OpKind.W and split is parallel_config.BackwardSplit.EXACT:
                    cols["wres"][t, r] = wres_slot[r][(c, m)]  # W reads nothing else
                    continue
                cols["act" + sfx][t, r] = act_slot[r][(c, m)]
                if kind is not OpKind.F and (c, m) in grd_slot[r]:
                    cols["grd" + sfx][t, r] = grd_slot[r][(c, m)]
                if kind is OpKind.BI and (c, m) in wres_slot[r]:
                    cols["wres"][t, r] = wres_slot[r][(c, m)]
                if kind is OpKind.F and (dst := orders.downstream(r, c)) is not None:
                    send[t, r, act_channel(c)] = 1
                    deliver(dst[0], t, act_channel(dst[1]), act_slot[dst[0]][(dst[1], m)])
                if kind in (OpKind.B, OpKind.BI) and (src := orders.upstream(r, c)) is not None:
                    send[t, r, grd_channel(c)] = 1
                    deliver(src[0], t, grd_channel(src[1]), grd_slot[src[0]][(src[1], m)])

    K = orders.chunks
    grid_cells = [[(r, c) for c in range(K)] for r in range(P)]
    placement = np.array([[orders.stage(*cell) for cell in row] for row in grid_cells], np.int32)
    is_first = np.array(
        [[orders.upstream(*x) is None for x in row] for row in grid_cells], np.int32
    )
    is_last = np.array(
        [[orders.downstream(*x) is None for x in row] for row in grid_cells], np.int32
    )
    up, down = tuple((r, r + 1) for r in range(P - 1)), tuple((r, r - 1) for r in range(1, P))
    perms = (up, down, down, up) if K == 2 else (up, (), down, ())
    loopback = ()
    if orders.schedule is schedules.Schedule.DUALPIPEV:
        loopback = (
            (P - 1, int(Channel.ACT0), int(Channel.ACT1)),
            (P - 1, int(Channel.GRD1), int(Channel.GRD0)),
        )
    arrays = dict(
        code=code,
        **cols,
        send=send,
        recv=recv,
        stage=placement,
        is_first=is_first,
        is_last=is_last,
        act_peak=np.array(act_peak, np.int32),
        grd_peak=np.array(grd_peak, np.int32),
        wres_peak=np.array(wres_peak, np.int32),
    )
    for a in arrays.values():
        a.setflags(write=False)
    return TickTable(
        schedule=orders.schedule,
        pp=P,
        chunks=K,
        microbatches=orders.microbatches,
        per_chunk=orders.per_chunk,
        split=split,
        perms=perms,
        loopback=loopback,
        **arrays,
    )
