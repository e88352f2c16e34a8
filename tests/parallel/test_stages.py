"""Stage partitioning helpers: the pipelined parameter layout and its inverse, micro-batching,
the table encoding the executor reads. Pure array bookkeeping, no compiled step."""

import numpy as np
import pytest

from deepseek_jax.batch import Batch
from deepseek_jax.parallel.pipeline import executor, schedules, stages, ticks
from deepseek_jax.parallel.pipeline.schedules import Schedule
from deepseek_jax.parallel.pipeline.ticks import Code
from deepseek_jax.train import pipeline_step


@pytest.mark.parametrize(
    "schedule,pp,num_stages",
    [(Schedule.DUALPIPE, 4, 4), (Schedule.DUALPIPEV, 2, 4), (Schedule.ONE_F_ONE_B, 4, 4)],
)
def test_pipeline_layout_places_stages_and_sums_copies(schedule, pp, num_stages):
    table = ticks.build(schedules.build(schedule, pp, 2 * pp))
    placement = np.asarray(table.stage)
    n_moe = 2 * num_stages
    layers = np.arange(n_moe * 3, dtype=np.float64).reshape(n_moe, 3)  # row = layer id * 3 + j
    pipe = np.asarray(stages.to_pipeline({"w": layers}, placement, num_stages)["w"])
    assert pipe.shape == (pp, table.chunks, 2, 3)
    for r in range(pp):
        for c in range(table.chunks):
            s = placement[r, c]
            np.testing.assert_array_equal(pipe[r, c], layers[2 * s : 2 * s + 2])
    back = np.asarray(stages.from_pipeline({"w": pipe}, placement, num_stages)["w"])
    copies = np.bincount(placement.ravel(), minlength=num_stages)  # DualPipe: 2 per stage
    np.testing.assert_array_equal(back, layers * np.repeat(copies, 2)[:, None])


def test_unused_chunks_are_dropped_on_the_way_back():
    placement = np.array([[0, 2], [1, 2]])  # chunk 1 unused (== num_stages)
    pipe = np.ones((2, 2, 1, 1))
    back = np.asarray(stages.from_pipeline({"w": pipe}, placement, 2)["w"])
    np.testing.assert_array_equal(back, np.ones((2, 1)))


@pytest.mark.parametrize(
    "n_moe,num_stages,counts",
    [
        (58, 16, (1,) + (4,) * 14 + (1,)),  # DeepSeek-V3: the padding on the two end stages
        (3, 2, (2, 1)),  # the last stage (head, loss, MTP) first
        (13, 4, (3, 4, 4, 2)),
        (5, 4, (1, 2, 1, 1)),  # the ends keep one real layer each; the rest moves inward
        (8, 4, (2, 2, 2, 2)),
    ],
)
def test_uneven_layer_counts_pad_the_end_stages(n_moe, num_stages, counts):
    assert stages.layer_counts(n_moe, num_stages) == counts
    index = stages.slots(n_moe, num_stages)
    real = index[:num_stages][index[:num_stages] < n_moe]
    np.testing.assert_array_equal(real, np.arange(n_moe))  # every layer once, in order
    assert (index[num_stages] == n_moe).all()  # the unused-chunk row is all padding


def test_uneven_layout_round_trips_and_drops_padding():
    # 3 layers on DualPipe's 2 stages (2 + 1) on 2 ranks, both copies of each stage.
    table = ticks.build(schedules.build(Schedule.DUALPIPE, 2, 4))
    placement = np.asarray(table.stage)  # [[0, 1], [1, 0]]
    layers = np.arange(3 * 2, dtype=np.float64).reshape(3, 2) + 1
    pipe = np.array(stages.to_pipeline({"w": layers}, placement, 2)["w"])
    active = stages.active(placement, 3, 2)
    assert pipe.shape == (2, 2, 2, 2) and active.tolist() == [[[1, 1], [1, 0]], [[1, 0], [1, 1]]]
    np.testing.assert_array_equal(pipe[0, 0], layers[:2])
    np.testing.assert_array_equal(pipe[0, 1, 0], layers[2])
    pipe[active == 0] = 1e9  # whatever a padding slot holds never reaches the canonical stack
    back = np.asarray(stages.from_pipeline({"w": pipe}, placement, 2, 3)["w"])
    np.testing.assert_array_equal(back, 2 * layers)


def test_microbatches_are_strided_and_divisibility_is_checked():
    batch = Batch(*(np.arange(12 * 2).reshape(12, 2) + i for i in range(4)))
    mbs = pipeline_step.microbatched(batch, 4)
    assert mbs.inputs.shape == (4, 3, 2)
    for name in ("inputs", "targets", "loss_mask", "target_bytes"):  # every field, the same way
        np.testing.assert_array_equal(getattr(mbs, name)[1], getattr(batch, name)[1::4])
    with pytest.raises(ValueError, match="12 sequences is not divisible into 5 micro-batches"):
        pipeline_step.microbatched(batch, 5)


def test_encoding_pads_with_idle_and_maps_dualpipe_halves():
    dp = ticks.build(schedules.dualpipe(4, 8))
    gp = ticks.build(schedules.gpipe(4, 8))
    layout = executor.Layout.of(dp, gp)
    assert layout.ticks == max(dp.num_ticks, gp.num_ticks) and layout.chunks == 2
    assert layout.codes == tuple(Code)
    enc = executor.encode(dp, layout)
    assert enc["branch"].shape == (4, layout.ticks)
    assert (enc["branch"][:, dp.num_ticks :] == 0).all()  # padding ticks are IDLE
    c, m, mb = enc["c"], enc["m"], enc["mb"]
    np.testing.assert_array_equal(mb[c == 1], m[c == 1] + 4)  # direction 1: second half
    np.testing.assert_array_equal(mb[c == 0], m[c == 0])
    g = executor.encode(gp, layout)
    assert (g["placement"][:, 1] == layout.num_stages).all()  # gpipe has no chunk 1
    with pytest.raises(ValueError, match="does not fit"):
        executor.encode(ticks.build(schedules.gpipe(4, 16)), layout)
