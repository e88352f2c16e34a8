"""The checkpoint contract both ways: a training-style save (CheckpointManager, StandardSave of jax
arrays, with opt_state) exports; a from-hf step restores through CheckpointManager as jax arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from deepseek_jax.convert import __main__ as convert_cli
from deepseek_jax.convert import ckpt_io
from deepseek_jax.convert import safetensors_io as st
from deepseek_jax.model import layers, transformer, tree

NAME = "v3_tied_embeddings"


def _manager(root):
    return ocp.CheckpointManager(root / "checkpoints", item_names=("state", "config"))


def test_training_style_checkpoint_exports(exported, tmp_path):
    e = exported(NAME)
    model = nnx.eval_shape(lambda: transformer.Transformer(e.cfg, rngs=nnx.Rngs(0)))
    _, params, biases = nnx.split(model, nnx.Param, layers.ExpertBias)
    params = tree.with_arrays(params, lambda p, _: jnp.asarray(e.state["params"][p]))
    biases = tree.with_arrays(biases, lambda p, _: jnp.asarray(e.state["expert_bias"][p]))
    pure = nnx.to_pure_dict(params)
    state = {
        "step": jnp.int32(3),
        "params": pure,
        "expert_bias": nnx.to_pure_dict(biases),
        "opt_state": {"mu": jax.tree.map(jnp.zeros_like, pure), "count": jnp.int32(3)},
    }
    with _manager(tmp_path) as mngr:
        mngr.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave({"model": e.cfg.to_dict(), "train": {"lr": 1e-3}}),
            ),
        )
        mngr.wait_until_finished()
    out = tmp_path / "hf"
    assert (
        convert_cli.main(["to-hf", f"--checkpoint={tmp_path}", f"--out={out}", "--dtype=float32"])
        == 0
    )
    mine, theirs = st.HFDirectory(e.hf_dir), st.HFDirectory(out)
    assert set(mine.where) == set(theirs.where)
    for name in mine.where:
        assert np.array_equal(mine.read(name), theirs.read(name)), name


def test_from_hf_step_restores_through_checkpoint_manager(exported, tmp_path):
    e = exported(NAME)
    step_dir = tmp_path / "checkpoints" / "0"
    step_dir.parent.mkdir()
    assert convert_cli.main(["from-hf", f"--hf-dir={e.hf_dir}", f"--out={step_dir}"]) == 0
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    experts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "expert"))

    def abstract(collection):
        leaves = {
            p: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=experts if p[-1] in ("w1", "w2", "w3") else replicated
            )
            for p, a in e.state[collection].items()
        }
        return ckpt_io.nest(leaves)

    target = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "params": abstract("params"),
        "expert_bias": abstract("expert_bias"),
    }
    with _manager(tmp_path) as mngr:
        assert mngr.latest_step() == 0
        restored = mngr.restore(
            0,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()
            ),
        )
    assert restored["config"]["model"] == e.cfg.to_dict() and int(restored["state"]["step"]) == 0
    w1 = restored["state"]["params"]["moe_layers"]["ffn"]["w1"]
    assert isinstance(w1, jax.Array) and w1.sharding == experts
    for collection, leaves in e.state.items():
        for path, want in leaves.items():
            got = restored["state"][collection]
            for key in path:
                got = got[key]
            assert np.array_equal(np.asarray(got), want), path
