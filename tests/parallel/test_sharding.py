"""Rules -> PartitionSpecs: parameters by name, optimizer slots mirror them, nothing large is
replicated under FSDP (V3 on a 256-device abstract mesh), and bad layouts fail before compile."""

from __future__ import annotations

import dataclasses
import math

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import config as experiment_config
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel import sharding
from deepseek_jax.train import optim, sharded
from deepseek_jax.train import state as state_lib
from tests.parallel import cases

Preset = parallel_config.Preset
TX = optim.optimizer(cases.TRAIN)


def specs(preset: Preset, model=cases.CFG, n=8, batch=cases.B, **mesh):
    """The plan's specs for the whole train state, on an abstract mesh of n devices."""
    cfg = parallel_config.ParallelConfig(preset=preset, **(mesh or cases.MESHES[preset]))
    plan = plan_lib.make_abstract_plan(cfg, model, batch, n)
    return sharded.state_specs(plan, model, state_lib.abstract_state(model, TX))


def test_parameter_specs_by_name():
    s = specs(Preset.FSDP_EXPERT_TP).params  # fsdp=2, expert=2, tensor=2
    fe = ("fsdp", "expert")
    assert s["moe_layers"]["ffn"]["w1"] == P(None, "expert", "fsdp", "tensor")
    assert s["moe_layers"]["ffn"]["w2"] == P(None, "expert", "tensor", "fsdp")
    assert s["moe_layers"]["ffn"]["gate"]["kernel"] == P(None, fe, None)
    assert s["moe_layers"]["attn"]["wq_a"]["kernel"] == P(None, fe, None)  # embed took fsdp
    assert s["moe_layers"]["attn"]["wq_b"]["kernel"] == P(None, fe, "tensor", None)
    assert s["moe_layers"]["attn"]["wo"]["kernel"] == P(None, "tensor", None, fe)
    assert s["dense_layers"]["ffn"]["w2"]["kernel"] == P(None, "tensor", fe)
    assert s["embed"]["embedding"] == P("tensor", fe)
    assert s["head"]["kernel"] == P(fe, "tensor")
    assert s["mtp"]["layers"]["eh_proj"]["kernel"] == P(None, fe, None)
    assert s["norm"]["weight"] == P(None)

    d = specs(Preset.DATA_EXPERT).params  # data=2, expert=4
    assert d["moe_layers"]["ffn"]["w3"] == P(None, "expert", None, None)
    assert d["moe_layers"]["attn"]["wq_b"]["kernel"] == P(None, None, None, None)
    f = specs(Preset.FSDP).params
    assert f["moe_layers"]["ffn"]["w1"] == P(None, None, "fsdp", None)
    assert all(p == P(*[None] * len(p)) for p in leaves(specs(Preset.DATA).params))


def leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, P))


def test_optimizer_slots_mirror_parameters():
    s = specs(Preset.FSDP_TP)
    assert optax.tree_utils.tree_get(s.opt_state, "mu") == s.params
    assert optax.tree_utils.tree_get(s.opt_state, "nu") == s.params
    others = len(leaves(s.opt_state)) - 2 * len(leaves(s.params))
    assert others > 0 and leaves(s.opt_state).count(P()) >= others  # step counts: replicated
    assert all(p == P(None, None) for p in leaves(s.expert_bias))


@pytest.mark.parametrize(
    "preset,mesh",
    [
        (Preset.FSDP, dict(fsdp=256)),
        (Preset.FSDP_EXPERT_TP, dict(fsdp=4, expert=64)),
    ],
    ids=["fsdp", "fsdp_expert_tp"],
)
def test_nothing_large_is_replicated_under_fsdp(preset, mesh):
    """DeepSeek-V3 on 256 abstract devices: every array of 4 MiB or more (params and Adam slots)
    is split over all 256 (experts 64 x 4 under EP); what stays replicated -- norm weights,
    step counts -- is under 32 MiB per device in all."""
    exp = experiment_config.load("configs/deepseek_v3_671b.py")
    v3 = exp.model
    abstract = state_lib.abstract_state(v3, TX)
    s = specs(preset, v3, n=256, batch=exp.train.global_batch_size, **mesh)
    mesh_obj = mesh_lib.abstract_mesh(parallel_config.ParallelConfig(preset=preset, **mesh), 256)
    replicated = 0
    for part in ("params", "opt_state"):
        flat = jax.tree_util.tree_flatten_with_path(getattr(abstract, part))[0]
        for (path, leaf), spec in zip(flat, leaves(getattr(s, part)), strict=True):
            nbytes = leaf.size * leaf.dtype.itemsize
            shard = jax.sharding.NamedSharding(mesh_obj, spec).shard_shape(leaf.shape)
            split = leaf.size // math.prod(shard)
            if nbytes >= 4 * 2**20:
                assert split == 256, (jax.tree_util.keystr(path), spec, split)
            elif split == 1:
                replicated += nbytes
    assert replicated < 32 * 2**20


