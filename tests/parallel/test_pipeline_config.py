"""Pipeline settings: `--config.parallel.pipeline=...` overrides, and every bad combination failing
at config conversion (before anything is compiled) with a message that names the field."""

import pathlib

import jax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import config as config_lib
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel.config import BackwardSplit, ParallelConfig, Schedule
from deepseek_jax.train import optim, sharded
from deepseek_jax.train import state as state_lib

TINY = str(pathlib.Path(__file__).parents[2] / "configs" / "tiny.py")
# tiny.py: 3 layers, first_k_dense_replace=1 -> 2 MoE layers; global batch 16.
GOOD = {"parallel.pipe": 2, "parallel.pipeline": "dualpipe", "parallel.microbatches": 4}


def load(**overrides):
    return config_lib.load(
        TINY, {**GOOD, **{k.replace("__", "."): v for k, v in overrides.items()}}
    )


def test_pipeline_override_is_an_enum():
    exp = load()
    assert exp.parallel.pipeline is Schedule.DUALPIPE
    assert exp.parallel.num_microbatches == 4
    assert load(parallel__pipeline="1f1b").parallel.pipeline is Schedule.ONE_F_ONE_B
    assert ParallelConfig().pipeline is Schedule.NONE
    assert ParallelConfig(pipe=4, pipeline=Schedule.GPIPE).num_microbatches == 8  # default 2*PP


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"parallel__pipe": 3, "model__n_layers": 4}, r"parallel\.pipe=3.*even"),
        ({"parallel__microbatches": 2}, r"parallel\.microbatches=2.*>= 2\*pp=4"),
        (
            {"parallel__microbatches": 3, "parallel__pipeline": "dualpipev"},
            r"dualpipev.*parallel\.microbatches=3.*>= 2\*pp=4",
        ),
        (
            {"parallel__pipe": 4, "parallel__microbatches": 8},
            r"model\.n_layers.*2 MoE layers.*4 stages",
        ),
        (
            {"parallel__pipeline": "dualpipev"},
            r"model\.n_layers.*2 MoE layers.*4 stages of dualpipev",
        ),
        (
            {"parallel__microbatches": 6, "model__n_layers": 3},
            r"global_batch_size=16.*microbatches=6",
        ),
        ({"parallel__fsdp": 2}, r"parallel\.fsdp=2 is not supported with parallel\.pipeline"),
        ({"parallel__tensor": 2}, r"parallel\.tensor=2 is not supported"),
        ({"parallel__pipe": 1}, r"needs parallel\.pipe >= 2"),
        ({"parallel__pipeline": "none"}, r"parallel\.pipe=2 needs a parallel\.pipeline"),
        ({"parallel__pipeline": "zerobubble"}, r"parallel\.pipeline: unknown value"),
        ({"parallel__microbatches": -1}, r"parallel\.microbatches must be >= 0"),
        ({"parallel__preset": "fsdp"}, r"parallel\.preset=fsdp is not supported with parallel"),
    ],
)
def test_bad_pipeline_settings_fail_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        load(**overrides)


def test_uneven_stages_are_accepted_and_need_a_divisible_dimension():
    # 3 MoE layers on 2 stages: padded (stages.layer_counts), the stack split over `pipe` on a
    # layer dimension instead of the layer axis.
    exp = load(model__n_layers=4)
    plan_lib.make_abstract_plan(exp.parallel, exp.model, 16, 2)
    # ... which pipe=... must divide: d_model 64 etc. are not divisible by 3 (1F1B on 3 ranks).
    exp = load(model__n_layers=5, parallel__pipe=3, parallel__pipeline="1f1b")
    with pytest.raises(
        ValueError,
        match=r"parallel\.pipe=3: params/moe_layers/.* of shape \(4, .*its 4 layers do not "
        r"split evenly over pipe=3 and no other dimension is divisible by it",
    ):
        plan_lib.make_abstract_plan(exp.parallel, exp.model, 16, 3)


def test_micro_batch_rows_must_split_over_the_batch_shards():
    exp = load(parallel__data=4)  # 16 / 4 micro-batches = 4 rows over 4 data shards: fine
    plan_lib.make_plan(exp.parallel, exp.model, 16)
    exp = load(parallel__data=4, parallel__microbatches=8, model__n_layers=3)
    with pytest.raises(
        ValueError,
        match=r"a micro-batch of 2 sequences .*global_batch_size=16 / "
        r"parallel\.microbatches=8\) is not divisible by the 4",
    ):
        plan_lib.make_plan(exp.parallel, exp.model, 16)
    assert len(jax.devices()) == 8


def test_pipe_without_pipeline_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"parallel\.pipe=2 needs a parallel\.pipeline"):
        ParallelConfig(pipe=2)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"parallel__backward_split": "fused"}, r"parallel\.backward_split: unknown value"),
        ({"parallel__zero": 2}, r"parallel\.zero: must be 0 .* or 1"),
    ],
)
def test_bad_split_and_zero_settings_fail_at_config_time(overrides, match):
    with pytest.raises(ValueError, match=match):
        load(**overrides)


def test_backward_split_override_is_an_enum():
    assert load().parallel.backward_split is BackwardSplit.EXACT
    exp = load(parallel__backward_split="recompute")
    assert exp.parallel.backward_split is BackwardSplit.RECOMPUTE


def test_zero1_layout_that_cannot_divide_the_state_fails_at_plan_time():
    # pipe=2 x data=3: tiny.py's arrays have no dimension that 3 divides (d_model 64, ...). The
    # plan refuses it (validate.check_state) before any state, data pipeline or compile exists;
    # it is abstract (6 devices), so nothing is allocated.
    exp = load(parallel__data=3, parallel__zero=1, parallel__microbatches=4)
    with pytest.raises(
        ValueError,
        match=r"parallel\.zero=1: the optimizer state of params/.* has no dimension "
        r"divisible by the data axis, data=3: pick a parallel\.data",
    ):
        plan_lib.make_abstract_plan(exp.parallel, exp.model, 48, 6)
    # Without the pipeline too (ZeRO-1 over data=3 on 3 devices).
    exp = load(parallel__pipe=1, parallel__pipeline="none", parallel__data=3, parallel__zero=1)
    with pytest.raises(ValueError, match=r"parallel\.zero=1: .* data=3"):
        plan_lib.make_abstract_plan(exp.parallel, exp.model, 48, 3)
    # ZeRO-0 on the same mesh is a valid layout (replicated optimizer state).
    exp = load(parallel__data=3, parallel__microbatches=4)
    plan_lib.make_abstract_plan(exp.parallel, exp.model, 48, 6)
    # data=2 divides every non-scalar moment: the plan passes and all of them are split.
    tx = optim.optimizer(exp.train)
    exp = load(parallel__data=2, parallel__zero=1)
    plan = plan_lib.make_abstract_plan(exp.parallel, exp.model, 16, 4)
    abstract = state_lib.abstract_state(exp.model, tx)
    specs = sharded.state_specs(plan, exp.model, abstract)
    for spec, leaf in zip(
        jax.tree.leaves(specs.opt_state, is_leaf=lambda x: isinstance(x, P)),
        jax.tree.leaves(abstract.opt_state),
        strict=True,
    ):
        assert leaf.ndim == 0 or "data" in str(spec), (spec, leaf.shape)
