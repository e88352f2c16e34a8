"""The SPMD pipeline executor: a tick table run inside shard_map over the `pipe` mesh axis.

Each tick every rank picks its branch from the table with lax.switch (one branch per op kind:
IDLE, F, B, Bi, W, F&B; see ops.py), then all ranks run the same four ppermutes (ACT0, ACT1,
GRD0, GRD1), then each rank stores what arrived in the buffer slot the table names. No collective is
inside a branch. The table is a runtime input (int32 arrays, one row per tick and rank), so one
compiled executor runs any table of the same `Layout` (a broken table, another schedule).

Per-rank loop state: `act` [A, b, s, D] stage inputs and `grd` [G, b, s, D] output gradients (both
start as NaN, so a read of a slot nobody wrote poisons the result), gradient accumulators for the
rank's chunks and for the replicated globals, expert loads and the loss terms. Every branch also
returns the op it ran as an int row; the rows form the executed-op log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from deepseek_jax.parallel import config as config_lib
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel.pipeline import ops as pipeline_ops
from deepseek_jax.parallel.pipeline import stages, ticks

Channel, Code, TickTable = ticks.Channel, ticks.Code, ticks.TickTable

AXIS = mesh_lib.PIPE
ROWS = ("branch", "c", "m", "mb", "act", "grd", "c2", "m2", "mb2", "act2", "grd2", "wres")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static shape of an executor: tables of this layout run on the same compiled program."""

    pp: int
    chunks: int
    num_stages: int
    microbatches: int
    ticks: int
    act_slots: int
    grd_slots: int
    codes: tuple[Code, ...]  # the switch branches, IDLE first
    wres_slots: int = 0  # residual sets the exact split keeps from Bi to W
    split: config_lib.BackwardSplit = config_lib.BackwardSplit.EXACT

    @classmethod
    def of(cls, *tables: TickTable, num_stages: int | None = None) -> Layout:
        """The smallest layout that runs every table (they must agree on PP and micro-batches)."""
        t0 = tables[0]
        if any(
            (t.pp, t.microbatches, t.split) != (t0.pp, t0.microbatches, t0.split) for t in tables
        ):
            raise ValueError(
                "tables of one layout must have the same pp, microbatches and backward split"
            )
        codes = {Code.IDLE} | {Code(int(x)) for t in tables for x in np.unique(t.code)}
        return cls(
            pp=t0.pp,
            chunks=max(t.chunks for t in tables),
            num_stages=num_stages or max(int(t.stage.max()) + 1 for t in tables),
            microbatches=t0.microbatches,
            ticks=max(t.num_ticks for t in tables),
            act_slots=max(t.act_slots for t in tables),
            grd_slots=max(1, max(t.grd_slots for t in tables)),
            codes=tuple(sorted(codes)),
            split=t0.split,
            wres_slots=max(t.wres_slots for t in tables),
        )


def encode(table: TickTable, layout: Layout) -> dict[str, np.ndarray]:
    """The table as rank-major int32 arrays for the executor, padded with idle ticks.

    mb/mb2 are step micro-batch indices: DualPipe's chunk 1 carries the second half of the batch.
    first/last [P, K] give each chunk's role; placement [P, K] its model stage (num_stages for a
    chunk the schedule does not use).
    """
    T, Pn, K = layout.ticks, layout.pp, layout.chunks
    if (
        (table.pp, table.microbatches, table.split) != (Pn, layout.microbatches, layout.split)
        or table.num_ticks > T
        or table.wres_slots > layout.wres_slots
    ):
        raise ValueError("table does not fit the executor layout")
    missing = {Code(int(x)) for x in np.unique(table.code)} - set(layout.codes)
    if missing:
        raise ValueError(f"op codes {sorted(missing)} have no branch in this layout")
    branch = np.zeros(max(layout.codes) + 1, np.int32)
    branch[list(layout.codes)] = np.arange(len(layout.codes))
    out = {k: np.full((Pn, T), -1, np.int32) for k in ROWS}
    out["branch"][:] = 0  # IDLE
    out["branch"][:, : table.num_ticks] = branch[table.code.T]
    for name in ("c", "m", "act", "grd", "c2", "m2", "act2", "grd2", "wres"):
        out[name][:, : table.num_ticks] = getattr(table, name).T
    half = table.per_chunk if table.schedule is config_lib.Schedule.DUALPIPE else 0
    for sfx in ("", "2"):
        c, m = out["c" + sfx], out["m" + sfx]
        out["mb" + sfx] = np.where(c < 0, -1, m + half * c).astype(np.int32)
    out["recv"] = np.full((Pn, T, 4), -1, np.int32)
    out["recv"][:, : table.num_ticks] = table.recv.transpose(1, 0, 2)
    out["loopback"] = np.full((Pn, 4), -1, np.int32)
    for r, src, dst in table.loopback:
        out["loopback"][r, dst] = src
    out["placement"] = np.full((Pn, K), layout.num_stages, np.int32)
    out["placement"][:, : table.chunks] = table.stage
    for name in ("is_first", "is_last"):
        out[name] = np.zeros((Pn, K), np.int32)
        out[name][:, : table.chunks] = getattr(table, name)
    return out


