"""Training metrics: JSON lines (the source of truth for tools) plus TensorBoard scalars.

Metric-name contract (also in docs/metrics.md; `deepseek_jax.plot` relies on it). One record per
`write(step, metrics, split=...)`. Every key is optional except where noted; unknown keys are kept.

split "train" (one record per logged step):
    loss            float   the total loss optimised (LM cross-entropy + weighted MTP/balance)
    lm_loss         float   main next-token cross-entropy alone
    mtp_loss        float   multi-token-prediction loss (unweighted), when MTP is on
    balance_loss    float   sequence-wise auxiliary balance loss (unweighted)
    lr              float   learning rate applied at this step
    grad_norm       float   global gradient norm before clipping
    tokens_per_s    float   training throughput over the logging interval (all processes)
    mfu             float   model FLOPs utilisation in [0, 1] (peak: loop.peak_flops)
    skipped_steps   int     cumulative count of updates skipped for non-finite loss/gradients
    expert_load     list[list[float]]  per MoE layer, per routed expert: fraction of routed
                                       token slots sent to that expert over the logging interval
                                       (each row sums to 1)
    expert_bias_norm list[float]       per MoE layer: L2 norm of the expert-selection bias
    moe_layer_ids   list[int]          absolute layer index of each expert_load row (default 0..n-1)
split "eval":
    eval_loss       float   held-out next-token cross-entropy
    eval_bpb        float   held-out bits per byte

JSON lines: `<workdir>/metrics.jsonl`, one object per record with `step`, `split` and `time` (unix
seconds) added; numbers are plain JSON numbers, arrays are (nested) lists, and non-finite floats are
written as `null` so the file stays strict JSON. The file is opened in append mode so a resumed run
continues it; `read_metrics` treats a step going backwards as a restart and drops the killed run's
records from that step on, as TensorBoard does with the START marker the writer emits.

TensorBoard (`<workdir>/tensorboard/`): each numeric scalar as `<split>/<key>` (e.g. `train/loss`,
`eval/eval_loss`); per MoE layer `moe/load_max_over_mean/layer_NN`,
`moe/load_min_over_mean/layer_NN` and `moe/bias_norm/layer_NN` (NN = the moe_layer_ids entry,
zero-padded to two digits; non-train splits get a `<split>/` prefix).
Other arrays are JSON-only.

Only process 0 writes: every other process gets an inert writer, so the train loop calls the same
methods everywhere without branching.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from deepseek_jax.train import tb_events

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "split", "time")

log = logging.getLogger(__name__)


def _numeric_array(value: Any, key: str) -> np.ndarray:
    """np.asarray for metrics; low-precision floats (bfloat16 has dtype kind 'V') widen to f32."""
    array = np.asarray(value)
    if array.dtype.kind in "biuf":
        return array
    try:
        return array.astype(np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: unsupported array dtype {array.dtype}") from None


def _json_value(value: Any, key: str) -> Any:
    """Converts numpy/jax scalars and arrays to plain JSON values (non-finite floats -> None)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_json_value(v, key) for v in value]
    if hasattr(value, "__array__"):  # np.ndarray, jax.Array (fetched to host here).
        array = _numeric_array(value, key)
        if array.ndim == 0:
            return _json_value(array.item(), key)
        return _json_value(array.tolist(), key)
    raise TypeError(f"metric {key!r}: cannot write a value of type {type(value).__name__}")


def _layer_tag(group: str, layer_id: int, width: int) -> str:
    return f"moe/{group}/layer_{layer_id:0{width}d}"


