"""Tick tables: equality with the reference tables, the executor-facing arrays, buffer slots, and
the symbolic simulator accepting every generated table and rejecting broken ones."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from deepseek_jax.parallel.config import BackwardSplit
from deepseek_jax.parallel.pipeline import schedules, ticks, ticksim
from deepseek_jax.parallel.pipeline.schedules import Op, OpKind, OpOrders, Schedule
from deepseek_jax.parallel.pipeline.ticks import Channel, Code

DATA = pathlib.Path(__file__).parent / "data"
GRID = [(pp, m) for pp in (1, 2, 3, 4, 6, 8) for m in (1, 2, 4, 7, 8, 12, 16, 17, 20)]


def all_tables():
    for schedule in schedules.SCHEDULES:
        for pp, m in GRID:
            try:
                orders = schedules.build(schedule, pp, m)
            except ValueError:
                continue
            yield orders, ticks.build(orders)


@pytest.fixture(scope="module")
def tables():
    return list(all_tables())


@pytest.mark.parametrize("pp,num_chunks,num_ticks,busy", [(4, 8, 16, 62), (8, 16, 34, 250)])
def test_dualpipe_equals_reference_tick_table(pp, num_chunks, num_ticks, busy):
    doc = json.loads((DATA / f"dualpipe_trace_pp{pp}_mb{num_chunks}_ticks.json").read_text())
    ref = [[None if e is None else Op.from_json(e) for e in row] for row in doc["ticks"]]
    table = ticks.build(schedules.dualpipe(pp, num_chunks))
    ours = [[table.op(t, r) for t in range(table.num_ticks)] for r in range(pp)]
    assert ours == ref
    assert table.num_ticks == num_ticks
    assert int((table.code != Code.IDLE).sum()) == busy


def test_every_table_simulates_and_keeps_each_rank_order(tables):
    assert len(tables) > 60
    for orders, table in tables:
        ticksim.check(table)
        for r in range(orders.pp):
            assert table.rank_ops(r) == list(orders.ranks[r])


def test_arrays_are_static_int32_and_consistent(tables):
    for orders, table in tables:
        T, P, K = table.num_ticks, orders.pp, orders.chunks
        for name in ("code", "c", "m", "c2", "m2", "act", "grd", "act2", "grd2", "wres"):
            a = getattr(table, name)
            assert a.shape == (T, P) and a.dtype == np.int32 and not a.flags.writeable, name
        assert table.send.shape == table.recv.shape == (T, P, 4)
        assert table.stage.shape == table.is_first.shape == table.is_last.shape == (P, K)
        idle = table.code == Code.IDLE
        assert (table.c[idle] == -1).all() and (table.act[idle] == -1).all()
        fb = table.code == Code.FB
        assert ((table.c2 >= 0) == fb).all() and ((table.act2 >= 0) == fb).all()
        w = table.code == Code.W  # the exact split's W reads only its residual slot
        reads = ~idle & ~w
        assert (table.act[reads] >= 0).all() and (table.act[reads] < table.act_slots).all()
        assert (table.act[w] == -1).all() and (table.grd[w] == -1).all()
        bi_w = (table.code == Code.BI) | w
        assert ((table.wres >= 0) == bi_w).all() and (table.wres < table.wres_slots).all()
        assert table.recv.max() < max(table.act_slots, table.grd_slots)
        # Every flagged send has exactly one receive slot somewhere at the same tick.
        assert table.send.sum() == (table.recv >= 0).sum()


def test_dualpipe_placement_and_channels():
    table = ticks.build(schedules.dualpipe(4, 8))
    assert table.stage.tolist() == [[0, 3], [1, 2], [2, 1], [3, 0]]
    assert table.is_first.tolist() == [[1, 0], [0, 0], [0, 0], [0, 1]]
    assert table.is_last.tolist() == [[0, 1], [0, 0], [0, 0], [1, 0]]
    assert table.perms[Channel.ACT0] == ((0, 1), (1, 2), (2, 3))
    assert table.perms[Channel.ACT1] == ((1, 0), (2, 1), (3, 2))
    assert table.perms[Channel.GRD0] == table.perms[Channel.ACT1]
    assert table.perms[Channel.GRD1] == table.perms[Channel.ACT0]
    assert table.loopback == ()
    # Tick 0: rank 0 runs F(0,0) and sends on ACT0; rank 1 stores it at the end of tick 0.
    assert table.send[0, 0].tolist() == [1, 0, 0, 0] and table.recv[0, 1, Channel.ACT0] >= 0
    # F(0,3)&B(1,1) on rank 0 at tick 7: the activation goes to rank 1 on ACT0 and chunk 1's
    # input gradient to rank 1 on GRD1; chunk 1 is direction 1's last stage here, so B starts
    # from the loss and reads no received gradient.
    assert table.op(7, 0) == Op(OpKind.FB, 0, 3, 1, 1)
    assert table.send[7, 0].tolist() == [1, 0, 0, 1]
    assert table.grd[7, 0] == -1 and table.grd2[7, 0] == -1  # chunk 1 is last on rank 0


def test_dualpipev_turn_is_a_local_loopback():
    orders = schedules.dualpipev(4, 8)
    table = ticks.build(orders)
    assert table.stage.tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert table.is_first[:, 0].tolist() == [1, 0, 0, 0] and table.is_first[:, 1].sum() == 0
    assert table.is_last[:, 1].tolist() == [1, 0, 0, 0] and table.is_last[:, 0].sum() == 0
    assert table.loopback == ((3, Channel.ACT0, Channel.ACT1), (3, Channel.GRD1, Channel.GRD0))
    f = [t for t in range(table.num_ticks) if table.op(t, 3) == Op(OpKind.F, 0, 0)][0]
    assert table.send[f, 3, Channel.ACT0] == 1 and table.recv[f, 3, Channel.ACT1] >= 0
    # Without the loopback the turn's payloads would have nowhere to go.
    with pytest.raises(ValueError, match="no slot|nothing sent"):
        ticksim.check(dataclasses.replace(table, loopback=()))


def test_one_chunk_schedules_use_two_channels():
    table = ticks.build(schedules.one_f_one_b(4, 8))
    assert table.perms[Channel.ACT1] == () == table.perms[Channel.GRD1]
    assert table.send[:, :, [Channel.ACT1, Channel.GRD1]].sum() == 0


def _live_intervals(orders: OpOrders, table: ticks.TickTable, r: int) -> list[tuple[int, int]]:
    """Stage-input live intervals of rank r, rebuilt from the table's op arrays alone."""
    ticks_of: dict[tuple, list[int]] = {}
    for t in range(table.num_ticks):
        for rank in range(orders.pp):
            op = table.op(t, rank)
            for kind, c, m in op.parts() if op else ():
                ticks_of.setdefault((rank, c, m, kind), []).append(t)
    out = []
    for c in range(orders.chunks):
        for m in range(orders.per_chunk):
            src = orders.upstream(r, c)
            start = (
                ticks_of[(r, c, m, OpKind.F)][0]
                if src is None
                else (ticks_of[(*src, m, OpKind.F)][0] + 1)
            )
            end = max(
                t
                for (rank, cc, mm, _), ts in ticks_of.items()
                if (rank, cc, mm) == (r, c, m)
                for t in ts
            )
            out.append((start, end))
    return out


