"""Time a schedule with per-op costs: asynchronous (as the official DualPipe runs) and lock-step.

Asynchronous: each rank runs its ops in order, an op starts when the rank is free and its inputs
were produced (a send is usable the moment its op ends, no transfer time). This is the timeline of
the reference implementation and of Figure 5 of the DeepSeek-V3 report.
Lock-step: the tick table run by the SPMD executor; a rank starts tick t+1 when it and every rank
it exchanges ppermutes with have finished tick t, so a slow op stalls its neighbours.
The closed forms are the README/report bubble formulas, per rank.
"""

from __future__ import annotations

import dataclasses

from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel.pipeline import schedules, ticks
from deepseek_jax.parallel.pipeline.schedules import Op, OpKind, OpOrders, Schedule


@dataclasses.dataclass(frozen=True)
class Costs:
    """Time of one op of each kind on one stage (F&B: one overlapped forward + full backward)."""

    F: float = 1.0
    B: float = 2.0
    Bi: float = 1.0
    W: float = 1.0
    FB: float = 3.0

    def __post_init__(self):
        for k, v in dataclasses.asdict(self).items():
            if not v > 0:
                raise ValueError(f"cost {k} must be positive, got {v}")

    def of(self, op: Op | None) -> float:
        if op is None:
            return 0.0
        return {
            OpKind.F: self.F,
            OpKind.B: self.B,
            OpKind.BI: self.Bi,
            OpKind.W: self.W,
            OpKind.FB: self.FB,
        }[op.kind]

    @classmethod
    def parse(cls, text: str) -> Costs:
        """'F=1,B=2,Bi=1,W=1,FB=3' (any subset; 'F&B' is accepted for FB)."""
        values = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            key = "FB" if key.strip() == "F&B" else key.strip()
            if not sep or key not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"bad cost {item!r}: expected KEY=VALUE with KEY in F,B,Bi,W,FB")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"bad cost {item!r}: {value!r} is not a number") from None
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Timing:
    """One timeline: per rank the (start, end) of each op in order, and the idle time."""

    makespan: float
    busy: tuple[float, ...]
    spans: tuple[tuple[tuple[Op | None, float, float], ...], ...]  # per rank: (op, start, end)

    @property
    def idle(self) -> tuple[float, ...]:
        """Per rank: time inside the makespan not spent computing."""
        return tuple(self.makespan - b for b in self.busy)

    @property
    def bubble(self) -> float:
        """Idle fraction of all rank-time."""
        return sum(self.idle) / (self.makespan * len(self.busy))


def asynchronous(orders: OpOrders, costs: Costs = Costs()) -> Timing:
    """Event timeline of `orders` run asynchronously (official DualPipe semantics, zero latency)."""
    end: dict[schedules.Event, float] = {}  # event -> time it happened

    def ready_at(r: int, kind: OpKind, c: int, m: int) -> float | None:
        need = orders.needs(r, kind, c, m)
        return 0.0 if need is None else end.get(need)

    pos, free = [0] * orders.pp, [0.0] * orders.pp
    spans: list[list] = [[] for _ in range(orders.pp)]
    while any(pos[r] < len(orders.ranks[r]) for r in range(orders.pp)):
        progressed = False
        for r in range(orders.pp):
            while pos[r] < len(orders.ranks[r]):
                op = orders.ranks[r][pos[r]]
                times = [ready_at(r, *part) for part in op.parts()]
                if any(x is None for x in times):
                    break
                start = max([free[r], *times])
                free[r] = start + costs.of(op)
                spans[r].append((op, start, free[r]))
                for part in op.parts():
                    end[schedules.event(r, *part)] = free[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"{orders.schedule.value}: deadlock in the asynchronous timeline")
    busy = tuple(sum(costs.of(op) for op in ops) for ops in orders.ranks)
    return Timing(max(free), busy, tuple(map(tuple, spans)))


def lockstep(table: ticks.TickTable, costs: Costs = Costs()) -> Timing:
    """Timeline of the tick table when each tick ends with ppermutes between neighbours."""
    P = table.pp
    neighbours = [{r} for r in range(P)]
    for ch, pairs in enumerate(table.perms):
        if table.send[:, :, ch].any():
            for src, dst in pairs:
                neighbours[src].add(dst)
                neighbours[dst].add(src)
    done = [0.0] * P  # end of the previous tick, per rank
    spans: list[list] = [[] for _ in range(P)]
    for t in range(table.num_ticks):
        starts = [max(done[n] for n in neighbours[r]) for r in range(P)]
        for r in range(P):
            op = table.op(t, r)
            done[r] = starts[r] + costs.of(op)
            spans[r].append((op, starts[r], done[r]))
    busy = tuple(sum(costs.of(op) for op in table.rank_ops(r)) for r in range(P))
    return Timing(max(done), busy, tuple(map(tuple, spans)))


def formula(schedule: Schedule, pp: int, costs: Costs = Costs()) -> float:
    """The closed-form bubble per rank (README / report Table 2). `pp` counts ranks; DualPipeV's
    PP in the formula is its number of stages, 2*pp."""
    if schedule in (Schedule.ONE_F_ONE_B, Schedule.GPIPE):
        return (pp - 1) * (costs.F + costs.B)
    stages = pp if schedule is Schedule.DUALPIPE else 2 * pp
    return (stages / 2 - 1) * (costs.FB + costs.B - 3 * costs.W)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The bubble figures of one schedule instance."""

    schedule: Schedule
    pp: int
    microbatches: int
    ticks: int
    table_bubble: float  # idle (tick, rank) cells / all cells, every op one cell
    asynchronous: Timing
    lockstep: Timing
    formula: float
    peak_live: tuple[int, ...]  # per rank, stage inputs from F to B/Bi (the paper's measure)
    act_slots: tuple[int, ...]  # per rank, stage-input buffer slots the tick table needs
    grd_slots: tuple[int, ...]
    wres_slots: tuple[int, ...] = ()  # per rank, W residual sets (exact split; 0 otherwise)

    def to_json(self) -> dict:
        return {
            "schedule": self.schedule.value,
            "pp": self.pp,
            "microbatches": self.microbatches,
            "ticks": self.ticks,
            "table_bubble": self.table_bubble,
            "async": {
                "makespan": self.asynchronous.makespan,
                "idle": self.asynchronous.idle,
                "bubble": self.asynchronous.bubble,
            },
            "lockstep": {
                "makespan": self.lockstep.makespan,
                "idle": self.lockstep.idle,
                "bubble": self.lockstep.bubble,
            },
            "formula": self.formula,
            "peak_live": self.peak_live,
            "act_slots": self.act_slots,
            "grd_slots": self.grd_slots,
            "wres_slots": self.wres_slots,
        }


def summarize(
    orders: OpOrders,
    costs: Costs = Costs(),
    split: parallel_config.BackwardSplit = parallel_config.BackwardSplit.EXACT,
) -> Summary:
    table = ticks.build(orders, split)
    idle_cells = int((table.code == ticks.Code.IDLE).sum())
    return Summary(
        schedule=orders.schedule,
        pp=orders.pp,
        microbatches=orders.microbatches,
        ticks=table.num_ticks,
        table_bubble=idle_cells / table.code.size,
        asynchronous=asynchronous(orders, costs),
        lockstep=lockstep(table, costs),
        formula=formula(orders.schedule, orders.pp, costs),
        peak_live=tuple(schedules.peak_live(orders)),
        act_slots=tuple(int(x) for x in table.act_peak),
        grd_slots=tuple(int(x) for x in table.grd_peak),
        wres_slots=tuple(int(x) for x in table.wres_peak),
    )
