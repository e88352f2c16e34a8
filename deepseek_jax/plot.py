"""Pictures of a training run: `python -m deepseek_jax.plot --workdir=<dir> --out=<dir>`.

Reads `<workdir>/metrics.jsonl` (names in docs/metrics.md) and writes PNGs:

* `loss.png`: train, LM, MTP and eval loss against step; the balance loss in its own panel.
* `lr.png`: the learning-rate schedule as applied.
* `diagnostics.png`: grad norm, tokens/s, MFU and skipped steps (the panels whose metric exists).
* `expert_load.png`: one panel per MoE layer, experts (rows) x steps (columns), colour = load
  relative to uniform (load fraction x number of experts) on a log scale centred on 1, so balanced
  routing is white, hot experts red and starved ones blue, and collapse is visible over time.
* `expert_load_summary.png`: the whole model at a glance: layers x experts at the last logged
  step, and layers x steps of max/mean load.
* `rl.png` (GRPO runs): reward per component, KL to the reference, clip fraction, completion
  length and the sampler-vs-trainer log-prob difference against step.

A plot whose metrics are absent is skipped with a message; a missing or empty metrics file is an
error (one `error:` line, exit status 2). Uses matplotlib's object API (no pyplot), so no display
is ever touched.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure

from deepseek_jax import errors
from deepseek_jax.train import metrics

Records = Sequence[dict[str, Any]]
_MAX_COLUMNS = 400  # Heatmap time columns; beyond this the steps are subsampled evenly.


def _save(fig: Figure, out_dir: str, name: str, dpi: int) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=dpi)  # Constrained layout already fits labels in.
    return path


def _line_panel(ax: Any, records: Records, keys: Sequence[tuple[str, str | None, str]]) -> bool:
    drawn = False
    for key, split, label in keys:
        steps, values = metrics.series(records, key, split)
        if steps.size:
            marker = "o" if steps.size < 50 or split == "eval" else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    return drawn


def plot_loss(records: Records, out_dir: str, dpi: int) -> str | None:
    curves = [
        ("loss", "train", "train loss"),
        ("lm_loss", "train", "LM loss"),
        ("mtp_loss", "train", "MTP loss"),
        ("eval_loss", "eval", "eval loss"),
    ]
    if not any(metrics.series(records, k, s)[0].size for k, s, _ in curves):
        return None
    has_balance = metrics.series(records, "balance_loss", "train")[0].size > 0
    fig = Figure(figsize=(8, 7 if has_balance else 4.5), layout="constrained")
    axes = fig.subplots(2 if has_balance else 1, 1, squeeze=False)[:, 0]
    _line_panel(axes[0], records, curves)
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[0].set_title("loss")
    if has_balance:
        _line_panel(axes[1], records, [("balance_loss", "train", "balance loss")])
        axes[1].set_title("sequence-wise balance loss")
    return _save(fig, out_dir, "loss.png", dpi)


def plot_lr(records: Records, out_dir: str, dpi: int) -> str | None:
    if not metrics.series(records, "lr", "train")[0].size:
        return None
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax = fig.subplots()
    _line_panel(ax, records, [("lr", "train", "learning rate")])
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title("learning rate")
    return _save(fig, out_dir, "lr.png", dpi)


def plot_diagnostics(records: Records, out_dir: str, dpi: int) -> str | None:
    panels = [
        (k, t)
        for k, t in (
            ("grad_norm", "gradient norm (before clipping)"),
            ("tokens_per_s", "tokens / s"),
            ("mfu", "MFU"),
            ("skipped_steps", "skipped steps (cumulative)"),
        )
        if metrics.series(records, k, "train")[0].size
    ]
    if not panels:
        return None
    fig = Figure(figsize=(8, 2.6 * len(panels)), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        _line_panel(ax, records, [(key, "train", key)])
        ax.set_title(title)
    return _save(fig, out_dir, "diagnostics.png", dpi)


def plot_rl(records: Records, out_dir: str, dpi: int) -> str | None:
    """GRPO runs (`python -m deepseek_jax.rl`): rewards, KL, clipping, lengths, logprob diff."""
    rewards = [
        (k, "train", label)
        for k, label in (
            ("reward_mean", "total reward (mean)"),
            ("reward_accuracy_mean", "accuracy reward"),
            ("reward_format_mean", "format reward"),
        )
    ]
    if not metrics.series(records, "reward_mean", "train")[0].size:
        return None
    panels = [(rewards, "reward per completion")] + [
        ([(k, "train", k)], title)
        for k, title in (
            ("kl", "KL to the reference (k3, nats/token)"),
            ("clip_fraction", "clipped fraction of completion tokens"),
            ("response_length", "completion length (tokens)"),
            ("logprob_diff", "|sampler - trainer| log-prob, mean per token"),
        )
        if metrics.series(records, k, "train")[0].size
    ]
    fig = Figure(figsize=(8, 2.6 * len(panels)), layout="constrained")
    for ax, (keys, title) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        _line_panel(ax, records, keys)
        ax.set_title(title)
    return _save(fig, out_dir, "rl.png", dpi)


def expert_load_history(records: Records) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(steps [T], relative load [T, L, E] = fraction x E, layer ids [L]) from train records.

    Records whose expert_load shape differs from the last record's (a config change between
    runs sharing a workdir) are dropped rather than guessed at.
    """
    rows = [r for r in records if r.get("expert_load") and r.get("split", "train") == "train"]
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0, 0)), []
    shape = np.asarray(rows[-1]["expert_load"], dtype=np.float64).shape
    rows = [r for r in rows if np.asarray(r["expert_load"], dtype=np.float64).shape == shape]
    if len(shape) != 2:
        raise ValueError(f"expert_load must be [moe_layers, experts], got shape {shape}")
    steps = np.asarray([r["step"] for r in rows], dtype=np.int64)
    load_ILE = np.stack([np.asarray(r["expert_load"], dtype=np.float64) for r in rows])
    ids = [int(i) for i in rows[-1].get("moe_layer_ids", range(shape[0]))][: shape[0]]
    return steps, load_ILE * shape[1], ids