def _max_overlap(intervals):
    counts = np.zeros(max(e for _, e in intervals) + 2, int)
    for s, e in intervals:
        counts[s : e + 1] += 1
    return int(counts.max())


@pytest.mark.parametrize("split", list(BackwardSplit), ids=lambda s: s.value)
@pytest.mark.parametrize("pp,m", [(4, 8), (4, 20), (8, 16), (8, 20), (16, 32)])
def test_buffer_slots(pp, m, split):
    table = ticks.build(schedules.dualpipe(pp, m), split)
    # Stage inputs that arrived but wait for their F take one slot beyond the F..B peak of PP+1.
    expected = [pp + 1, pp + 2, pp + 2, pp + 1] if pp == 4 else [pp + 2] * pp
    assert table.act_peak.tolist() == expected
    deferred = [min(r, pp - 1 - r) + 1 for r in range(pp)]  # the h+1 Ws of DualPipe's step 6
    if split is BackwardSplit.EXACT:
        # W reads only its residuals: h+1 residual sets per rank, and an output gradient is
        # freed at its Bi (at most 2 live: one in use, one already arrived for the next B).
        assert table.wres_peak.tolist() == deferred
        assert table.grd_peak.max() <= 2
    else:
        assert table.grd_peak.tolist() == deferred
        assert table.wres_slots == 0
    for build in (schedules.one_f_one_b, schedules.gpipe):  # no Bi/W: no residual buffers
        one = ticks.build(build(pp, m), split)
        assert one.act_slots == (pp if build is schedules.one_f_one_b else m)
        assert one.wres_slots == 0