def perms(layout: Layout) -> tuple[tuple[tuple[int, int], ...], ...]:
    up = tuple((r, r + 1) for r in range(layout.pp - 1))
    down = tuple((r, r - 1) for r in range(1, layout.pp))
    return (up, down, down, up) if layout.chunks == 2 else (up, (), down, ())


def _receive(carry: pipeline_ops.Carry, inbox: list, recv: jax.Array) -> pipeline_ops.Carry:
    """Writes each arrived payload into the slot the table names (-1: nothing arrived)."""
    bufs = {"act": carry.act, "grd": carry.grd}
    for ch in Channel:
        name = "act" if ch in (Channel.ACT0, Channel.ACT1) else "grd"
        slot = recv[ch]
        i = jnp.maximum(slot, 0)
        new = jnp.where(slot >= 0, inbox[ch].astype(bufs[name].dtype), bufs[name][i])
        bufs[name] = jax.lax.dynamic_update_index_in_dim(bufs[name], new, i, 0)
    return dataclasses.replace(carry, **bufs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Result:
    d_stack: Any  # [P, K, Ls, ...] weight gradients in the pipelined layout
    d_glob: Any  # gradients of the globals, summed over ranks
    load: jax.Array  # [P, K, Ls, E]
    balance: jax.Array  # [P, K, Ls]
    epi: stages.EpilogueAux  # summed over ranks
    log: jax.Array  # [P, T, 5]: code, c, m, c2, m2 of the op each rank executed per tick


def build(stage: stages.Stage, layout: Layout, mesh: jax.sharding.Mesh) -> Callable:
    """fn(stack, stack_bias, glob, glob_bias, mbs, norms, weights, tbl) -> Result, under jit.

    stack/stack_bias: [P, K, Ls, ...] pipelined layout; glob/glob_bias: the other canonical
    groups; mbs: the Batch as [M, b, s] micro-batches (every field); norms, weights: the
    objective's whole-batch `losses.Norms` and `losses.Weights`; tbl: `encode(table, layout)`.
    """
    channel_perms = perms(layout)

    def body(stack, stack_bias, glob, glob_bias, mbs, norms, weights, tbl):
        stack, stack_bias = pipeline_ops.take(stack, 0), pipeline_ops.take(stack_bias, 0)
        tbl = {k: v[0] for k, v in tbl.items()}
        env = pipeline_ops.make_env(
            stack,
            stack_bias,
            glob,
            glob_bias,
            mbs,
            norms,
            weights,
            tbl["is_first"],
            tbl["is_last"],
            tbl.get("active"),  # uneven stages only (pipeline_step.Pipeline.tables)
        )
        ops = pipeline_ops.Ops(stage, env, layout.split)
        carry = pipeline_ops.init_carry(
            stage, env, layout.act_slots, layout.grd_slots, ops.residuals, layout.wres_slots
        )
        branches = [ops.branch(code) for code in layout.codes]
        loopback = tbl["loopback"]

        def tick(carry, row):
            carry, outbox, log = jax.lax.switch(row["branch"], branches, carry, row)
            # Every rank runs the same collectives here, outside the switch.
            inbox = [
                jax.lax.ppermute(outbox[ch], AXIS, channel_perms[ch])
                if channel_perms[ch]
                else jnp.zeros_like(outbox[ch])
                for ch in Channel
            ]
            inbox = [
                jnp.where(loopback[ch] >= 0, outbox[jnp.maximum(loopback[ch], 0)], inbox[ch])
                for ch in Channel
            ]
            return _receive(carry, inbox, row["recv"]), log

        carry, log = jax.lax.scan(tick, carry, {k: tbl[k] for k in ROWS + ("recv",)})
        d_glob, epi = jax.lax.psum((carry.d_glob, carry.epi), AXIS)
        lead = lambda x: x[None]  # noqa: E731 - restore the sharded leading axis
        return (
            jax.tree.map(lead, carry.d_stack),
            d_glob,
            lead(carry.load),
            lead(carry.balance),
            epi,
            lead(log),
        )

    staged, rep = P(AXIS), P()
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(staged, staged, rep, rep, rep, rep, rep, staged),
        out_specs=(staged, rep, staged, staged, rep, staged),
        axis_names=frozenset({AXIS}),
        check_vma=False,
    )

    def run(stack, stack_bias, glob, glob_bias, mbs, norms, weights, tbl) -> Result:
        return Result(*fn(stack, stack_bias, glob, glob_bias, mbs, norms, weights, tbl))

    return run
