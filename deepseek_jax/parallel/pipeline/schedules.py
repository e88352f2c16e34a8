"""Pipeline schedules as per-rank op orders: DualPipe, DualPipeV, 1F1B and GPipe.

Pure Python, no JAX. A schedule instance is an `OpOrders`: for every pipeline rank the ordered list
of compute ops it runs in one training step, plus the placement of chunks (model stages) on ranks,
which says where each op's inputs come from. `ticks` turns op orders into the lock-step tick table
that the JAX executor runs; `costmodel` times them.

Chunk conventions (c is the index of the model copy held by a rank, as `DualPipe.module[c]`):
  dualpipe   c=0 is stage r of direction 0 (rank 0 -> PP-1), c=1 is stage PP-1-r of direction 1
             (rank PP-1 -> 0). The two directions carry different micro-batches, each numbered
             0..M/2-1, so a micro-batch is identified by (c, m).
  dualpipev  one pipeline of 2*PP stages folded into a V: c=0 is stage r (going down), c=1 is stage
             2*PP-1-r (coming back up). Micro-batch m passes through both chunks.
  1f1b/gpipe one chunk, c=0 is stage r.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from deepseek_jax.parallel import config as config_lib

# The one schedule enum is the config's (its NONE member means "no pipeline"; `build` refuses it).
Schedule = config_lib.Schedule
SCHEDULES = tuple(s for s in Schedule if s is not Schedule.NONE)  # the ones with op orders


class OpKind(enum.Enum):
    """Compute op kinds; the value is the spelling of the reference traces."""

    F = "F"  # forward of one chunk for one micro-batch
    B = "B"  # full backward: input gradient and weight gradient together
    BI = "Bi"  # backward for the input only; the weight gradient is deferred to a later W
    W = "W"  # the deferred weight gradient of an earlier Bi (zero-bubble split)
    FB = "F&B"  # forward of (c, m) and full backward of (c2, m2) in one call, so they can overlap


@dataclasses.dataclass(frozen=True)
class Op:
    """One compute op. For FB, (c, m) is the forward half and (c2, m2) the backward half."""

    kind: OpKind
    c: int
    m: int
    c2: int | None = None
    m2: int | None = None

    def parts(self) -> tuple[tuple[OpKind, int, int], ...]:
        """The elementary (kind, c, m) pieces: two for FB (F then B), one otherwise."""
        if self.kind is OpKind.FB:
            return ((OpKind.F, self.c, self.m), (OpKind.B, self.c2, self.m2))
        return ((self.kind, self.c, self.m),)

    def to_json(self) -> dict:
        d = {"op": self.kind.value, "c": self.c, "m": self.m}
        if self.kind is OpKind.FB:
            d.update(c2=self.c2, m2=self.m2)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Op:
        return cls(OpKind(d["op"]), d["c"], d["m"], d.get("c2"), d.get("m2"))

    def __str__(self) -> str:
        if self.kind is OpKind.FB:
            return f"F({self.c},{self.m})&B({self.c2},{self.m2})"
        return f"{self.kind.value}({self.c},{self.m})"


Cell = tuple[int, int]  # (rank, chunk): one model stage as placed on a rank
Event = tuple[int, int, int, str]  # (rank, chunk, micro-batch, "F" | "B" | "W"): an op finished


def event(rank: int, kind: OpKind, c: int, m: int) -> Event:
    """The event an elementary op produces; B and Bi both produce the input gradient ("B")."""
    return (rank, c, m, {OpKind.F: "F", OpKind.B: "B", OpKind.BI: "B", OpKind.W: "W"}[kind])


@dataclasses.dataclass(frozen=True)
class OpOrders:
    """A schedule instance: each rank's ordered ops and the chunk placement they imply.

    `microbatches` is the total per step as the user gave it (DualPipe's `num_chunks`);
    `per_chunk` is how many micro-batches every chunk of every rank processes.
    """

    schedule: Schedule
    pp: int
    microbatches: int
    ranks: tuple[tuple[Op, ...], ...]

    @property
    def chunks(self) -> int:
        """Model chunks held per rank."""
        return 2 if self.schedule in (Schedule.DUALPIPE, Schedule.DUALPIPEV) else 1

    @property
    def per_chunk(self) -> int:
        return self.microbatches // 2 if self.schedule is Schedule.DUALPIPE else self.microbatches

    @property
    def num_stages(self) -> int:
        """Model stages the network is cut into (DualPipeV folds 2*PP stages onto PP ranks)."""
        return 2 * self.pp if self.schedule is Schedule.DUALPIPEV else self.pp

    def stage(self, rank: int, chunk: int) -> int:
        """Index of the model stage that `chunk` on `rank` runs."""
        if chunk == 0:
            return rank
        if self.schedule is Schedule.DUALPIPE:
            return self.pp - 1 - rank
        return 2 * self.pp - 1 - rank

    def upstream(self, rank: int, chunk: int) -> Cell | None:
        """Where this cell's stage input comes from; None at a first stage (it reads the batch)."""
        if chunk == 0:
            return (rank - 1, 0) if rank > 0 else None
        if self.schedule is Schedule.DUALPIPEV and rank == self.pp - 1:
            return (rank, 0)  # the V's turn: chunk 0's output is chunk 1's input on the same rank
        return (rank + 1, 1) if rank < self.pp - 1 else None

    def downstream(self, rank: int, chunk: int) -> Cell | None:
        """Where this cell's output goes (and its output gradient comes from); None: last stage."""
        if chunk == 1:
            return (rank - 1, 1) if rank > 0 else None
        if rank < self.pp - 1:
            return (rank + 1, 0)
        return (rank, 1) if self.schedule is Schedule.DUALPIPEV else None

    def needs(self, rank: int, kind: OpKind, c: int, m: int) -> Event | None:
        """The event an elementary op waits for: F the upstream forward, B/Bi the downstream input
        gradient (at a last stage its own F), W its own Bi. None: F at a first stage."""
        if kind is OpKind.F:
            src = self.upstream(rank, c)
            return None if src is None else (*src, m, "F")
        if kind is OpKind.W:
            return (rank, c, m, "B")
        dst = self.downstream(rank, c)
        return (rank, c, m, "F") if dst is None else (*dst, m, "B")

    def cells(self) -> list[Cell]:
        return [(r, c) for r in range(self.pp) for c in range(self.chunks)]


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


class _Counters:
    """Micro-batch ids from per-(chunk, kind) counters and a FIFO of deferred weight gradients,
    like DualPipe's current_f_chunk_id / current_b_chunk_id and WeightGradStore."""

    def __init__(self, flip: int):
        self.flip = flip  # DualPipe's `phase ^= is_in_second_half`
        self.f = [0, 0]
        self.b = [0, 0]
        self.deferred: collections.deque[tuple[int, int]] = collections.deque()
        self.ops: list[Op] = []

    def _next_f(self, phase: int) -> tuple[int, int]:
        c = phase ^ self.flip
        self.f[c] += 1
        return c, self.f[c] - 1

    def _next_b(self, phase: int, zb: bool) -> tuple[int, int]:
        c = phase ^ self.flip
        self.b[c] += 1
        if zb:
            self.deferred.append((c, self.b[c] - 1))
        return c, self.b[c] - 1

    def forward(self, phase: int) -> None:
        self.ops.append(Op(OpKind.F, *self._next_f(phase)))

    def backward(self, phase: int, zb: bool = False) -> None:
        self.ops.append(Op(OpKind.BI if zb else OpKind.B, *self._next_b(phase, zb)))

    def weight(self) -> None:
        self.ops.append(Op(OpKind.W, *self.deferred.popleft()))

    def forward_backward(self, f_phase: int, b_phase: int) -> None:
        c, m = self._next_f(f_phase)
        c2, m2 = self._next_b(b_phase, zb=False)
        self.ops.append(Op(OpKind.FB, c, m, c2, m2))


def _eight_steps(half: int, h: int, n: int, middle: bool, flip: int) -> list[Op]:
    """One rank's order: the 8 loop regions of DualPipe.step() (deepseek-ai/DualPipe @ 3da1bbe).

    half: PP/2 (DualPipeV: PP); h: min(r, PP-1-r) (DualPipeV: r); n: micro-batches per chunk;
    middle: the rank is a middle rank; flip: 1 on ranks >= PP/2 (logical phase -> chunk).
    Phase 0 is the direction that reaches this rank first.
    """
    k = _Counters(flip)
    for _ in range(2 * (half - h - 1)):  # 1: nF0, the warm-up of the near direction
        k.forward(0)
    for _ in range(h + 1):  # 2: nF0F1
        k.forward(0)
        k.forward(1)
    for _ in range(half - h - 1):  # 3: nB1W1F1, zero bubble: Bi then its own W at once
        k.backward(1, zb=True)
        k.weight()
        k.forward(1)
    for i in range(n - 2 * half + h + 1):  # 4 (main): nF0B1F1B0
        if i == 0 and middle:  # the reference runs this pair unoverlapped to shrink the bubble
            k.forward(0)
            k.backward(1)
        else:
            k.forward_backward(0, 1)
        k.forward_backward(1, 0)
    for _ in range(half - h - 1):  # 5: nB1F1B0
        k.backward(1)
        k.forward_backward(1, 0)
    zb = False
    for i in range(h + 1):  # 6: nB1B0; the second half of these backwards defer their W
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        k.backward(1, zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        k.backward(0, zb)
    for _ in range(half - h - 1):  # 7: nWB0
        k.weight()
        k.backward(0, zb=True)
    for _ in range(h + 1):  # 8: nW
        k.weight()
    assert not k.deferred, "every deferred weight gradient must have been run"
    return k.ops


def dualpipe(pp: int, num_chunks: int) -> OpOrders:
    """DualPipe with `pp` ranks and `num_chunks` micro-batches in total (half enter at each end)."""
    _check_positive(pp=pp, num_chunks=num_chunks)
    if pp % 2:
        raise ValueError(f"dualpipe needs an even number of pipeline ranks, got pp={pp}")
    if num_chunks % 2 or num_chunks < 2 * pp:
        raise ValueError(
            f"dualpipe needs an even number of micro-batches >= 2*pp={2 * pp}, got {num_chunks}"
        )
    half, n = pp // 2, num_chunks // 2
    ranks = []
    for r in range(pp):
        h = min(r, pp - 1 - r)
        ranks.append(_eight_steps(half, h, n, middle=h == half - 1, flip=int(r >= half)))
    return OpOrders(Schedule.DUALPIPE, pp, num_chunks, tuple(map(tuple, ranks)))


def dualpipev(pp: int, num_chunks: int) -> OpOrders:
    """DualPipeV ("cut-in-half"): 2*pp stages on `pp` ranks in a V, `num_chunks` micro-batches."""
    _check_positive(pp=pp, num_chunks=num_chunks)
    if num_chunks < 2 * pp:
        raise ValueError(f"dualpipev needs >= 2*pp={2 * pp} micro-batches, got {num_chunks}")
    ranks = [_eight_steps(pp, r, num_chunks, middle=r == pp - 1, flip=0) for r in range(pp)]
    return OpOrders(Schedule.DUALPIPEV, pp, num_chunks, tuple(map(tuple, ranks)))


def one_f_one_b(pp: int, m: int) -> OpOrders:
    """1F1B: rank r warms up with PP-1-r forwards, then alternates F and full B, then drains."""
    _check_positive(pp=pp, m=m)
    ranks = []
    for r in range(pp):
        warm = min(pp - 1 - r, m)
        ops = [Op(OpKind.F, 0, i) for i in range(warm)]
        for i in range(m - warm):
            ops += [Op(OpKind.F, 0, warm + i), Op(OpKind.B, 0, i)]
        ops += [Op(OpKind.B, 0, i) for i in range(m - warm, m)]
        ranks.append(tuple(ops))
    return OpOrders(Schedule.ONE_F_ONE_B, pp, m, tuple(ranks))


def gpipe(pp: int, m: int) -> OpOrders:
    """GPipe: all forwards, then all backwards in reverse micro-batch order (last in, first out),
    which is the order autodiff of a forward pipeline loop produces."""
    _check_positive(pp=pp, m=m)
    forwards = [Op(OpKind.F, 0, i) for i in range(m)]
    ops = tuple(forwards + [Op(OpKind.B, 0, i) for i in reversed(range(m))])
    return OpOrders(Schedule.GPIPE, pp, m, (ops,) * pp)


def build(schedule: Schedule | str, pp: int, microbatches: int) -> OpOrders:
    """The op orders of `schedule`; `microbatches` is the total per step (DualPipe's num_chunks)."""
    schedule = Schedule(schedule)
    if schedule is Schedule.NONE:
        raise ValueError("schedule 'none' has no op orders (no pipeline)")
    generator = {
        Schedule.DUALPIPE: dualpipe,
        Schedule.DUALPIPEV: dualpipev,
        Schedule.ONE_F_ONE_B: one_f_one_b,
        Schedule.GPIPE: gpipe,
    }[schedule]
    return generator(pp, microbatches)


def check_order(orders: OpOrders) -> None:
    """Completeness of every rank's order; raises ValueError naming the first problem.

    Per rank, chunk and micro-batch: exactly one F, then exactly one B or one Bi followed later by
    its W; nothing for chunks or micro-batches that do not exist.
    """
    if len(orders.ranks) != orders.pp:
        raise ValueError(f"orders has {len(orders.ranks)} ranks, expected {orders.pp}")
    valid = {(c, m) for c in range(orders.chunks) for m in range(orders.per_chunk)}
    for r, ops in enumerate(orders.ranks):
        seen: dict[tuple[int, int], list[OpKind]] = {key: [] for key in valid}
        for op in ops:
            for kind, c, m in op.parts():
                if (c, m) not in valid:
                    raise ValueError(
                        f"rank {r}: {op} names a chunk/micro-batch outside the schedule"
                    )
                history = seen[(c, m)]
                expected = {
                    OpKind.F: [],
                    OpKind.B: [OpKind.F],
                    OpKind.BI: [OpKind.F],
                    OpKind.W: [OpKind.F, OpKind.BI],
                }[kind]
                if history != expected:
                    raise ValueError(
                        f"rank {r}: {kind.value}({c},{m}) after {[k.value for k in history]}"
                    )
                history.append(kind)
        for (c, m), history in sorted(seen.items()):
            if history not in ([OpKind.F, OpKind.B], [OpKind.F, OpKind.BI, OpKind.W]):
                raise ValueError(
                    f"rank {r}: chunk {c} micro-batch {m} incomplete: {[k.value for k in history]}"
                )


def peak_live(orders: OpOrders) -> list[int]:
    """Per rank, the most stage inputs alive at once in program order, counting each (chunk,
    micro-batch) from its F to its B or Bi (the report's and README's activation-memory measure)."""
    peaks = []
    for ops in orders.ranks:
        live = peak = 0
        for op in ops:
            for kind, _, _ in op.parts():  # FB: the forward's input exists while the backward runs
                live += {OpKind.F: 1, OpKind.B: -1, OpKind.BI: -1, OpKind.W: 0}[kind]
                peak = max(peak, live)
        peaks.append(peak)
    return peaks
