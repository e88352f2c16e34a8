"""The pipelined train step against the unpipelined one, on 8 simulated CPU devices.

For every schedule: loss, metrics, gradients, parameters, expert biases and optimizer state after
one update equal the unpipelined step's (float32 within 1e-5, float64 within 1e-10, per leaf
max|a - b| / max|b|; float64 on a stage-only mesh, float32 also composed with the other mesh axes
where pipeline_harness.MESHES says so), the expert loads are identical, and the ops each rank
executed (logged inside the tick loop) are the schedule's. A table with one W removed or two
receive slots swapped, or two Ws reading each other's residual slots, run on the same compiled
program, must break the equality.
"""

import dataclasses

import jax
import numpy as np
import pytest

from deepseek_jax.parallel.config import BackwardSplit
from deepseek_jax.parallel.pipeline import schedules, stages, ticksim
from deepseek_jax.parallel.pipeline.schedules import Op, OpKind, Schedule
from deepseek_jax.parallel.pipeline.ticks import Channel, Code
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib
from tests.parallel import pipeline_harness as h

CASES = [
    (Schedule.DUALPIPE, 2),
    (Schedule.DUALPIPE, 4),
    (Schedule.DUALPIPEV, 2),
    (Schedule.ONE_F_ONE_B, 4),
    (Schedule.GPIPE, 4),
]
IDS = [f"{s.value}-pp{pp}" for s, pp in CASES]
DTYPES = ["float64", "float32"]


def _check_equal(got, want, tol):
    grads, new, metrics, aux, _, _ = got
    r_grads, r_new, r_metrics, r_aux = want
    for a, b in ((aux[1].load_E, r_aux[1].load_E), (aux[2].load_E, r_aux[2].load_E)):
        np.testing.assert_array_equal(a, b)  # identical routing: equal token counts per expert
    report = {
        "loss": h.max_rel(metrics["loss"], r_metrics["loss"]),
        "metrics": h.worst({k: metrics[k] for k in r_metrics}, r_metrics),
        "grads": h.worst(grads, r_grads),
        "params": h.worst(new.params, r_new.params),
        "expert_bias": h.worst(new.expert_bias, r_new.expert_bias),
        "opt_state": h.worst(new.opt_state, r_new.opt_state),
    }
    errors = {k: (v if isinstance(v, float) else v[0]) for k, v in report.items()}
    assert max(errors.values()) <= tol, report
    return errors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule,pp", CASES, ids=IDS)
def test_pipelined_step_equals_unpipelined(schedule, pp, dtype):
    comp = h.compiled(schedule, pp, dtype)
    errors = _check_equal(comp.run(), h.reference(dtype, comp.n_layers), h.TOL[dtype])
    mesh = " x ".join(f"{k}={v}" for k, v in comp.mesh.shape.items())
    print(
        f"{schedule.value} pp={pp} {dtype} ({mesh}, {comp.n_layers} layers): "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )


