"""A corrupt or incomplete newest checkpoint is detected, reported and skipped; never deleted."""

import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.train import checkpoint


def state_at(step):
    return {
        "w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) + step,
        "h": jnp.full((8,), step, jnp.bfloat16),
        "step": jnp.int32(step),
        "key": jax.random.key(step),
    }


ABSTRACT = checkpoint.abstract_state(state_at(0))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Steps 10 and 20, both good, with checksums recorded (a superset of the default)."""
    workdir = tmp_path_factory.mktemp("pristine")
    with checkpoint.Checkpointer(workdir, file_checksums=True) as ckpt:
        for step in (10, 20):
            ckpt.save(step, state_at(step), data={"next": step}, config={"lr": 0.5})
    return workdir


@pytest.fixture
def workdir(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "w")
    return tmp_path / "w"


def biggest_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(d):
    f = biggest_file(d)
    os.truncate(f, f.stat().st_size // 2)


def delete(d):
    os.remove(biggest_file(d))


def no_commit_marker(d):
    os.remove(d / "commit_success.txt")


def garbage_metadata(d):
    f = d / "state" / "_METADATA"
    f.write_bytes(b"\x00garbage" * (f.stat().st_size // 8) + b"!" * (f.stat().st_size % 8))


def garbage_manifest(d):
    (d / "manifest.json").write_text("[1, 2")


def no_manifest(d):
    os.remove(d / "manifest.json")


def flip_bytes(d):
    """Same size, different content: only a content check (decode, fingerprint, CRC) sees it."""
    f = biggest_file(d)
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))


CORRUPTIONS = {
    truncate: "bytes, ",
    delete: "missing",
    no_commit_marker: "not finalised",
    garbage_metadata: "state/_METADATA is not valid JSON",
    garbage_manifest: "manifest.json unreadable",
    no_manifest: "manifest.json missing",
    flip_bytes: "CRC32",
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS), ids=lambda f: f.__name__)
def test_corrupt_latest_falls_back(workdir, corrupt, caplog):
    corrupt(workdir / "checkpoints" / "20")
    with checkpoint.Checkpointer(workdir, file_checksums=True) as ckpt:
        with caplog.at_level(logging.WARNING):
            restored = ckpt.restore(None, ABSTRACT)
        assert restored.step == 10
        assert restored.data == {"next": 10}
        np.testing.assert_array_equal(
            np.asarray(restored.state["w"]), np.asarray(state_at(10)["w"])
        )
        warning = caplog.text
        assert "step 20" in warning and CORRUPTIONS[corrupt] in warning
        # Moved aside, not deleted; the number can be saved again; 10 survives.
        assert os.listdir(workdir / "checkpoints" / "quarantine")[0].startswith("20-unusable-")
        assert ckpt.save(20, state_at(21), wait=True)
        assert ckpt.all_steps() == [10, 20]
        with pytest.raises(checkpoint.CheckpointError):
            ckpt.restore(30, ABSTRACT)


def test_bit_flip_is_caught_without_checksums(workdir, caplog):
    """The default (no CRC): orbax reads the flipped bytes back without complaint (the chunk is
    stored raw), so only the content fingerprint stands between them and the train state."""
    flip_bytes(workdir / "checkpoints" / "20")
    with checkpoint.Checkpointer(workdir) as ckpt:
        with caplog.at_level(logging.WARNING):
            assert ckpt.restore(None, ABSTRACT).step == 10
    assert "step 20" in caplog.text and "restored with different contents" in caplog.text


def test_changed_json_needs_checksums(workdir):
    """An equal-length edit of a JSON item parses fine: only file_checksums catches it."""
    f = workdir / "checkpoints" / "20" / "config" / "metadata"
    f.write_text(f.read_text().replace("0.5", "0.7"))
    with checkpoint.Checkpointer(workdir) as ckpt:
        assert ckpt.restore(None, ABSTRACT).config == {"lr": 0.7}
    with checkpoint.Checkpointer(workdir, file_checksums=True) as ckpt:
        assert ckpt.restore(None, ABSTRACT).step == 10


def test_interrupted_save_is_reported_and_cleaned(workdir, caplog):
    """An unfinalised tmp directory (a save killed mid-write) is skipped and removed."""
    root = workdir / "checkpoints"
    shutil.copytree(root / "20", root / "30.orbax-checkpoint-tmp")
    os.remove(root / "30.orbax-checkpoint-tmp" / "commit_success.txt")
    with caplog.at_level(logging.WARNING):
        ckpt = checkpoint.Checkpointer(workdir)
    with ckpt:
        assert "step 30 was interrupted" in caplog.text
        assert ckpt.restore(None, ABSTRACT).step == 20
        assert ckpt.save(30, state_at(30), wait=True)
        assert ckpt.all_steps() == [10, 20, 30]


def test_explicit_corrupt_step_raises(workdir):
    delete(workdir / "checkpoints" / "20")
    with checkpoint.Checkpointer(workdir) as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match="step 20.*missing"):
            ckpt.restore(20, ABSTRACT)
        assert ckpt.all_steps() == [10, 20]  # an explicit request quarantines nothing


def test_all_corrupt_raises_and_keeps_everything(workdir):
    for step in ("10", "20"):
        no_manifest(workdir / "checkpoints" / step)
    with checkpoint.Checkpointer(workdir) as ckpt:
        with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint"):
            ckpt.restore(None, ABSTRACT)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]


def test_wrong_target_is_an_error_not_corruption(workdir):
    wrong = dict(ABSTRACT, w=jax.ShapeDtypeStruct((64, 32), jnp.float32))
    with checkpoint.Checkpointer(workdir) as ckpt:
        with pytest.raises(ValueError, match=r"does not match checkpoint step 20.*\['w'\]"):
            ckpt.restore(None, wrong)
        assert ckpt.all_steps() == [10, 20]


def test_empty_directory_restores_nothing(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(None, ABSTRACT) is None
