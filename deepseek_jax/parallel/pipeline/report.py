"""Presenting schedules: the bubble table as text, the JSON document, and the timeline picture.

The picture follows Figure 5 of the DeepSeek-V3 report: ranks top to bottom, time left to right,
one box per op sized by its cost, forward / backward / backward-for-input / weight in different
colours, chunk 1 (DualPipe's second direction, DualPipeV's way back up) a lighter shade, the
micro-batch number in each box, and F&B boxes split into a forward and a backward half.
"""

from __future__ import annotations

from deepseek_jax.parallel.pipeline import costmodel, schedules
from deepseek_jax.parallel.pipeline.costmodel import Costs, Summary, Timing
from deepseek_jax.parallel.pipeline.schedules import OpKind, OpOrders

# (chunk 0, chunk 1) colours per elementary kind.
_COLOURS = {
    OpKind.F: ("#e8862a", "#f8c998"),
    OpKind.B: ("#2f6db5", "#9dbde6"),
    OpKind.BI: ("#2a9d8f", "#9ed8d0"),
    OpKind.W: ("#5a9e3a", "#bfe0a8"),
}
_NAMES = {
    OpKind.F: "forward",
    OpKind.B: "backward",
    OpKind.BI: "backward for input",
    OpKind.W: "backward for weights",
}


def _ranks(values: tuple) -> str:
    """Per-rank values, collapsed when all equal."""
    vals = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    return vals[0] if len(set(vals)) == 1 else ",".join(vals)


def text(summaries: list[Summary | tuple[str, str]], costs: Costs) -> str:
    """One line per schedule; a (name, reason) pair stands for a schedule that does not apply."""
    c = costs
    lines = [
        f"costs F={c.F:g} B={c.B:g} Bi={c.Bi:g} W={c.W:g} F&B={c.FB:g}; idle = makespan - busy "
        "per rank; formulas: 1F1B/GPipe (PP-1)(F+B), DualPipe(V) (PP/2-1)(F&B+B-3W) with PP the "
        "number of stages",
        f"{'schedule':<10} {'PP':>3} {'M':>4} {'ticks':>5} {'tbl%':>5} | {'async':>6} {'idle':>6} "
        f"{'bub%':>5} | {'lockst':>6} {'idle':>6} {'bub%':>5} | {'formula':>7} | "
        "live F..B/rank; act slots; grd slots",
    ]
    for s in summaries:
        if isinstance(s, tuple):
            lines.append(f"{s[0]:<10} n/a: {s[1]}")
            continue
        a, lk = s.asynchronous, s.lockstep
        lines.append(
            f"{s.schedule.value:<10} {s.pp:>3} {s.microbatches:>4} {s.ticks:>5} "
            f"{100 * s.table_bubble:>5.1f} | {a.makespan:>6g} {_ranks(a.idle):>6} "
            f"{100 * a.bubble:>5.1f} | {lk.makespan:>6g} {_ranks(lk.idle):>6} "
            f"{100 * lk.bubble:>5.1f} | {s.formula:>7g} | {_ranks(s.peak_live)}; "
            f"{_ranks(s.act_slots)}; {_ranks(s.grd_slots)}"
        )
    return "\n".join(lines)


def document(orders: OpOrders, summary: Summary, costs: Costs) -> dict:
    """The JSON document: per-rank compute order in the reference traces' format, plus figures."""
    return {
        "schedule": orders.schedule.value,
        "pp": orders.pp,
        "microbatches": orders.microbatches,
        "costs": {"F": costs.F, "B": costs.B, "Bi": costs.Bi, "W": costs.W, "F&B": costs.FB},
        "ranks": [[op.to_json() for op in ops] for ops in orders.ranks],
        "bubble": summary.to_json(),
    }


def _draw_timeline(ax, timing: Timing, pp: int, title: str) -> None:
    from matplotlib.patches import Rectangle

    for r, spans in enumerate(timing.spans):
        y = pp - 1 - r
        for op, start, end in spans:
            if op is None or end <= start:
                continue
            parts = op.parts()
            h = 0.9 / len(parts)
            for i, (kind, c, m) in enumerate(parts):
                y0 = y - 0.45 + (len(parts) - 1 - i) * h  # F&B: forward on top
                ax.add_patch(
                    Rectangle(
                        (start, y0),
                        end - start,
                        h,
                        facecolor=_COLOURS[kind][c],
                        edgecolor="black",
                        linewidth=0.4,
                    )
                )
                ax.text(
                    (start + end) / 2,
                    y0 + h / 2,
                    str(m),
                    ha="center",
                    va="center",
                    fontsize=6 if len(parts) > 1 else 7,
                )
    ax.set_xlim(0, timing.makespan)
    ax.set_ylim(-0.6, pp - 0.4)
    ax.set_yticks(range(pp), [f"rank {r}" for r in reversed(range(pp))], fontsize=7)
    ax.set_xlabel("time (cost units)", fontsize=8)
    ax.set_title(title, fontsize=9)


def png(orders: OpOrders, path: str, costs: Costs = Costs()) -> None:
    """Draw the asynchronous timeline (as the reference runs) above the lock-step one."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    from deepseek_jax.parallel.pipeline import ticks

    timings = [
        costmodel.asynchronous(orders, costs),
        costmodel.lockstep(ticks.build(orders), costs),
    ]
    width = max(8.0, min(40.0, timings[1].makespan * 0.22))
    fig, axes = plt.subplots(2, 1, figsize=(width, 1.2 + 0.9 * orders.pp), squeeze=True)
    name = f"{orders.schedule.value}, {orders.pp} ranks, {orders.microbatches} micro-batches"
    for ax, timing, how in zip(axes, timings, ("asynchronous", "lock-step ticks")):
        idle = _ranks(timing.idle)
        _draw_timeline(
            ax,
            timing,
            orders.pp,
            f"{name}: {how}, makespan {timing.makespan:g}, idle per rank {idle}",
        )
    kinds = sorted(
        {k for ops in orders.ranks for op in ops for k, _, _ in op.parts()}, key=list(OpKind).index
    )
    handles = [
        Patch(facecolor=_COLOURS[k][c], edgecolor="black", label=f"{_NAMES[k]}, chunk {c}")
        for k in kinds
        for c in range(orders.chunks)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summaries(
    pp: int, microbatches: int, costs: Costs, only: schedules.Schedule | None = None
) -> list[Summary | tuple[str, str]]:
    """Summaries of every schedule (or `only`); inapplicable ones as (name, reason)."""
    out: list[Summary | tuple[str, str]] = []
    for s in [only] if only else list(schedules.SCHEDULES):
        try:
            out.append(costmodel.summarize(schedules.build(s, pp, microbatches), costs))
        except ValueError as e:
            out.append((s.value, str(e)))
    return out