def scalar_tags(split: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars for one record (see the module docstring for the naming)."""
    scalars: dict[str, float] = {}
    prefix = "" if split == "train" else f"{split}/"
    for key, value in metrics.items():
        if key in ("expert_load", "expert_bias_norm", "moe_layer_ids"):
            continue
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        array = _numeric_array(value, key) if hasattr(value, "__array__") else value
        if isinstance(array, np.ndarray):
            if array.ndim != 0 or array.dtype.kind == "b":
                continue
            array = array.item()
        if isinstance(array, (int, float, np.integer, np.floating)):
            scalars[f"{split}/{key}"] = float(array)
    num_layers = 0
    load = metrics.get("expert_load")
    if load is not None:
        try:
            load_LE = np.asarray(load, dtype=np.float64)
        except ValueError:  # Ragged rows: numpy's message would not name the metric.
            raise ValueError("expert_load rows must all have one entry per expert") from None
        if load_LE.ndim != 2:
            raise ValueError(
                f"expert_load must be [moe_layers, experts], got shape {load_LE.shape}"
            )
        num_layers = load_LE.shape[0]
    bias = metrics.get("expert_bias_norm")
    bias_L = None if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if bias_L is not None:
        num_layers = max(num_layers, bias_L.shape[0])
    if not num_layers:
        return scalars
    ids = [int(i) for i in metrics.get("moe_layer_ids", range(num_layers))]
    if len(ids) < num_layers:
        raise ValueError(f"moe_layer_ids has {len(ids)} entries for {num_layers} MoE layers")
    width = max(2, len(str(max(ids))))
    if load is not None:
        mean_L = load_LE.mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            max_ratio_L = load_LE.max(axis=1) / mean_L
            min_ratio_L = load_LE.min(axis=1) / mean_L
        for row, layer_id in enumerate(ids[: load_LE.shape[0]]):
            scalars[prefix + _layer_tag("load_max_over_mean", layer_id, width)] = max_ratio_L[row]
            scalars[prefix + _layer_tag("load_min_over_mean", layer_id, width)] = min_ratio_L[row]
    if bias_L is not None:
        for row, layer_id in enumerate(ids[: bias_L.shape[0]]):
            scalars[prefix + _layer_tag("bias_norm", layer_id, width)] = bias_L[row]
    return {tag: float(v) for tag, v in scalars.items()}


class MetricsWriter:
    """Writes metric records on process 0; on every other process all methods do nothing.

    Flush policy: the JSON line is flushed after every record (it is the durable copy, and a killed
    run then loses at most the line being written); TensorBoard events are flushed every
    `flush_every_s` seconds, after every non-train record and on `close`, since the viewer only
    needs to be roughly current.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        process_index: int,
        flush_every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.active = process_index == 0
        self.workdir = os.fspath(workdir)
        self._flush_every_s = flush_every_s
        self._clock = clock
        self._jsonl: TextIO | None = None
        self._events: tb_events.EventFileWriter | None = None
        if not self.active:
            return
        if "://" in self.workdir:
            raise ValueError(
                f"metrics need a local or NFS workdir, got {self.workdir!r}; keep checkpoints on "
                "object storage via the checkpoint directory and point --workdir at a filesystem"
            )
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, METRICS_FILE)
        self._jsonl = open(path, "a", encoding="utf-8")
        # A run killed mid-write leaves a partial last line; start on a fresh line so the partial
        # one stays isolated (and skippable) instead of swallowing our first record.
        if self._jsonl.tell() > 0 and not _ends_with_newline(path):
            self._jsonl.write("\n")
        self._events = tb_events.EventFileWriter(os.path.join(self.workdir, TENSORBOARD_DIR))
        self._last_flush = clock()

    def write(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        if not self.active:
            return
        if self._jsonl is None or self._events is None:
            raise ValueError("MetricsWriter is closed")
        clash = [k for k in _RESERVED if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved for the record header")
        now = time.time()
        record = {"step": int(step), "split": split, "time": round(now, 3)}
        record.update({key: _json_value(value, key) for key, value in metrics.items()})
        scalars = scalar_tags(split, metrics)  # Validates before either file is touched.
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._events.add_scalars(int(step), scalars, wall_time=now)
        if split != "train" or self._clock() - self._last_flush >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._events is not None:
            self._events.flush()
        self._last_flush = self._clock()

    def close(self) -> None:
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_metrics(workdir: str | os.PathLike[str], *, dedupe: bool = True) -> list[dict[str, Any]]:
    """Reads `<workdir>/metrics.jsonl`, skipping (with a warning) lines a killed run left partial.

    With `dedupe`, records a resumed run superseded are dropped and the rest ordered by step;
    otherwise records come back in file order. Raises FileNotFoundError if there is no file.
    """
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a partial or corrupt line", path, number)
                continue
            if not isinstance(record, dict) or "step" not in record:
                log.warning("%s:%d: skipping a line that is not a metrics record", path, number)
                continue
            records.append(record)
    return _drop_superseded(records) if dedupe else records


def _drop_superseded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Removes what a restart re-ran: a split's step going back to s marks a resumed run, so that
    split's earlier records from step s on, and other splits' records after s, are stale."""
    kept: list[dict[str, Any]] = []
    last_step: dict[str, int] = {}
    for record in records:
        split, step = record.get("split", "train"), record["step"]
        if split in last_step and step <= last_step[split]:
            kept = [
                r
                for r in kept
                if r["step"] < step or (r["step"] == step and r.get("split", "train") != split)
            ]
            last_step = {}
            for r in kept:
                s = r.get("split", "train")
                last_step[s] = max(last_step.get(s, r["step"]), r["step"])
        kept.append(record)
        last_step[split] = max(last_step.get(split, step), step)
    return sorted(kept, key=lambda r: r["step"])


def series(
    records: Sequence[Mapping[str, Any]], key: str, split: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a scalar metric across records that have it; None (non-finite) -> NaN."""
    steps, values = [], []
    for record in records:
        if key in record and (split is None or record.get("split") == split):
            value = record[key]
            steps.append(record["step"])
            values.append(np.nan if value is None else float(value))
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)
