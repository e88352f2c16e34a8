"""Expert parallelism: routed experts split over the `expert` mesh axis, tokens moved by all-to-all.

`make_expert_fn(mesh, rules, exchange)` returns a drop-in for `model.dispatch.dropless_experts`
(same signature, installed with `model.hooks.expert_implementation`). Inside one `jax.shard_map`,
on every device:

1. route locally: the device's (token, choice) pairs are sorted by global expert id, so the rows
   for expert-parallel rank r (experts r*E_l .. (r+1)*E_l - 1) are contiguous, sorted by local
   expert within;
2. dispatch: each rank's rows go to it. ALL_TO_ALL scatters them into a [EP, C, D] buffer with
   C = X_local * min(k, E_l) rows per destination -- the most one source can ever send one rank,
   since a token picks distinct experts -- and runs one dense all_to_all: dropless, any backend,
   but it moves EP*C rows where X_local*k are needed. RAGGED_ALL_TO_ALL sends exactly the routed
   rows with jax.lax.ragged_all_to_all (TPU/GPU; XLA:CPU cannot execute it) into the same
   [EP, C, D] receive layout: source s's rows at s*C;
3. compute: received rows are regrouped by local expert and run through the grouped SwiGLU
   (ragged_dot) on the local experts; with tensor parallelism each rank holds an F-slice of
   every expert and the partial outputs are summed over `tensor` after the combine;
4. return: the inverse exchange brings each row back to its source, which combines the top-k
   results with the routing weights (in float32 or wider).

Gradients flow through both exchanges (all_to_all and ragged_all_to_all transpose to themselves).

Group-limited routing: expert e lives on rank e // E_l, so with n_group a multiple of the expert
axis size every group lies on one rank and a token reaches at most topk_group ranks -- the paper's
node-limited routing (V3: 8 groups, top-4 groups: each token crosses to at most 4 nodes).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.model import dispatch
from deepseek_jax.parallel import config as config_lib
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel import sharding as sharding_lib

Exchange = config_lib.ExpertExchange
# The primitive, looked up at trace time so tests can substitute an emulation on CPU.
ragged_all_to_all = jax.lax.ragged_all_to_all


def _axes(rules_axes: tuple[str, ...], sizes: dict[str, int]) -> tuple[str, ...]:
    return tuple(a for a in rules_axes if sizes[a] > 1)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def make_expert_fn(mesh, rules: sharding_lib.Rules, exchange: Exchange) -> Callable:
    """dropless_experts(x_XD, idx_Xk, weights_Xk, w1_EDF, w3_EDF, w2_EFD) over the mesh."""
    sizes = mesh_lib.sizes_of(mesh)
    batch = _entry(_axes(rules.act_batch, sizes))
    expert_axes = _axes(rules.expert, sizes)
    tensor_axes = _axes(rules.expert_mlp, sizes)
    e, t = _entry(expert_axes), _entry(tensor_axes)
    tokens = P(batch, None)
    ep = math.prod(sizes[a] for a in expert_axes)
    local = functools.partial(_local, ep=ep, expert_axes=expert_axes, tensor_axes=tensor_axes,
                              exchange=exchange)
    in_specs = (tokens, tokens, tokens, P(e, None, t), P(e, None, t), P(e, t, None))
    # Manual over every axis but `stage`, which a pipeline's enclosing shard_map owns.
    manual = frozenset(a for a in mesh.axis_names if a != mesh_lib.STAGE)

    def experts(*args):
        return jax.shard_map(local, mesh=mesh_lib.current(mesh), in_specs=in_specs,
                             out_specs=tokens, axis_names=manual)(*args)

    return experts


def _local(x_XD, idx_Xk, weights_Xk, w1_eDF, w3_eDF, w2_eFD, *, ep, expert_axes, tensor_axes,
           exchange):
    X, k = idx_Xk.shape
    E_l = w1_eDF.shape[0]
    order_M, group_sizes_E = dispatch.sort_by_expert(idx_Xk, E_l * ep)
    x_MD = jnp.take(x_XD, order_M // k, axis=0)
    if ep == 1:
        y_MD = dispatch.grouped_swiglu(x_MD, group_sizes_E, w1_eDF, w3_eDF, w2_eFD)
    else:
        route = _Route(idx_Xk.reshape(-1)[order_M], group_sizes_E, ep, E_l,
                       capacity=X * min(k, E_l), axes=expert_axes)
        send = route.dispatch_ragged if exchange is Exchange.RAGGED_ALL_TO_ALL else route.dispatch
        recv_RCD, back = send(x_MD)
        y_RCD = _compute_received(recv_RCD, route.recv_counts_Re, w1_eDF, w3_eDF, w2_eFD)
        y_MD = back(y_RCD)
    y_XkD = jnp.take(y_MD, jnp.argsort(order_M), axis=0).reshape(X, k, -1)
    acc = jnp.promote_types(x_XD.dtype, jnp.float32)
    y_XD = jnp.einsum("xkd,xk->xd", y_XkD.astype(acc), weights_Xk.astype(acc))
    if tensor_axes:
        y_XD = jax.lax.psum(y_XD, tensor_axes)  # each tensor rank held an F-slice
    return y_XD.astype(x_XD.dtype)


class _Route:
    """Where this device's sorted rows go: destination rank and slot of every row."""

    def __init__(self, expert_M, group_sizes_E, ep: int, E_l: int, capacity: int, axes):
        self.ep, self.capacity, self.axes = ep, capacity, axes
        counts_Re = group_sizes_E.reshape(ep, E_l)
        self.sizes_R = counts_Re.sum(-1)  # rows to each destination rank
        self.starts_R = jnp.cumsum(self.sizes_R) - self.sizes_R
        self.dest_M = expert_M // E_l
        self.slot_M = jnp.arange(expert_M.shape[0], dtype=jnp.int32) - self.starts_R[self.dest_M]
        # Row r of recv_counts_Re: how many rows source r sends for each of my local experts.
        self.recv_counts_Re = self._a2a(counts_Re)

    def _a2a(self, x):
        return jax.lax.all_to_all(x, self.axes, 0, 0, tiled=True)

    def dispatch(self, x_MD):
        """Dense exchange of a worst-case [EP, C, D] buffer; returns (received, way back)."""
        send_RCD = jnp.zeros((self.ep, self.capacity, x_MD.shape[-1]), x_MD.dtype)
        send_RCD = send_RCD.at[self.dest_M, self.slot_M].set(x_MD, unique_indices=True)

        def back(y_RCD):
            return self._a2a(y_RCD)[self.dest_M, self.slot_M]

        return self._a2a(send_RCD), back

    def dispatch_ragged(self, x_MD):
        """Exact-size exchange; source s's rows land at s*C, the layout `dispatch` produces."""
        ep, C, D = self.ep, self.capacity, x_MD.shape[-1]
        me = jax.lax.axis_index(self.axes).astype(jnp.int32)
        recv_sizes_R = self._a2a(self.sizes_R)
        slots_R = jnp.arange(ep, dtype=jnp.int32) * C
        recv = ragged_all_to_all(
            x_MD, jnp.zeros((ep * C, D), x_MD.dtype), self.starts_R, self.sizes_R,
            jnp.full((ep,), me * C, jnp.int32), recv_sizes_R, axis_name=self.axes)
        their_starts_R = self._a2a(self.starts_R)  # where my rows sat in each source's buffer

        def back(y_RCD):
            return ragged_all_to_all(
                y_RCD.reshape(ep * C, D), jnp.zeros_like(x_MD), slots_R, recv_sizes_R,
                their_starts_R, self.sizes_R, axis_name=self.axes)

        return recv.reshape(ep, C, D), back


def _compute_received(recv_RCD, counts_Re, w1_eDF, w3_eDF, w2_eFD):
    """Grouped SwiGLU on received rows; source r's block holds counts_Re[r] rows per expert."""
    R, C, D = recv_RCD.shape
    ends_Re = jnp.cumsum(counts_Re, axis=-1)
    slot_C = jnp.arange(C, dtype=ends_Re.dtype)
    # Local expert of each slot: how many expert blocks end at or before it (E_l: padding).
    expert_RC = jnp.sum(slot_C[None, :, None] >= ends_Re[:, None, :], axis=-1)
    order = jnp.argsort(expert_RC.reshape(-1), stable=True)
    rows = jnp.take(recv_RCD.reshape(R * C, D), order, axis=0)
    # Rows past sum(group sizes) -- the padding, sorted last -- come out of ragged_dot as zeros.
    out = dispatch.grouped_swiglu(rows, counts_Re.sum(0), w1_eDF, w3_eDF, w2_eFD)
    return jnp.take(out, jnp.argsort(order), axis=0).reshape(R, C, D)
