"""Logical axis names -> mesh axes: the one rules table, and PartitionSpecs derived from it.

Every parameter carries `logical_axes` (one name per dimension, see DEVELOPERS.md); a preset maps
each logical name to the mesh axes it is split over. `spec()` turns one array's logical axes into a
PartitionSpec with two rules:

1. Left to right, a dimension takes its rule's mesh axes minus those an earlier dimension of the
   same array already took (a mesh axis can split an array only once). So `embed -> fsdp` and
   `q_lora -> fsdp` shard wq_a [embed, q_lora] by embed and wq_b [q_lora, heads, qk_head] by
   q_lora: every large matrix has some FSDP-sharded dimension. Axes of size 1 are dropped.
2. A dimension that is not divisible by the product of its mesh axes is an error naming the array,
   the dimension, the sizes and the axes. Never a silent fallback to replication: a replicated
   matrix that was meant to be sharded is a memory bug that shows up only at scale.

Optimizer slots (Adam's mu and nu) mirror the parameters: a slot leaf whose path ends with a
parameter's path and has its shape gets that parameter's sharding; other leaves (step counts,
empty states) are scalars and replicated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.parallel import config as config_lib
from deepseek_jax.parallel import mesh as mesh_lib

Axes = tuple[str, ...]
_B, _F, _E, _T = mesh_lib.BATCH_AXES, (mesh_lib.FSDP,), (mesh_lib.EXPERT,), (mesh_lib.TENSOR,)


@dataclasses.dataclass(frozen=True)
class Rules:
    """Mesh axes that each logical axis is split over (empty: replicated).

    Fields are the logical axis names, so a misspelt name fails as an unknown field. The pipeline
    puts `pipe` on the leading layer axis of the MoE stack itself (pipeline.stages.stack_over_pipe),
    not through a rule.
    """

    # Parameters.
    vocab: Axes = ()
    embed: Axes = ()
    q_lora: Axes = ()
    kv_lora: Axes = ()
    heads: Axes = ()
    qk_head: Axes = ()
    kv_head: Axes = ()
    v_head: Axes = ()
    kv_a: Axes = ()
    mlp: Axes = ()
    expert: Axes = ()
    expert_mlp: Axes = ()
    mtp_in: Axes = ()
    layers: Axes = ()
    mtp_layers: Axes = ()
    norm: Axes = ()
    # Activations. The batch is split over every axis that carries different tokens.
    act_batch: Axes = _B
    act_seq: Axes = ()
    act_embed: Axes = ()
    act_heads: Axes = ()
    act_mlp: Axes = ()
    act_vocab: Axes = ()

    def axes(self, logical: str | None) -> Axes:
        if logical is None:
            return ()
        if logical not in _FIELDS:
            raise ValueError(f"unknown logical axis {logical!r} (known: {sorted(_FIELDS)})")
        return getattr(self, logical)

    def param_mesh_axes(self) -> set[str]:
        """Mesh axes this preset splits parameters over."""
        return {a for f in _FIELDS if not f.startswith("act_") for a in getattr(self, f)}

    def pairs(self) -> list[tuple[str, Axes]]:
        """(logical, mesh axes) pairs, e.g. for flax's nnx.logical_axis_rules."""
        return [(f, getattr(self, f)) for f in sorted(_FIELDS) if getattr(self, f)]


_FIELDS = frozenset(f.name for f in dataclasses.fields(Rules))


def _fsdp(axes: Axes) -> dict[str, Axes]:
    # embed covers every matrix with a model-dim side (incl. experts and the router); q_lora,
    # kv_lora and mtp_in cover wq_b, wkv_b and eh_proj's first dim.
    return dict(embed=axes, q_lora=axes, kv_lora=axes, mtp_in=axes)


# Megatron tensor parallelism: attention by heads, FFNs by hidden units, the head by vocab.
_TP = dict(vocab=_T, heads=_T, mlp=_T, expert_mlp=_T, act_heads=_T, act_mlp=_T, act_vocab=_T)

RULES: Mapping[config_lib.Preset, Rules] = {
    config_lib.Preset.DATA: Rules(),
    config_lib.Preset.FSDP: Rules(**_fsdp(_F)),
    config_lib.Preset.FSDP_TP: Rules(**_fsdp(_F), **_TP),
    config_lib.Preset.DATA_EXPERT: Rules(expert=_E),
    # Dense weights are FSDP-sharded over fsdp x expert (the expert axis is a batch axis for
    # them); experts take `expert` first, so their embed side is sharded over fsdp only.
    config_lib.Preset.FSDP_EXPERT_TP: Rules(**_fsdp(_F + _E), expert=_E, **_TP),
}


def rules_for(preset: config_lib.Preset) -> Rules:
    if not isinstance(preset, config_lib.Preset) or preset not in RULES:
        raise ValueError(
            f"unknown parallel preset {preset!r} (allowed: {[p.value for p in config_lib.Preset]})"
        )
    return RULES[preset]


