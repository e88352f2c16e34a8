"""Small helpers over nnx States: flat {path: array} views and rebuilding with new arrays.

Paths are tuples of strings (e.g. ("moe_layers", "attn", "wq_b", "kernel")); they are the join key
between our state, checkpoints and the HF name mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

Path = tuple[str, ...]


def variables(state: Any) -> dict[Path, nnx.Variable]:
    return {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def arrays(state: Any) -> dict[Path, Any]:
    return {path: var.get_value() for path, var in variables(state).items()}


def logical_axes(state: Any) -> dict[Path, tuple]:
    return {
        path: tuple(var.get_metadata().get("logical_axes", ()))
        for path, var in variables(state).items()
    }


def with_arrays(state: Any, new: Mapping[Path, Any] | Callable[[Path, Any], Any]) -> Any:
    """The same State (metadata kept) with each array replaced by new[path] or new(path, old)."""
    items = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        value = new(key, var.get_value()) if callable(new) else new[key]
        items.append((path, var.replace(value)))
    return nnx.from_flat_state(items)
