"""Cost model: the asynchronous and lock-step figures of dualpipe.md 1.5 / 2.4 / 4.2, and the closed
forms for every schedule."""

import pytest

from deepseek_jax.parallel.pipeline import costmodel, schedules, ticks
from deepseek_jax.parallel.pipeline.costmodel import Costs
from deepseek_jax.parallel.pipeline.schedules import Schedule


@pytest.mark.parametrize(
    "pp,m,idle,makespan",
    [(4, 8, 2, 26), (8, 16, 6, 54), (8, 20, 6, 66), (8, 32, 6, 102), (16, 32, 14, 110)],
)
def test_dualpipe_asynchronous_idle_equals_formula(pp, m, idle, makespan):
    orders = schedules.dualpipe(pp, m)
    timing = costmodel.asynchronous(orders)
    assert timing.makespan == makespan
    assert timing.idle == (idle,) * pp  # every rank, not just the sum
    assert costmodel.formula(Schedule.DUALPIPE, pp) == idle


@pytest.mark.parametrize(
    "pp,m,lockstep,async_", [(4, 8, 26, 26), (8, 16, 60, 54), (8, 32, 108, 102), (16, 32, 128, 110)]
)
def test_lockstep_vs_asynchronous_makespan(pp, m, lockstep, async_):
    orders = schedules.dualpipe(pp, m)
    assert costmodel.lockstep(ticks.build(orders)).makespan == lockstep
    assert costmodel.asynchronous(orders).makespan == async_


@pytest.mark.parametrize("pp,m", [(2, 4), (3, 7), (4, 8), (8, 20)])
def test_one_f_one_b_and_gpipe_match_closed_form(pp, m):
    costs = Costs(F=1.5, B=2.5, Bi=1, W=1, FB=4)
    for schedule in (Schedule.ONE_F_ONE_B, Schedule.GPIPE):
        timing = costmodel.asynchronous(schedules.build(schedule, pp, m), costs)
        bubble = (pp - 1) * (costs.F + costs.B)
        assert timing.makespan == m * (costs.F + costs.B) + bubble
        assert timing.idle == (costmodel.formula(schedule, pp, costs),) * pp == (bubble,) * pp


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 10), (8, 16)])
def test_dualpipev_matches_closed_form_with_twice_the_stages(pp, m):
    timing = costmodel.asynchronous(schedules.dualpipev(pp, m))
    assert timing.idle == ((pp - 1) * (3 + 2 - 3),) * pp
    assert costmodel.formula(Schedule.DUALPIPEV, pp) == (pp - 1) * 2


def test_dualpipe_formula_is_exact_only_at_the_reference_proportions():
    # Scaling every cost scales the idle time: still exactly the formula.
    scaled = Costs(F=2.5, B=5, Bi=2.5, W=2.5, FB=7.5)
    for pp, m in [(4, 8), (8, 24)]:
        timing = costmodel.asynchronous(schedules.dualpipe(pp, m), scaled)
        assert timing.idle == (costmodel.formula(Schedule.DUALPIPE, pp, scaled),) * pp
    # Other proportions: the formula is only the README's estimate; the timeline decides.
    # (F=B=2: the warm-up forwards cost as much as backwards, 12 idle instead of 9.)
    other = Costs(F=2, B=2, Bi=1, W=1, FB=4)
    timing = costmodel.asynchronous(schedules.dualpipe(8, 24), other)
    assert costmodel.formula(Schedule.DUALPIPE, 8, other) == 9
    assert timing.idle == (12,) * 8


def test_lockstep_is_never_faster_than_asynchronous():
    costs = Costs(F=1, B=2, Bi=1, W=1, FB=3)
    for schedule in schedules.SCHEDULES:
        for pp, m in [(2, 4), (4, 8), (4, 12), (6, 12)]:
            orders = schedules.build(schedule, pp, m)
            table = ticks.build(orders)
            a, lk = costmodel.asynchronous(orders, costs), costmodel.lockstep(table, costs)
            assert lk.makespan >= a.makespan
            assert lk.busy == a.busy


def test_summary_and_unit_costs_reproduce_the_table_bubble():
    # With every op one unit the lock-step timeline is the tick table itself.
    unit = Costs(F=1, B=1, Bi=1, W=1, FB=1)
    summary = costmodel.summarize(schedules.dualpipe(8, 16), unit)
    assert summary.ticks == summary.lockstep.makespan == 34
    assert summary.table_bubble == pytest.approx(22 / 272)
    assert summary.lockstep.bubble == pytest.approx(22 / 272)
    assert summary.peak_live == (9,) * 8
    assert summary.to_json()["async"]["makespan"] == summary.asynchronous.makespan


def test_costs_parse_and_reject():
    assert Costs.parse("") == Costs()
    assert Costs.parse("F=2, B=3,F&B=4,Bi=1.5") == Costs(F=2, B=3, Bi=1.5, W=1, FB=4)
    for bad, msg in [
        ("X=1", "KEY=VALUE"),
        ("F", "KEY=VALUE"),
        ("F=a", "not a number"),
        ("W=0", "must be positive"),
        ("B=-1", "must be positive"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Costs.parse(bad)
