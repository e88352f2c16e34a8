"""Expert parallelism: routed experts split over the `expert` mesh axis, tokens moved by all-to-all.

`make_expert_fn(mesh, rules, exchange)` returns a drop-in for `model.dispatch.dropless_experts`
(a `dispatch.ExpertFn`, which `Plan.experts()` hands to the model). Inside one `jax.shard_map`,
on every device:

1. route locally: the device's (token, choice) pairs are sorted by global expert id, so the rows
   for expert-parallel rank r (experts r*E_l .. (r+1)*E_l - 1) are contiguous, sorted by local
   expert within;
2. dispatch: each rank's rows go to it. ALL_TO_ALL scatters them into a [U, W, D] buffer with
   W = X_local * min(k, E_l) rows per destination (U = EP ranks) -- the most one source can ever
   send one rank,
   since a token picks distinct experts -- and runs one dense all_to_all: dropless, any backend,
   but it moves U*W rows where X_local*k are needed. RAGGED_ALL_TO_ALL sends exactly the routed
   rows with jax.lax.ragged_all_to_all (TPU/GPU; XLA:CPU cannot execute it) into the same
   [U, W, D] receive layout: source s's rows at s*W;
3. compute: received rows are regrouped by local expert and run through the grouped SwiGLU
   (`dispatch.grouped_swiglu`, the grouped matmul `model.grouped_matmul` chose, AUTO resolved for
   the mesh's platform) on the local experts; with tensor parallelism each rank holds an F-slice of
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

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.model import dispatch, grouped, precision
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


def make_expert_fn(mesh, rules: sharding_lib.Rules, exchange: Exchange) -> dispatch.ExpertFn:
    """dropless_experts(x_XD, idx_Xk, weights_Xk, w1_EDF, w3_EDF, w2_EFD) over the mesh."""
    sizes = mesh_lib.sizes_of(mesh)
    batch = _entry(_axes(rules.act_batch, sizes))
    expert_axes = _axes(rules.expert, sizes)
    tensor_axes = _axes(rules.expert_mlp, sizes)
    e, t = _entry(expert_axes), _entry(tensor_axes)
    tokens = P(batch, None)
    ep = math.prod(sizes[a] for a in expert_axes)
    local = functools.partial(
        _local, ep=ep, expert_axes=expert_axes, tensor_axes=tensor_axes, exchange=exchange
    )
    in_specs = (tokens, tokens, tokens, P(e, None, t), P(e, None, t), P(e, t, None))
    # Manual over every axis but `pipe`, which a pipeline's enclosing shard_map owns.
    manual = frozenset(a for a in mesh.axis_names if a != mesh_lib.PIPE)

    # AbstractMesh has no devices: AUTO then follows jax.default_backend().
    platform = mesh.devices.flat[0].platform if isinstance(mesh, jax.sharding.Mesh) else None

    def experts(
        *args,
        grouped_matmul: dispatch.GroupedMatmul = dispatch.GroupedMatmul.AUTO,
        policy: precision.MatmulPolicy = precision.MatmulPolicy.DEFAULT,
    ):
        impl = grouped.resolve(grouped_matmul, platform)
        return jax.shard_map(
            functools.partial(local, impl=impl, policy=policy),
            mesh=mesh_lib.current(mesh),
            in_specs=in_specs,
            out_specs=tokens,
            axis_names=manual,
            # megablox builds its tile metadata with jnp.histogram, whose searchsorted rejects
            # operands typed as varying over manual axes (jax 0.10.2); without the type check
            # the shard_map's transpose sums the replicated inputs' cotangents at its boundary.
            check_vma=impl is not grouped.GroupedMatmul.MEGABLOX,
        )(*args)

    return experts


def _local(
    x_XD,
    idx_Xk,
    weights_Xk,
    w1_eDF,
    w3_eDF,
    w2_eFD,
    *,
    ep,
    expert_axes,
    tensor_axes,
    exchange,
    impl,
    policy,
):
    X, k = idx_Xk.shape
    E_l = w1_eDF.shape[0]
    order_Z, group_sizes_E = dispatch.sort_by_expert(idx_Xk, E_l * ep)
    x_ZD = jnp.take(x_XD, order_Z // k, axis=0)
    if ep == 1:
        y_ZD = dispatch.grouped_swiglu(
            x_ZD, group_sizes_E, w1_eDF, w3_eDF, w2_eFD, impl=impl, policy=policy
        )
    else:
        route = _Route(
            idx_Xk.reshape(-1)[order_Z],
            group_sizes_E,
            ep,
            E_l,
            capacity=X * min(k, E_l),
            axes=expert_axes,
        )
        send = route.dispatch_ragged if exchange is Exchange.RAGGED_ALL_TO_ALL else route.dispatch
        recv_UWD, back = send(x_ZD)
        y_UWD = _compute_received(
            recv_UWD, route.recv_counts_Ue, w1_eDF, w3_eDF, w2_eFD, impl, policy
        )
        y_ZD = back(y_UWD)
    y_XkD = jnp.take(y_ZD, jnp.argsort(order_Z), axis=0).reshape(X, k, -1)
    acc = jnp.promote_types(x_XD.dtype, jnp.float32)
    y_XD = jnp.einsum("xkd,xk->xd", y_XkD.astype(acc), weights_Xk.astype(acc))
    if tensor_axes:
        y_XD = jax.lax.psum(y_XD, tensor_axes)  # each tensor rank held an F-slice
    return y_XD.astype(x_XD.dtype)


class _Route:
    """Where this device's sorted rows go: destination rank and slot of every row."""

    def __init__(self, expert_Z, group_sizes_E, ep: int, E_l: int, capacity: int, axes):
        self.ep, self.capacity, self.axes = ep, capacity, axes
        counts_Ue = group_sizes_E.reshape(ep, E_l)
        self.sizes_U = counts_Ue.sum(-1)  # rows to each destination rank
        self.starts_U = jnp.cumsum(self.sizes_U) - self.sizes_U
        self.dest_Z = expert_Z // E_l
        self.slot_Z = jnp.arange(expert_Z.shape[0], dtype=jnp.int32) - self.starts_U[self.dest_Z]
        # Row r of recv_counts_Ue: how many rows source r sends for each of my local experts.
        self.recv_counts_Ue = self._a2a(counts_Ue)

    def _a2a(self, x):
        return jax.lax.all_to_all(x, self.axes, 0, 0, tiled=True)

    def dispatch(self, x_ZD):
        """Dense exchange of a worst-case [U, W, D] buffer; returns (received, way back)."""
        send_UWD = jnp.zeros((self.ep, self.capacity, x_ZD.shape[-1]), x_ZD.dtype)
        send_UWD = send_UWD.at[self.dest_Z, self.slot_Z].set(x_ZD, unique_indices=True)

        def back(y_UWD):
            return self._a2a(y_UWD)[self.dest_Z, self.slot_Z]

        return self._a2a(send_UWD), back

    def dispatch_ragged(self, x_ZD):
        """Exact-size exchange; source s's rows land at s*W, the layout `dispatch` produces."""
        ep, W, D = self.ep, self.capacity, x_ZD.shape[-1]
        me = jax.lax.axis_index(self.axes).astype(jnp.int32)
        recv_sizes_U = self._a2a(self.sizes_U)
        slots_U = jnp.arange(ep, dtype=jnp.int32) * W
        recv = ragged_all_to_all(
            x_ZD,
            jnp.zeros((ep * W, D), x_ZD.dtype),
            self.starts_U,
            self.sizes_U,
            jnp.full((ep,), me * W, jnp.int32),
            recv_sizes_U,
            axis_name=self.axes,
        )
        their_starts_U = self._a2a(self.starts_U)  # where my rows sat in each source's buffer

        def back(y_UWD):
            return ragged_all_to_all(
                y_UWD.reshape(ep * W, D),
                jnp.zeros_like(x_ZD),
                slots_U,
                recv_sizes_U,
                their_starts_U,
                self.sizes_U,
                axis_name=self.axes,
            )

        return recv.reshape(ep, W, D), back


def _compute_received(recv_UWD, counts_Ue, w1_eDF, w3_eDF, w2_eFD, impl, policy):
    """Grouped SwiGLU on received rows; source r's block holds counts_Ue[r] rows per expert."""
    U, W, D = recv_UWD.shape
    ends_Ue = jnp.cumsum(counts_Ue, axis=-1)
    slot_W = jnp.arange(W, dtype=ends_Ue.dtype)
    # Local expert of each slot: how many expert blocks end at or before it (E_l: padding).
    expert_UW = jnp.sum(slot_W[None, :, None] >= ends_Ue[:, None, :], axis=-1)
    order = jnp.argsort(expert_UW.reshape(-1), stable=True)
    rows = jnp.take(recv_UWD.reshape(U * W, D), order, axis=0)
    # Rows past sum(group sizes) -- the padding, sorted last -- come out of the grouped matmul as
    # zeros (both implementations, under every policy).
    out = dispatch.grouped_swiglu(
        rows, counts_Ue.sum(0), w1_eDF, w3_eDF, w2_eFD, impl=impl, policy=policy
    )
    return jnp.take(out, jnp.argsort(order), axis=0).reshape(U, W, D)
