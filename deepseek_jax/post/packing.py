"""Packing with isolation: several SFT samples per row, mutually invisible, as V3's SFT does.

A sample of N tokens takes N - 1 positions of a row: inputs ids[:-1], targets ids[1:], so its
last input predicts its own last token (the EOS) and no target is ever the next sample's token.
Per position the row also carries
    segment_ids  1, 2, ... for the samples of the row in order, 0 on padding
    positions    the index within the sample, restarting at 0 (0 on padding)
    loss_mask    1 exactly where the target is an assistant token (content or EOS)
so attention restricted to equal segment ids plus these positions reproduces each sample run
alone, and `losses.mtp_targets` drops every MTP target whose position lies in another segment.

Rows are filled first-fit in sample order over a window of open rows: deterministic, and close to
full without sorting the data. The fields are those of `deepseek_jax.batch.Batch`
(`Batch.from_dict` of `batch(...)` works).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepseek_jax.data import sources
from deepseek_jax.post import chat

Row = dict[str, np.ndarray]
_OPEN_ROWS = 64  # rows still considered for a new sample; older ones are final


def row_plan(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Sample indices of each row (first fit, in order); lengths are positions (tokens - 1)."""
    rows: list[list[int]] = []
    free: list[int] = []
    first_open = 0
    for i, n in enumerate(lengths):
        for r in range(first_open, len(rows)):
            if free[r] >= n:
                break
        else:
            rows.append([])
            free.append(seq_len)
            r = len(rows) - 1
            first_open = max(first_open, len(rows) - _OPEN_ROWS)
        rows[r].append(i)
        free[r] -= n
    return rows


def pack(
    samples: Sequence[chat.Sample], seq_len: int, *, pad_id: int, token_bytes: np.ndarray
) -> Row:
    """All `samples` packed into rows of `seq_len` positions: a dict of [R, S] arrays."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    lengths = []
    for s in samples:
        if s.ids.size < 2:
            raise sources.DataError(f"{s.origin}: a sample needs at least two tokens")
        if s.ids.size - 1 > seq_len:
            raise sources.DataError(
                f"{s.origin}: the rendered conversation is {s.ids.size} tokens, longer than the "
                f"context ({seq_len} + 1); raise the sequence length or shorten the sample"
            )
        lengths.append(s.ids.size - 1)
    plan = row_plan(lengths, seq_len)
    R = len(plan)
    inputs = np.full((R, seq_len), pad_id, np.int32)
    targets = np.full((R, seq_len), pad_id, np.int32)
    loss_mask = np.zeros((R, seq_len), np.float32)
    segment_ids = np.zeros((R, seq_len), np.int32)
    positions = np.zeros((R, seq_len), np.int32)
    for r, members in enumerate(plan):
        at = 0
        for seg, i in enumerate(members, start=1):
            s, n = samples[i], lengths[i]
            inputs[r, at : at + n] = s.ids[:-1]
            targets[r, at : at + n] = s.ids[1:]
            loss_mask[r, at : at + n] = s.target[1:]
            segment_ids[r, at : at + n] = seg
            positions[r, at : at + n] = np.arange(n)
            at += n
    target_bytes = np.where(loss_mask > 0, np.asarray(token_bytes)[targets], 0).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss_mask,
        "target_bytes": target_bytes,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def batches(rows: Row, batch_size: int, *, pad_id: int) -> list[Row]:
    """Consecutive batches of `batch_size` rows; the last is topped up with all-padding rows."""
    R = rows["inputs"].shape[0]
    out = []
    for start in range(0, R, batch_size):
        part = {k: v[start : start + batch_size] for k, v in rows.items()}
        short = batch_size - part["inputs"].shape[0]
        if short:
            part = {
                k: np.concatenate(
                    [v, np.full((short, v.shape[1]), pad_id if k in _IDS else 0, v.dtype)]
                )
                for k, v in part.items()
            }
        out.append(part)
    return out


_IDS = ("inputs", "targets")
