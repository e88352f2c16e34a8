"""Checkpointer: round trip, restore onto other meshes, async safety, retention."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.train import checkpoint, checkpoint_integrity


def fsdp_state(mesh, shard):
    """A train-state-shaped pytree: FSDP params, AdamW moments, step, expert bias, typed key."""
    params = {
        "embed": jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16) / 7.0,
        "mlp": {
            "w_in": jnp.sin(jnp.arange(16 * 32, dtype=jnp.float32)).reshape(16, 32),
            "w_out": jnp.cos(jnp.arange(32 * 16, dtype=jnp.float32)).reshape(32, 16),
        },
        "norm": jnp.linspace(0.5, 1.5, 16, dtype=jnp.float32).astype(jnp.bfloat16),
    }
    state = {
        "params": params,
        "opt_state": optax.adamw(1e-3).init(params),
        "step": jnp.int32(1234),
        "expert_bias": jnp.linspace(-1, 1, 8 * 4).reshape(8, 4),
        "key": jax.random.key(7),
    }
    # Perturb the moments so that they are not all zeros (a swapped leaf must show).
    state["opt_state"] = jax.tree.map(
        lambda x: x + 0.25 if x.dtype == jnp.float32 else x, state["opt_state"]
    )
    return jax.tree.map(lambda x: jax.device_put(x, shard(mesh, x)), state)


def fsdp_sharding(mesh, x):
    """Shard the largest dimension that divides over `fsdp` (like an FSDP rule set)."""
    n = mesh.shape["fsdp"]
    for dim in sorted(range(x.ndim), key=lambda d: -x.shape[d]):
        if x.shape[dim] % n == 0 and x.shape[dim] >= n:
            spec = [None] * x.ndim
            spec[dim] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def host(tree):
    return [
        np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for x in jax.tree.leaves(tree)
    ]


def assert_bit_identical(a, b):
    # Dtypes first: a typed PRNG key must come back as a key, not as its uint32 data.
    assert [x.dtype for x in jax.tree.leaves(a)] == [x.dtype for x in jax.tree.leaves(b)]
    for x, y in zip(host(a), host(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def mesh8():
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


@pytest.fixture(scope="module")
def state8(mesh8):
    return fsdp_state(mesh8, fsdp_sharding)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, state8):
    """One checkpoint (step 1234) saved from the 8-device FSDP mesh."""
    workdir = tmp_path_factory.mktemp("saved")
    with checkpoint.Checkpointer(workdir) as ckpt:
        assert ckpt.save(
            1234,
            state8,
            data={"next_index": 99},
            config={"model": {"dim": 16}},
            meta={"note": "test"},
        )
    return workdir


def test_round_trip_and_items(saved, state8, mesh8):
    with checkpoint.Checkpointer(saved) as ckpt:
        restored = ckpt.restore(None, checkpoint.abstract_state(state8))
    assert restored.step == 1234
    assert_bit_identical(restored.state, state8)
    assert jax.tree.structure(restored.state) == jax.tree.structure(state8)
    assert restored.data == {"next_index": 99}
    assert restored.config == {"model": {"dim": 16}}
    meta = restored.meta
    assert (meta["step"], meta["mesh"], meta["note"]) == (1234, {"data": 2, "fsdp": 4}, "test")
    assert meta["process_count"] == 1 and meta["device_count"] == 8
    assert meta["jax_version"] == jax.__version__
    step_dir = saved / "checkpoints" / "1234"
    assert sorted(os.listdir(step_dir)) == sorted(
        ["_CHECKPOINT_METADATA", "commit_success.txt", "manifest.json", *checkpoint.ITEMS]
    )


@pytest.mark.parametrize("target", ["mesh4", "single_device", "mesh8_explicit"])
def test_restore_onto_other_mesh(saved, state8, target):
    if target == "mesh4":
        mesh = jax.make_mesh(
            (4,), ("fsdp",), devices=jax.devices()[4:], axis_types=(AxisType.Auto,)
        )
        shard = lambda x: fsdp_sharding(mesh, x)  # noqa: E731
    elif target == "single_device":
        shard = lambda x: SingleDeviceSharding(jax.devices()[5])  # noqa: E731
    else:  # the same devices, but another layout and explicit-sharding axes
        mesh = jax.make_mesh((8, 1), ("fsdp", "data"), axis_types=(AxisType.Explicit,) * 2)
        shard = lambda x: fsdp_sharding(mesh, x)  # noqa: E731
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard(x)), state8
    )
    with checkpoint.Checkpointer(saved) as ckpt:
        restored = ckpt.restore(1234, abstract)
    assert_bit_identical(restored.state, state8)
    for got, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(abstract)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert checkpoint_integrity.fingerprints(restored.state) == checkpoint_integrity.fingerprints(
        state8
    )


def test_save_returns_before_donation_can_hurt(tmp_path, mesh8, state8):
    """The state may be donated right after save(): the checkpoint holds the old values."""
    state = jax.tree.map(jnp.copy, state8)
    bump = jax.jit(
        lambda s: jax.tree.map(
            lambda x: (
                x if x.dtype == jnp.int32 or jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x + 1
            ),
            s,
        ),
        donate_argnums=0,
    )
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        state = bump(state)  # overwrites the saved buffers in place while the write runs
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1]
        restored = ckpt.restore(1, checkpoint.abstract_state(state8))
    assert_bit_identical(restored.state, state8)


def test_fingerprint_is_layout_independent_and_position_sensitive(mesh8):
    x = jnp.arange(64.0).reshape(8, 8)
    base = checkpoint_integrity.fingerprints({"x": x})
    sharded = jax.device_put(x, NamedSharding(mesh8, P("data", "fsdp")))
    assert checkpoint_integrity.fingerprints({"x": sharded}) == base
    swapped = x.at[0, 1].set(x[1, 0]).at[1, 0].set(x[0, 1])
    assert checkpoint_integrity.fingerprints({"x": swapped}) != base
    assert checkpoint_integrity.fingerprints({"x": x.at[3, 3].add(1e-5)}) != base
    assert checkpoint_integrity.fingerprints({"x": -0.0 * jnp.ones(3)}) != (
        checkpoint_integrity.fingerprints({"x": jnp.zeros(3)})
    )


def small_state(step):
    return {"w": jnp.full((8, 4), float(step)), "step": jnp.int32(step)}


def test_relative_workdir(tmp_path, monkeypatch):
    # `make smoke` passes --workdir=runs/smoke; orbax itself accepts only absolute paths.
    monkeypatch.chdir(tmp_path)
    with checkpoint.Checkpointer("runs/rel", keep_last=1) as ckpt:
        ckpt.save(3, small_state(3))
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3]
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), small_state(3)
        )
        restored = ckpt.restore(None, abstract)
    assert restored.step == 3 and float(restored.state["w"][0, 0]) == 3.0
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "3").is_dir()


def test_retention_keep_last_and_every(tmp_path):
    with checkpoint.Checkpointer(tmp_path, keep_last=2, keep_every=4) as ckpt:
        for step in range(1, 10):
            ckpt.save(step, small_state(step))
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 8, 9]
        assert not ckpt.save(9, small_state(9))  # already there: a no-op, not an error
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8", "9"]


def test_retention_never_deletes_newest_good_checkpoint(tmp_path, caplog):
    abstract = checkpoint.abstract_state(small_state(0))
    with checkpoint.Checkpointer(tmp_path, keep_last=1) as ckpt:
        ckpt.save(10, small_state(10), wait=True)
        ckpt.save(20, small_state(20), wait=True)
        os.remove(tmp_path / "checkpoints" / "20" / "state" / "_sharding")  # 20 goes bad
        ckpt.save(30, small_state(30), wait=True)
        # keep_last=1 alone would leave only 30; 10 is the newest step known to be good.
        assert ckpt.all_steps() == [10, 30]
        assert "step 20 fails verification" in caplog.text
        (tmp_path / "checkpoints" / "30" / "manifest.json").write_text("{")  # and 30 too
        restored = ckpt.restore(None, abstract)
        assert restored.step == 10
        assert_bit_identical(restored.state, small_state(10))
        assert ckpt.all_steps() == [10]
        assert ckpt.save(30, small_state(31), wait=True)  # the quarantined number is free again
    assert os.listdir(tmp_path / "checkpoints" / "quarantine")[0].startswith("30-unusable-")


def test_branching_from_an_older_step(tmp_path):
    abstract = checkpoint.abstract_state(small_state(0))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, small_state(step))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(1, abstract).step == 1
        assert not ckpt.save(1, small_state(1))  # the step just restored: nothing to do
        with pytest.raises(checkpoint.CheckpointError, match="another run"):
            ckpt.save(2, small_state(2))  # would silently keep the old timeline's step 2
        assert ckpt.discard_after(1) == [3, 2]
        assert ckpt.save(2, small_state(22), wait=True)
        assert ckpt.all_steps() == [1, 2]
        assert float(ckpt.restore(None, abstract).state["w"][0, 0]) == 22.0
    quarantined = sorted(os.listdir(tmp_path / "checkpoints" / "quarantine"))
    assert quarantined[0].startswith("2-superseded-")


def test_invalid_items_fail_at_save(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="'data' is not JSON-serialisable"):
            ckpt.save(1, small_state(1), data={"x": object()})
        assert ckpt.all_steps() == []
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint.Checkpointer(tmp_path, keep_last=0)
