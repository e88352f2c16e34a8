"""MetricsWriter: JSON lines and TensorBoard event files read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest

from deepseek_jax.train import metrics, tb_events

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard (test extra) decodes the event files we write",
)


def _accumulator(workdir: str) -> object:
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, metrics.TENSORBOARD_DIR))
    acc.Reload()
    return acc


def _scalars(acc: object, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_crc32c_known_vectors() -> None:
    # RFC 3720 B.4 test vectors, and the check value of the CRC-32C catalogue entry.
    assert tb_events.crc32c(b"123456789") == 0xE3069283
    assert tb_events.crc32c(bytes(32)) == 0x8A9136AA
    assert tb_events.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def test_event_bytes_match_generated_protobuf() -> None:
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    ours = tb_events.encode_scalars_event(1234.5, -3 + 2**40, {"a/b": 1.5, "c": -2.0})
    theirs = event_pb2.Event(wall_time=1234.5, step=-3 + 2**40)
    theirs.summary.value.add(tag="a/b", simple_value=1.5)
    theirs.summary.value.add(tag="c", simple_value=-2.0)
    assert ours == theirs.SerializeToString()
    start = event_pb2.Event(wall_time=1.0, step=7)
    start.session_log.status = event_pb2.SessionLog.START
    assert tb_events.encode_session_start_event(1.0, 7) == start.SerializeToString()


def test_tfrecord_framing() -> None:
    record = tb_events.tfrecord(b"hello")
    (length,) = struct.unpack("<Q", record[:8])
    assert length == 5 and record[12:17] == b"hello"
    assert struct.unpack("<I", record[8:12])[0] == tb_events.masked_crc32c(record[:8])
    assert struct.unpack("<I", record[17:])[0] == tb_events.masked_crc32c(b"hello")


def _train_metrics(step: int) -> dict:
    load_LE = np.full((2, 4), 0.25, dtype=np.float32)
    load_LE[1] = [0.7, 0.1, 0.1, 0.1]
    return {
        "loss": np.float32(4.0 / step),
        "lr": 1e-3 * step,
        "skipped_steps": np.int32(0),
        "grad_norm": np.asarray(0.5),
        "expert_load": load_LE,
        "expert_bias_norm": np.asarray([0.125, 0.25]),
        "moe_layer_ids": [3, 4],
        "note": "text stays JSON-only",
    }


def test_jsonl_and_tensorboard(tmp_path) -> None:
    workdir = str(tmp_path)
    with metrics.MetricsWriter(workdir, process_index=0) as writer:
        for step in (1, 2):
            writer.write(step, _train_metrics(step))
        writer.write(2, {"eval_loss": 3.25, "eval_bpb": math.nan}, split="eval")

    lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["split"] == "train" and isinstance(first["time"], float)
    assert first["loss"] == 4.0 and isinstance(first["loss"], float)
    assert first["skipped_steps"] == 0 and isinstance(first["skipped_steps"], int)
    assert first["grad_norm"] == 0.5
    assert first["expert_load"][1] == pytest.approx([0.7, 0.1, 0.1, 0.1])
    assert first["moe_layer_ids"] == [3, 4]
    eval_record = json.loads(lines[2])
    # Non-finite values become null so the file stays strict JSON (no bare NaN token).
    assert eval_record["split"] == "eval" and eval_record["eval_bpb"] is None
    assert "NaN" not in lines[2]

    acc = _accumulator(workdir)
    assert _scalars(acc, "train/loss") == [(1, 4.0), (2, 2.0)]
    assert _scalars(acc, "train/lr") == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert _scalars(acc, "eval/eval_loss") == [(2, 3.25)]
    assert math.isnan(acc.Scalars("eval/eval_bpb")[0].value)
    assert _scalars(acc, "moe/load_max_over_mean/layer_03") == [(1, 1.0), (2, 1.0)]
    assert acc.Scalars("moe/load_max_over_mean/layer_04")[0].value == pytest.approx(2.8)
    assert acc.Scalars("moe/load_min_over_mean/layer_04")[0].value == pytest.approx(0.4)
    assert _scalars(acc, "moe/bias_norm/layer_04") == [(1, 0.25), (2, 0.25)]
    tags = acc.Tags()["scalars"]
    assert "train/note" not in tags and not any("expert_load" in t for t in tags)


def test_other_processes_write_nothing(tmp_path) -> None:
    writer = metrics.MetricsWriter(str(tmp_path / "run"), process_index=1)
    writer.write(1, _train_metrics(1))
    writer.flush()
    writer.close()
    assert not writer.active
    assert not (tmp_path / "run").exists()


def test_resume_appends_and_supersedes(tmp_path) -> None:
    workdir = str(tmp_path)
    with metrics.MetricsWriter(workdir, process_index=0) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
            if step in (3, 5):
                writer.write(step, {"eval_loss": 0.5 * step}, split="eval")
    # The restarted run restored a step-3 checkpoint and re-runs steps 4 and 5.
    with metrics.MetricsWriter(workdir, process_index=0) as writer:
        for step in (4, 5, 6):
            writer.write(step, {"loss": 10.0 * step})

    assert len(metrics.read_metrics(workdir, dedupe=False)) == 10
    records = metrics.read_metrics(workdir)
    assert [(r["step"], r["loss"]) for r in records if r["split"] == "train"] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]
    # The killed run's eval at step 5 evaluated state the resumed run replaced: stale too.
    assert [(r["step"], r["eval_loss"]) for r in records if r["split"] == "eval"] == [(3, 1.5)]
    # TensorBoard purges the same steps thanks to the START session log.
    assert _scalars(_accumulator(workdir), "train/loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]


def test_truncated_last_line_is_tolerated_and_isolated(tmp_path) -> None:
    workdir = str(tmp_path)
    with metrics.MetricsWriter(workdir, process_index=0) as writer:
        writer.write(1, {"loss": 1.0})
    path = tmp_path / metrics.METRICS_FILE
    with open(path, "a") as f:
        f.write('{"step": 2, "split": "train", "lo')  # A run killed mid-write.
    assert [r["step"] for r in metrics.read_metrics(workdir)] == [1]
    with metrics.MetricsWriter(workdir, process_index=0) as writer:
        writer.write(2, {"loss": 2.0})
    # The resumed run's record must not be glued onto the partial line.
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir)] == [(1, 1.0), (2, 2.0)]


def test_missing_file_and_bad_values(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        metrics.read_metrics(str(tmp_path))
    with metrics.MetricsWriter(str(tmp_path), process_index=0) as writer:
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 3})
        with pytest.raises(TypeError, match="'bad'"):
            writer.write(1, {"bad": object()})
        with pytest.raises(ValueError, match="expert_load"):
            writer.write(1, {"expert_load": [0.5, 0.5]})  # Not [layers, experts].
        with pytest.raises(ValueError, match="expert_load rows"):
            writer.write(1, {"expert_load": [[0.5, 0.5], [1.0]]})
    # Rejected records leave no trace: the file holds nothing.
    assert metrics.read_metrics(str(tmp_path)) == []
    with pytest.raises(ValueError, match="local or NFS"):
        metrics.MetricsWriter("gs://bucket/run", process_index=0)


def test_tensorboard_flush_policy(tmp_path) -> None:
    now = [0.0]
    writer = metrics.MetricsWriter(
        str(tmp_path), process_index=0, flush_every_s=10.0, clock=lambda: now[0]
    )
    writer.write(1, {"loss": 1.0})
    # JSON lines are durable at once; TensorBoard waits for the flush interval.
    assert metrics.read_metrics(str(tmp_path))[0]["loss"] == 1.0
    assert "train/loss" not in _accumulator(str(tmp_path)).Tags()["scalars"]
    now[0] = 11.0
    writer.write(2, {"loss": 2.0})
    assert _scalars(_accumulator(str(tmp_path)), "train/loss") == [(1, 1.0), (2, 2.0)]
    writer.close()


def test_bfloat16_values_are_written(tmp_path) -> None:
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    with metrics.MetricsWriter(str(tmp_path), process_index=0) as writer:
        writer.write(
            1,
            {
                "loss": np.asarray(2.5, dtype=bf16),
                "expert_bias_norm": np.asarray([0.5, 1.5], dtype=bf16),
            },
        )
    (record,) = metrics.read_metrics(str(tmp_path))
    assert record["loss"] == 2.5 and record["expert_bias_norm"] == [0.5, 1.5]
    acc = _accumulator(str(tmp_path))
    assert _scalars(acc, "train/loss") == [(1, 2.5)]
    assert _scalars(acc, "moe/bias_norm/layer_01") == [(1, 1.5)]