def _log_norm(relative: np.ndarray) -> colors.LogNorm:
    # Symmetric in log space around 1 so over- and under-loaded look alike. The range follows the
    # 99th percentile of the deviation, not the extreme, so one wild early step does not wash out
    # the rest; it is at least 2x each way so a balanced run's noise is not stretched to full scale.
    positive = relative[np.isfinite(relative) & (relative > 0)]
    deviation = np.maximum(positive, 1.0 / positive) if positive.size else np.asarray([2.0])
    spread = float(np.clip(np.quantile(deviation, 0.99), 2.0, 100.0))
    return colors.LogNorm(vmin=1.0 / spread, vmax=spread)


def _edges(centres: np.ndarray) -> np.ndarray:
    centres = centres.astype(np.float64)
    if centres.size == 1:
        return np.asarray([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


def plot_expert_load(records: Records, out_dir: str, dpi: int) -> list[str]:
    steps, rel_ILE, ids = expert_load_history(records)
    if not steps.size:
        return []
    norm = _log_norm(rel_ILE)
    clipped_ILE = np.clip(rel_ILE, norm.vmin, norm.vmax)  # Zero load must still get a colour.
    keep = np.unique(np.linspace(0, steps.size - 1, min(steps.size, _MAX_COLUMNS)).astype(int))
    num_layers, num_experts = rel_ILE.shape[1:]
    cols = math.ceil(math.sqrt(num_layers))
    rows = math.ceil(num_layers / cols)
    fig = Figure(figsize=(3.2 * cols + 1, 2.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    mesh = None
    for layer, ax in enumerate(axes):
        if layer >= num_layers:
            ax.set_visible(False)
            continue
        mesh = ax.pcolormesh(
            _edges(steps[keep]),
            np.arange(num_experts + 1),
            clipped_ILE[keep, layer].T,
            norm=norm,
            cmap="RdBu_r",
        )
        ax.set_title(f"layer {ids[layer]}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("expert", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(mesh, ax=axes.tolist(), label="load / uniform")
    fig.suptitle("expert load over time (1 = balanced)")
    paths = [_save(fig, out_dir, "expert_load.png", dpi)]

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    final_ax, ratio_ax = fig.subplots(1, 2)
    image = final_ax.pcolormesh(
        np.arange(num_experts + 1),
        np.arange(num_layers + 1),
        clipped_ILE[-1],
        norm=norm,
        cmap="RdBu_r",
    )
    final_ax.set_yticks(np.arange(num_layers) + 0.5, [str(i) for i in ids], fontsize=7)
    final_ax.set(xlabel="expert", ylabel="layer", title=f"load / uniform at step {steps[-1]}")
    fig.colorbar(image, ax=final_ax)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_TL = rel_ILE.max(axis=2) / rel_ILE.mean(axis=2)
    image = ratio_ax.pcolormesh(
        _edges(steps[keep]), np.arange(num_layers + 1), ratio_TL[keep].T, cmap="magma"
    )
    ratio_ax.set_yticks(np.arange(num_layers) + 0.5, [str(i) for i in ids], fontsize=7)
    ratio_ax.set(xlabel="step", ylabel="layer", title="max / mean expert load")
    fig.colorbar(image, ax=ratio_ax)
    paths.append(_save(fig, out_dir, "expert_load_summary.png", dpi))
    return paths


def plot_all(records: Records, out_dir: str, *, dpi: int = 120, log: Any = print) -> list[str]:
    """Writes every plot whose metrics exist; returns the paths written, reports skips via `log`."""
    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    for name, plotter, needs in (
        ("loss.png", plot_loss, "loss, lm_loss, mtp_loss or eval_loss"),
        ("lr.png", plot_lr, "lr"),
        ("diagnostics.png", plot_diagnostics, "grad_norm, tokens_per_s, mfu or skipped_steps"),
        ("expert_load.png", plot_expert_load, "expert_load"),
        ("rl.png", plot_rl, None),  # rl runs only: no note on every pre-training run
    ):
        try:
            result = plotter(records, out_dir, dpi)
        except (ValueError, TypeError, KeyError) as error:
            # One malformed metric (say, ragged expert_load rows) must not cost the other plots.
            log(f"skipping {name}: malformed metrics: {error}")
            continue
        paths = [result] if isinstance(result, str) else list(result or [])
        if paths:
            written.extend(paths)
        elif needs is not None:
            log(f"skipping {name}: no {needs} in the metrics")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_jax.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", help="directory for the PNGs (default: <workdir>/plots)")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    try:
        return _plot(args)
    except errors.UserError as e:
        return errors.report(e)


def _plot(args: argparse.Namespace) -> int:
    try:
        records = metrics.read_metrics(args.workdir)
    except FileNotFoundError:
        raise errors.UserError(f"no {metrics.METRICS_FILE} in {args.workdir}") from None
    if not records:
        raise errors.UserError(
            f"{os.path.join(args.workdir, metrics.METRICS_FILE)} holds no metrics records"
        )
    out_dir = args.out or os.path.join(args.workdir, "plots")
    written = plot_all(records, out_dir, dpi=args.dpi)
    for path in written:
        print(f"wrote {path}")
    if not written:
        raise errors.UserError("none of the plotted metrics are present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
