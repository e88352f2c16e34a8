"""Per-rank op orders: equality with the official DualPipe traces, DualPipeV's relation to DualPipe,
completeness over a grid, the activation peaks, and bad input."""

import json
import pathlib

import pytest

from deepseek_jax.parallel.pipeline import schedules
from deepseek_jax.parallel.pipeline.schedules import Op, OpKind, OpOrders, Schedule

DATA = pathlib.Path(__file__).parent / "data"
COMPUTE = {k.value for k in OpKind}
GRID = [(pp, m) for pp in (1, 2, 3, 4, 6, 8) for m in (1, 2, 3, 4, 7, 8, 12, 16, 17, 20, 32)]


def reference_orders(pp: int, num_chunks: int) -> list[list[Op]]:
    """Compute events (comm events dropped) of a recorded official trace."""
    doc = json.loads((DATA / f"dualpipe_trace_pp{pp}_mb{num_chunks}.json").read_text())
    assert (doc["pp"], doc["num_chunks"]) == (pp, num_chunks)
    return [[Op.from_json(e) for e in rank if e["op"] in COMPUTE] for rank in doc["ranks"]]


def plans(schedule: Schedule):
    for pp, m in GRID:
        try:
            yield schedules.build(schedule, pp, m)
        except ValueError:
            continue


@pytest.mark.parametrize("pp,num_chunks", [(4, 8), (8, 16)])
def test_dualpipe_equals_official_trace(pp, num_chunks):
    ours = schedules.dualpipe(pp, num_chunks)
    ref = reference_orders(pp, num_chunks)
    assert len(ours.ranks) == len(ref) == pp
    for r in range(pp):
        assert list(ours.ranks[r]) == ref[r], f"rank {r}"
    # Fields the comparison rests on, so an Op that ignored c2/m2 could not pass.
    assert any(op.kind is OpKind.FB and op.c2 is not None for op in ours.ranks[0])


def test_pp8_op_counts_and_rank0_shape():
    # dualpipe.md 2.3: per-rank op counts 34, 32, 30, 29, 29, 30, 32, 34.
    orders = schedules.dualpipe(8, 16)
    assert [len(ops) for ops in orders.ranks] == [34, 32, 30, 29, 29, 30, 32, 34]
    kinds = [op.kind for op in orders.ranks[0]]
    assert kinds[:6] == [OpKind.F] * 6 and kinds[-1] is OpKind.W


@pytest.mark.parametrize("pp,m", [(4, 10), (2, 4), (3, 6), (4, 8), (5, 13), (1, 2)])
def test_dualpipev_is_half_of_dualpipe_with_twice_the_ranks(pp, m):
    v = schedules.dualpipev(pp, m)
    d = schedules.dualpipe(2 * pp, 2 * m)
    assert v.ranks == d.ranks[:pp]
    assert v.num_stages == 2 * pp and v.per_chunk == m


@pytest.mark.parametrize("schedule", schedules.SCHEDULES)
def test_every_plan_on_the_grid_is_complete(schedule):
    built = list(plans(schedule))
    assert len(built) >= 10
    for orders in built:
        schedules.check_order(orders)
        for ops in orders.ranks:
            forwards = [p for op in ops for p in op.parts() if p[0] is OpKind.F]
            assert len(forwards) == orders.chunks * orders.per_chunk


def test_one_f_one_b_shape():
    orders = schedules.one_f_one_b(4, 6)
    text = [" ".join(str(op) for op in ops) for ops in orders.ranks]
    assert text[0].startswith("F(0,0) F(0,1) F(0,2) F(0,3) B(0,0) F(0,4) B(0,1)")
    assert text[3].startswith("F(0,0) B(0,0) F(0,1) B(0,1)")
    gp = schedules.gpipe(3, 3)
    assert " ".join(map(str, gp.ranks[1])) == "F(0,0) F(0,1) F(0,2) B(0,2) B(0,1) B(0,0)"


@pytest.mark.parametrize("pp", [2, 4, 8, 16])
def test_peak_live_activations(pp):
    # F to B/Bi, the README's measure: PP+1 for DualPipe at any M, PP for 1F1B, M for GPipe.
    for m in (2 * pp, 2 * pp + 2, 4 * pp):
        assert max(schedules.peak_live(schedules.dualpipe(pp, m))) == pp + 1
    assert schedules.peak_live(schedules.one_f_one_b(pp, 2 * pp)) == list(range(pp, 0, -1))
    assert schedules.peak_live(schedules.gpipe(pp, 3)) == [3] * pp
    assert max(schedules.peak_live(schedules.dualpipev(pp, 2 * pp))) == 2 * pp + 1


def _with_rank0(orders: OpOrders, ops: list[Op]) -> OpOrders:
    return OpOrders(
        orders.schedule, orders.pp, orders.microbatches, (tuple(ops),) + orders.ranks[1:]
    )


def test_check_order_rejects_broken_orders():
    orders = schedules.dualpipe(4, 8)
    ops = list(orders.ranks[0])
    w = next(i for i, op in enumerate(ops) if op.kind is OpKind.W)
    bi = next(i for i, op in enumerate(ops) if op.kind is OpKind.BI)
    with pytest.raises(ValueError, match="incomplete"):
        schedules.check_order(_with_rank0(orders, ops[:w] + ops[w + 1 :]))
    with pytest.raises(ValueError, match=r"W\(1,0\) after \['F'\]"):
        moved = ops[:bi] + [ops[w], ops[bi]] + ops[w + 1 :]
        schedules.check_order(_with_rank0(orders, moved))
    with pytest.raises(ValueError, match="after"):
        schedules.check_order(_with_rank0(orders, ops + [Op(OpKind.F, 0, 0)]))
    with pytest.raises(ValueError, match="outside"):
        schedules.check_order(_with_rank0(orders, ops + [Op(OpKind.F, 0, 4)]))
    schedules.check_order(orders)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: schedules.dualpipe(5, 20), "even number of pipeline ranks"),
        (lambda: schedules.dualpipe(4, 6), "even number of micro-batches >= 2\\*pp=8"),
        (lambda: schedules.dualpipe(4, 9), "even number of micro-batches"),
        (lambda: schedules.dualpipe(0, 8), "pp must be a positive integer"),
        (lambda: schedules.dualpipev(4, 7), ">= 2\\*pp=8"),
        (lambda: schedules.one_f_one_b(4, 0), "m must be a positive integer"),
        (lambda: schedules.gpipe(-1, 4), "pp must be a positive integer"),
        (lambda: schedules.build("zb", 4, 8), "is not a valid Schedule"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_op_json_round_trip_and_schedule_values():
    op = Op(OpKind.FB, 0, 3, 1, 1)
    assert op.to_json() == {"op": "F&B", "c": 0, "m": 3, "c2": 1, "m2": 1}
    assert Op.from_json(op.to_json()) == op
    assert Op.from_json({"op": "Bi", "c": 1, "m": 2}).to_json() == {"op": "Bi", "c": 1, "m": 2}
    assert [s.value for s in schedules.SCHEDULES] == ["dualpipe", "dualpipev", "1f1b", "gpipe"]