@pytest.mark.parametrize("schedule,pp,dtype", h.RECOMPUTE)
def test_recompute_split_equals_unpipelined(schedule, pp, dtype):
    comp = h.compiled(schedule, pp, dtype, BackwardSplit.RECOMPUTE)
    assert comp.pipe.table.wres_slots == 0 and comp.pipe.layout.split is BackwardSplit.RECOMPUTE
    errors = _check_equal(comp.run(), h.reference(dtype, comp.n_layers), h.TOL[dtype])
    print(
        f"{schedule.value} pp={pp} {dtype} recompute split: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )


@pytest.mark.parametrize("schedule,pp", CASES, ids=IDS)
def test_executed_ops_equal_the_schedule(schedule, pp):
    comp = h.compiled(schedule, pp, "float64")
    log = comp.run()[4]  # [P, T, 5]: code, c, m, c2, m2 per tick, written by the branch that ran
    orders = schedules.build(schedule, pp, h.MICROBATCHES)
    kinds = {
        Code.F: OpKind.F,
        Code.B: OpKind.B,
        Code.BI: OpKind.BI,
        Code.W: OpKind.W,
        Code.FB: OpKind.FB,
    }
    for r in range(pp):
        ops = []
        for code, c, m, c2, m2 in log[r].tolist():
            if code != Code.IDLE:
                fb = code == Code.FB
                ops.append(Op(kinds[Code(code)], c, m, c2 if fb else None, m2 if fb else None))
        assert ops == list(orders.ranks[r]), r
    assert log.shape[1] == comp.pipe.layout.ticks


def test_dualpipe_copies_both_contribute_and_stay_identical():
    grads, new, _, _, _, d_stack = h.compiled(Schedule.DUALPIPE, 4, "float64").run()
    pp = 4
    for s in range(pp):
        w0 = d_stack["attn"]["wo"]["kernel"][s, 0, 0]  # stage s, direction 0, on rank s
        w1 = d_stack["attn"]["wo"]["kernel"][pp - 1 - s, 1, 0]  # its copy on rank PP-1-s
        assert np.abs(w0).max() > 0 and np.abs(w1).max() > 0
        assert h.max_rel(w0, w1) > 1e-3  # different micro-batches
        np.testing.assert_allclose(
            w0 + w1, grads["moe_layers"]["attn"]["wo"]["kernel"][s], rtol=1e-12, atol=1e-15
        )
    # The next step's copies are gathered from the one updated canonical array.
    table = h.compiled(Schedule.DUALPIPE, 4, "float64").pipe.table
    stack, _ = stages.split(new.params)
    pipe = stages.to_pipeline(stack, np.asarray(table.stage), pp)
    for r in range(pp):
        np.testing.assert_array_equal(pipe["ffn"]["w1"][r, 0], pipe["ffn"]["w1"][pp - 1 - r, 1])


# With the exact split every DualPipe PP=4 rank needs one grd slot, so no gradient receive can be
# misrouted between slots; the residual slots (Bi -> W) are the buffer a W can misread instead.
@pytest.mark.parametrize("broken", ["drop_w", "swap_act_recv", "swap_wres"])
def test_broken_table_breaks_equality(broken):
    comp = h.compiled(Schedule.DUALPIPE, 4, "float64")
    table = comp.pipe.table
    bad = {
        "drop_w": lambda: ticksim.drop_op(table, OpKind.W),
        "swap_act_recv": lambda: ticksim.swap_recv(table, Channel.ACT1),
        "swap_wres": lambda: ticksim.swap_wres(table),
    }[broken]()
    with pytest.raises(ValueError):
        ticksim.check(bad)
    grads = comp.run(bad)[0]
    err, where = h.worst(grads, h.reference("float64")[0])
    print(f"{broken}: gradient error {err:.2e} at {where}")
    assert err > 1e-3, (err, where)


def test_zero1_state_is_split_over_data():
    # The float32 DualPipe PP=2 equality runs on pipe=2 x expert=2 x data=2 with parallel.zero=1:
    # every optimizer-state moment is split over `data` (and the MoE stack's over `pipe` too).
    comp = h.compiled(Schedule.DUALPIPE, 2, "float32")
    plan = comp.plan
    assert plan.cfg.zero == 1 and plan.mesh.shape["data"] == 2
    st, _ = h.placed(plan, "float32", comp.n_layers)
    for path, leaf in jax.tree_util.tree_leaves_with_path(st.opt_state):
        if leaf.ndim:
            spec = leaf.sharding.spec
            names = {a for e in spec if e for a in ((e,) if isinstance(e, str) else e)}
            assert "data" in names, (jax.tree_util.keystr(path), spec)
            assert leaf.addressable_shards[0].data.size * 2 <= leaf.size
    for leaf in jax.tree.leaves(st.params):  # parameters are not split over data
        assert all(
            "data" not in ((e,) if isinstance(e, str) else (e or ())) for e in leaf.sharding.spec
        )


def test_uneven_stages_equal_unpipelined():
    # 3 MoE layers on 2 stages (h.UNEVEN, whose equality test_pipelined_step_equals_unpipelined
    # checks): stage 1 holds one real layer and one padding slot, which must act as the
    # identity, get exactly zero gradient and never reach the state.
    comp = h.compiled(*h.UNEVEN)
    assert comp.n_layers == 4 and stages.layer_counts(3, 2) == (2, 1)
    got = comp.run()
    errors = _check_equal(got, h.reference("float32", 4), h.TOL["float32"])
    grads, new, d_stack = got[0], got[1], got[5]
    active = comp.pipe.tables()["active"]  # [P, K, Ls]
    assert (active == 0).sum() == 2  # the padding slot of each of stage 1's two copies
    for path, g in jax.tree_util.tree_leaves_with_path(d_stack):
        assert np.abs(g[active == 0]).max() == 0, path  # padding: exactly zero gradient
        assert np.abs(g[active == 1]).max() > 0, path
    # The state and its gradients hold the 3 real layers only; the stack is split over `pipe`
    # on a layer dimension, since 2 ranks do not divide 3 layers.
    assert {leaf.shape[0] for leaf in jax.tree.leaves(new.params["moe_layers"])} == {3}
    assert {leaf.shape[0] for leaf in jax.tree.leaves(grads["moe_layers"])} == {3}
    st, _ = h.placed(comp.plan, "float32", 4)
    spec = st.params["moe_layers"]["ffn"]["w1"].sharding.spec
    assert spec[0] is None and "pipe" in str(spec), spec
    print("dualpipe pp=2 float32 uneven (2 + 1 layers): " + str(errors))


def test_packed_rows_change_the_step():
    """The float32 programs above run packed rows (pipeline_harness.PACKED) and equal the
    unpipelined step on them; that means something only if the segment ids change the loss."""
    st, batch = h.state("float32")
    assert batch.segment_ids is not None and int(batch.segment_ids.max()) == 3
    graphdef, _, _ = state_lib.abstract_model(h.model_config("float32"))
    loss = jax.jit(lambda s, b: step_lib.loss_and_grads(graphdef, h.TRAIN, s, b)[0])
    plain = dataclasses.replace(batch, segment_ids=None, positions=None)
    with_ids, without = float(loss(st, batch)), float(loss(st, plain))
    # 10x the float32 equality tolerance: the ids move the loss far more than the check allows.
    assert abs(with_ids - without) > 1e-4 * abs(without), (with_ids, without)
    assert abs(with_ids - float(h.reference("float32")[2]["loss"])) < 1e-5 * abs(with_ids)
