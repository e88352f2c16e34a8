"""Pipeline settings: `--config.parallel.pipeline=...` overrides, and every bad combination failing
at config conversion (before anything is compiled) with a message that names the field."""

import pathlib

import jax
import pytest

from deepseek_jax import config as config_lib
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel.config import ParallelConfig, Schedule

TINY = str(pathlib.Path(__file__).parents[2] / "configs" / "tiny.py")
# tiny.py: 3 layers, first_k_dense_replace=1 -> 2 MoE layers; global batch 16.
GOOD = {"parallel.pipe": 2, "parallel.pipeline": "dualpipe", "parallel.microbatches": 4}


def load(**overrides):
    return config_lib.load(TINY, {**GOOD, **{k.replace("__", "."): v
                                             for k, v in overrides.items()}})


def test_pipeline_override_is_an_enum():
    exp = load()
    assert exp.parallel.pipeline is Schedule.DUALPIPE
    assert exp.parallel.num_microbatches == 4
    assert load(parallel__pipeline="1f1b").parallel.pipeline is Schedule.ONE_F_ONE_B
    assert ParallelConfig().pipeline is Schedule.NONE
    assert ParallelConfig(pipe=4, pipeline=Schedule.GPIPE).num_microbatches == 8  # default 2*PP


@pytest.mark.parametrize("overrides,match", [
    ({"parallel__pipe": 3, "model__n_layers": 4}, r"parallel\.pipe=3.*even"),
    ({"parallel__microbatches": 2}, r"parallel\.microbatches=2.*>= 2\*pp=4"),
    ({"parallel__microbatches": 3, "parallel__pipeline": "dualpipev"},
     r"dualpipev.*parallel\.microbatches=3.*>= 2\*pp=4"),
    ({"parallel__pipe": 4, "parallel__microbatches": 8},
     r"model\.n_layers.*2 MoE layers.*4 stages"),
    ({"parallel__pipeline": "dualpipev"}, r"model\.n_layers.*2 MoE layers.*4 stages of dualpipev"),
    ({"model__n_layers": 4}, r"model\.n_layers.*3 MoE layers.*evenly"),
    ({"parallel__microbatches": 6, "model__n_layers": 3}, r"global_batch_size=16.*microbatches=6"),
    ({"parallel__fsdp": 2}, r"parallel\.fsdp=2 is not supported with parallel\.pipeline"),
    ({"parallel__tensor": 2}, r"parallel\.tensor=2 is not supported"),
    ({"parallel__pipe": 1}, r"needs parallel\.pipe >= 2"),
    ({"parallel__pipeline": "none"}, r"parallel\.pipe=2 needs a parallel\.pipeline"),
    ({"parallel__pipeline": "zerobubble"}, r"parallel\.pipeline: unknown value"),
    ({"parallel__microbatches": -1}, r"parallel\.microbatches must be >= 0"),
    ({"parallel__preset": "fsdp"}, r"parallel\.preset=fsdp is not supported with parallel"),
])
def test_bad_pipeline_settings_fail_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        load(**overrides)


def test_micro_batch_rows_must_split_over_the_batch_shards():
    exp = load(parallel__data=4)  # 16 / 4 micro-batches = 4 rows over 4 data shards: fine
    plan_lib.make_plan(exp.parallel, exp.model, 16)
    exp = load(parallel__data=4, parallel__microbatches=8, model__n_layers=3)
    with pytest.raises(ValueError, match=r"a micro-batch of 2 sequences .*global_batch_size=16 / "
                                         r"parallel\.microbatches=8\) is not divisible by the 4"):
        plan_lib.make_plan(exp.parallel, exp.model, 16)
    assert len(jax.devices()) == 8


def test_pipe_without_pipeline_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"parallel\.pipe=2 needs a parallel\.pipeline"):
        ParallelConfig(pipe=2)