def spec(
    rules: Rules,
    logical: Sequence[str | None],
    shape: Sequence[int] | None,
    sizes: Mapping[str, int],
    what: str = "array",
) -> P:
    """PartitionSpec of one array (rules 1 and 2 of the module docstring)."""
    if shape is not None and len(shape) != len(logical):
        raise ValueError(f"{what}: logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    entries: list[Any] = []
    for dim, name in enumerate(logical):
        axes = tuple(a for a in rules.axes(name) if a not in used and sizes[a] > 1)
        used.update(axes)
        n = math.prod(sizes[a] for a in axes)
        if shape is not None and shape[dim] % n:
            raise ValueError(
                f"{what}: dimension {dim} ({name}) has size {shape[dim]}, not divisible by the "
                f"{n} shards of mesh axes {' x '.join(f'{a}={sizes[a]}' for a in axes)}"
            )
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def path_keys(path) -> tuple[str, ...]:
    """A jax tree path as plain strings: ('moe_layers', 'attn', 'wq_b', 'kernel')."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def tree_specs(
    rules: Rules, logical_tree: Any, abstract_tree: Any, sizes: Mapping[str, int], prefix: str
) -> Any:
    """Specs for a nested dict of arrays given the same-shaped nested dict of logical axes."""
    flat_logical = {
        path_keys(p): v
        for p, v in jax.tree_util.tree_flatten_with_path(
            logical_tree, is_leaf=lambda x: isinstance(x, tuple)
        )[0]
    }

    def one(path, leaf):
        keys = path_keys(path)
        return spec(rules, flat_logical[keys], leaf.shape, sizes, "/".join((prefix,) + keys))

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def mirror_specs(param_specs: Any, abstract_params: Any, abstract_tree: Any) -> Any:
    """Specs for a tree whose array leaves mirror the params (optimizer state): by path suffix."""
    by_path = {}
    flat_specs = jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=_is_spec)[0]
    for (path, s), leaf in zip(flat_specs, jax.tree.leaves(abstract_params), strict=True):
        by_path[path_keys(path)] = (s, tuple(leaf.shape))

    def one(path, leaf):
        keys = path_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[1] == tuple(leaf.shape):
                return hit[0]
        return P()

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def _names(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def add_axis(s: P, shape: Sequence[int], axis: str, sizes: Mapping[str, int]) -> P | None:
    """`s` with mesh axis `axis` added to one more dimension of an array of `shape`: the first
    dimension with no mesh axis that `axis` divides; failing that, the first sharded dimension
    whose size the product (its axes x `axis`) divides. None if no dimension can take it."""
    n = sizes[axis]
    entries = list(s) + [None] * (len(shape) - len(s))
    for d, e in enumerate(entries):
        if e is None and shape[d] % n == 0:
            entries[d] = axis
            return P(*entries)
    for d, e in enumerate(entries):
        if e is not None and shape[d] % (math.prod(sizes[a] for a in _names(e)) * n) == 0:
            entries[d] = (*_names(e), axis)
            return P(*entries)
    return None


def zero1_specs(
    specs: Any, abstract_tree: Any, sizes: Mapping[str, int], what: str = "opt_state"
) -> Any:
    """ZeRO-1: every optimizer-state array additionally split over the `data` axis.

    The dimension is `add_axis`'s choice. Scalars (Adam's step count) stay replicated. An array
    no dimension of which can take `data` is a bad layout: ValueError naming `parallel.data` and
    the array (validate.check_state raises it at plan time). The update (step.apply_update) then
    runs sharded like its state, and GSPMD all-gathers the new parameters to their own sharding.
    """
    n = sizes[mesh_lib.DATA]
    if n == 1:
        return specs

    def one(path, s, leaf):
        if leaf.ndim == 0 or any(mesh_lib.DATA in _names(e) for e in s):
            return s
        out = add_axis(s, leaf.shape, mesh_lib.DATA, sizes)
        if out is not None:
            return out
        name = "/".join((what,) + path_keys(path))
        raise ValueError(
            f"parallel.zero=1: {name} of shape {tuple(leaf.shape)} (sharded {s}) "
            f"has no dimension divisible by the data axis, data={n}: pick a "
            "parallel.data that divides it, or parallel.zero=0"
        )

    return jax.tree_util.tree_map_with_path(one, specs, abstract_tree, is_leaf=_is_spec)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def named(mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def constraint_fn(mesh, rules: Rules) -> Callable[[jax.Array, Sequence[str]], jax.Array]:
    """The activation constraint (model/constraints.py): logical names -> sharding constraints."""
    sizes = mesh_lib.sizes_of(mesh)

    def constrain(x: jax.Array, logical: Sequence[str]) -> jax.Array:
        s = spec(rules, logical, x.shape, sizes, f"activation {tuple(logical)}")
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh_lib.current(mesh), s))

    return constrain