def test_colouring_is_tight(tables):
    # Slots per rank == the most stage inputs live at once (interval colouring is optimal).
    for orders, table in tables[::5]:
        for r in range(orders.pp):
            assert table.act_peak[r] == _max_overlap(_live_intervals(orders, table, r))


def test_broken_tables_are_rejected():
    table = ticks.build(schedules.dualpipe(4, 8))
    ticksim.check(table)
    with pytest.raises(ValueError, match="incomplete"):
        ticksim.check(ticksim.drop_op(table, OpKind.W))
    with pytest.raises(ValueError):
        ticksim.check(ticksim.drop_op(table, OpKind.B))
    with pytest.raises(ValueError):
        ticksim.check(ticksim.drop_op(table, OpKind.FB, 3))
    for ch in Channel:
        with pytest.raises(ValueError, match="slot"):
            ticksim.check(ticksim.swap_recv(table, ch))
    # A payload stored over a value that is still to be read: f1 into f0's slot on rank 1.
    recv = table.recv.copy()
    assert recv[0, 1, Channel.ACT0] != recv[1, 1, Channel.ACT0]
    recv[1, 1, Channel.ACT0] = recv[0, 1, Channel.ACT0]
    with pytest.raises(ValueError, match="tick 1 rank 1: act slot .* overwritten while"):
        ticksim.check(ticksim._replace(table, recv=recv))
    # A W run before its Bi (ticks 4 and 5 of rank 0 swapped).
    assert (table.op(4, 0), table.op(5, 0)) == (Op(OpKind.BI, 1, 0), Op(OpKind.W, 1, 0))
    cols = {k: getattr(table, k).copy() for k in ("code", "c", "m", "act", "grd", "send")}
    for a in cols.values():
        a[[4, 5], 0] = a[[5, 4], 0]
    with pytest.raises(ValueError, match=r"tick 4 rank 0: W\(1,0\) before its Bi"):
        ticksim.check(ticksim._replace(table, **cols))
    # A send flag the executor would not act on.
    send = table.send.copy()
    send[0, 0, Channel.ACT0] = 0
    with pytest.raises(ValueError, match="tick 0 rank 0: send flag on ACT0"):
        ticksim.check(ticksim._replace(table, send=send))
    # A reader pointed at the wrong slot.
    act = table.act.copy()
    t, r = np.argwhere(table.code == Code.B)[0]
    act[t, r] = (act[t, r] + 1) % table.act_slots
    with pytest.raises(ValueError, match="holds"):
        ticksim.check(ticksim._replace(table, act=act))
    # A W pointed at another Bi's residual slot (rank 1 holds two residual sets at a time).
    wres = table.wres.copy()
    t = np.flatnonzero(table.code[:, 1] == Code.W)[0]
    wres[t, 1] = (wres[t, 1] + 1) % table.wres_slots
    with pytest.raises(ValueError, match="wres slot .* holds"):
        ticksim.check(ticksim._replace(table, wres=wres))
    # An op moved one tick before its input arrives.
    code = table.code.copy()
    cols = {k: getattr(table, k).copy() for k in ("c", "m", "act", "grd")}
    assert table.code[0, 1] == Code.IDLE and table.op(1, 1) == Op(OpKind.F, 0, 0)
    for a in [code, *cols.values()]:
        a[[0, 1], 1] = a[[1, 0], 1]
    send = table.send.copy()
    send[[0, 1], 1] = send[[1, 0], 1]
    with pytest.raises(ValueError):
        ticksim.check(ticksim._replace(table, code=code, send=send, **cols))


def test_deadlocked_orders_are_reported():
    f0, f1, b0, b1 = (
        Op(OpKind.F, 0, 0),
        Op(OpKind.F, 0, 1),
        Op(OpKind.B, 0, 0),
        Op(OpKind.B, 0, 1),
    )
    orders = OpOrders(Schedule.ONE_F_ONE_B, 2, 2, ((f0, b0, f1, b1), (f0, f1, b0, b1)))
    schedules.check_order(orders)
    with pytest.raises(ValueError, match="deadlock"):
        ticks.build(orders)