def test_spec_rules():
    rules = sharding.RULES[Preset.FSDP_TP]
    sizes = {"pipe": 1, "data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    # A mesh axis splits an array once (first dimension wins); size-1 axes are dropped.
    assert sharding.spec(rules, ("embed", "q_lora"), (32, 16), sizes) == P("fsdp", None)
    assert sharding.spec(rules, ("expert", "embed", "expert_mlp"), (8, 32, 16), sizes) == P(
        None, "fsdp", "tensor"
    )
    with pytest.raises(
        ValueError,
        match=r"params/x: dimension 1 \(heads\) has size 3, not "
        r"divisible by the 2 shards of mesh axes tensor=2",
    ):
        sharding.spec(rules, ("q_lora", "heads"), (16, 3), sizes, "params/x")
    with pytest.raises(ValueError, match="unknown logical axis 'embedd'"):
        sharding.spec(rules, ("embedd",), (32,), sizes)


# -- bad input: each fails in make_plan, before any compile, naming the numbers ----------------


def plan(preset=Preset.FSDP_EXPERT_TP, model=cases.CFG, batch=cases.B, **mesh):
    cfg = parallel_config.ParallelConfig(preset=preset, **{**cases.MESHES[preset], **mesh})
    return plan_lib.make_plan(cfg, model, batch)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(data=1, fsdp=4),
            r"the mesh pipe=1 x data=1 x fsdp=4 x expert=2 x tensor=2 has 16 devices, "
            r"but 8 devices are present",
        ),
        (
            dict(
                preset=Preset.DATA_EXPERT,
                data=1,
                expert=8,
                model=dataclasses.replace(cases.CFG, n_routed_experts=12, n_group=4),
            ),
            r"model.n_routed_experts=12 is not divisible by expert=8",
        ),
        (
            dict(model=dataclasses.replace(cases.CFG, n_heads=3)),
            r"model.n_heads=3 is not divisible by tensor=2",
        ),
        (
            dict(model=dataclasses.replace(cases.CFG, intermediate_size=47)),
            r"model.intermediate_size=47 is not divisible by tensor=2",
        ),
        (
            dict(model=dataclasses.replace(cases.CFG, moe_intermediate_size=15)),
            r"model.moe_intermediate_size=15 is not divisible by tensor=2",
        ),
        (
            dict(batch=6),
            r"train.global_batch_size=6 is not divisible by the 4 batch shards "
            r"\(fsdp=2 x expert=2\)",
        ),
        (
            dict(preset=Preset.DATA, data=2, fsdp=4),
            r"preset data shards nothing over `fsdp`, so fsdp=4 would only replicate",
        ),
        (dict(pipe=2, fsdp=1), r"pipe=2"),
        (
            # No config-level rule covers wq_b's q_lora side: the state's own spec check, run
            # by make_plan (validate.check_state), names the array.
            dict(model=dataclasses.replace(cases.CFG, q_lora_rank=18)),
            r"params/.*wq_b/kernel: dimension 1 \(q_lora\) has size 18, not divisible by the 4 "
            r"shards of mesh axes fsdp=2 x expert=2",
        ),
    ],
    ids=[
        "mesh-product",
        "experts",
        "heads",
        "ffn",
        "expert-ffn",
        "batch",
        "unused-axis",
        "pipe",
        "state-spec",
    ],
)
def test_bad_layouts_fail_before_compile(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(**kwargs)


def test_data_minus_one_fills_and_fails_when_it_cannot():
    assert mesh_lib.axis_sizes(parallel_config.ParallelConfig(expert=2), 8)["data"] == 4
    with pytest.raises(ValueError, match=r"8 devices are not divisible by the other mesh axes"):
        mesh_lib.axis_sizes(parallel_config.ParallelConfig(tensor=3), 8)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"parallel.preset: unknown value 'fsdp_pp'"):
        experiment_config.from_config_dict({"parallel": {"preset": "fsdp_pp"}})
    with pytest.raises(ValueError, match=r"unknown parallel preset 'fsdp_pp'"):
        sharding.rules_for("fsdp_pp")
    with pytest.raises(ValueError, match=r"parallel.tensor: must be a positive int, got 0"):
        parallel_config.ParallelConfig(tensor=0)


def test_single_process_loads_every_row_and_config_wiring():
    p = plan()
    assert p.data_shard(cases.B) == (0, 1)
    assert p.batch_spec() == P(("fsdp", "expert"), None)
    # The experiment config wires --config.parallel.* overrides into the typed config.
    exp = experiment_config.from_config_dict({"parallel": {"preset": "fsdp_tp", "fsdp": 4}})
    assert exp.parallel.preset is Preset.FSDP_TP and exp.parallel.fsdp == 4


def test_activation_constraints_are_installed_at_block_boundaries():
    """The plan's step constrains activations (embed, every block in and out, logits)."""
    from deepseek_jax.train import step as step_lib

    p = plan(Preset.FSDP_TP)
    graphdef, _, _ = state_lib.abstract_model(cases.CFG)
    fn = step_lib.make_train_step(graphdef, cases.TRAIN, TX)
    batch = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=p.batch_sharding()), cases.batch()
    )
    state = sharded.abstract_state(p, cases.CFG, TX)

    def constraints(lowered) -> int:  # Shardy or GSPMD spelling
        text = lowered.as_text()
        return text.count("sdy.sharding_constraint") + text.count("@Sharding")

    # embed, 3 blocks x (in, out), main logits, MTP logits.
    assert (
        constraints(sharded.jit_train_step(p, fn, cases.CFG, TX).lower(state, batch))
        >= 1 + 3 * 2 + 2
    )
    assert constraints(jax.jit(fn).lower(state, batch)) == 0
