"""Our training checkpoint format, as far as conversion and scoring need it: one module to re-point.

Contract: a step directory `<workdir>/checkpoints/<step>/` holds orbax items `state/` (a PyTree
checkpoint of `{"step", "params", "expert_bias", "opt_state"}`, params and expert_bias being
`nnx.to_pure_dict` trees; a GRPO run's state holds that tree under "policy") and `config/` (JSON,
`{"model": ModelConfig.to_dict(), ...}`).

Both directions stream. Reading opens each leaf's TensorStore array (the spec orbax itself builds)
and reads one slice at a time, aligned to the stored chunks, so opt_state is never touched and a
stacked [layers, experts, ...] leaf is never held whole unless it was stored as one chunk.
Writing goes through orbax's own PyTree handler with a `LazyLeaf` type whose handler creates the
array with the leaf's chunk shape and fills it chunk by chunk from a callback; the
files are exactly what orbax's numpy handler writes (`np.ndarray` leaves), so StandardRestore and
PyTreeRestore read them like any other checkpoint.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import type_handler_registry as ocp_registry
from orbax.checkpoint._src.serialization import type_handlers as ocp_handlers
from orbax.checkpoint._src.serialization import types as ocp_types

from deepseek_jax.convert.errors import ConversionError
from deepseek_jax.model import config as config_lib

STATE, CONFIG = "state", "config"
PARAMS, EXPERT_BIAS = "params", "expert_bias"
Path = tuple[str, ...]
WRITE_BUDGET_BYTES = 64 * 2**20  # slices held while their writes are in flight
_ARRAY_TYPES = ("np.ndarray", "jax.Array")  # value types in orbax's _METADATA
_MODEL_ROOTS: tuple[Path, ...] = ((), ("policy",))  # rl/loop.py's RLState.policy


# -- locating checkpoints ---------------------------------------------------------------------
def is_step_dir(path: pathlib.Path) -> bool:
    return (path / STATE).is_dir() and (path / CONFIG).is_dir()


def resolve_step_dir(checkpoint: pathlib.Path, step: int | None = None) -> pathlib.Path:
    """A step directory itself, or the latest (or `step`) under `<workdir>/checkpoints/`."""
    checkpoint = pathlib.Path(checkpoint)
    if is_step_dir(checkpoint):
        if step is not None:
            raise ConversionError(
                f"{checkpoint}: is a step directory; --step only applies to a workdir"
            )
        return checkpoint
    root = checkpoint / "checkpoints"
    if not root.is_dir():
        raise ConversionError(
            f"{checkpoint}: neither a checkpoint step directory (with {STATE}/ "
            "and config/) nor a workdir with checkpoints/"
        )
    # Only complete steps: orbax renames "<step>.orbax-checkpoint-tmp-*" to "<step>" at the end.
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and is_step_dir(p))
    if not steps:
        raise ConversionError(f"{root}: no complete checkpoint steps")
    if step is None:
        return root / str(steps[-1])
    if step not in steps:
        raise ConversionError(f"{root}: no step {step} (have {steps})")
    return root / str(step)


def read_config(step_dir: pathlib.Path) -> dict[str, Any]:
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        out = ckptr.restore(
            epath.Path(step_dir), args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()})
        )[CONFIG]
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(f"{step_dir / CONFIG}: cannot read the config item ({e})") from None
    if not isinstance(out, dict) or "model" not in out:
        raise ConversionError(f"{step_dir / CONFIG}: no 'model' section")
    return out


def model_config(step_dir: pathlib.Path) -> config_lib.ModelConfig:
    try:
        return config_lib.ModelConfig.from_dict(read_config(step_dir)["model"])
    except ValueError as e:
        raise ConversionError(f"{step_dir / CONFIG}: {e}") from None


# -- reading ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]
    dtype: np.dtype
    name: str  # orbax parameter name ("params.embed.embedding")


class StateReader:
    """Slices of the params / expert_bias leaves of a step's state item.

    The tree structure comes from the item's `_METADATA` file and only params and expert_bias
    arrays are opened (one at a time, so a damaged checkpoint gives one error naming the leaf);
    orbax's own metadata call would open every array, opt_state included, concurrently."""

    def __init__(self, step_dir: pathlib.Path):
        self.dir = epath.Path(step_dir) / STATE
        try:
            meta = json.loads((self.dir / "_METADATA").read_text())
            entries = [
                tuple(str(k["key"]) for k in e["key_metadata"])
                + (e["value_metadata"]["value_type"],)
                for e in meta["tree_metadata"].values()
            ]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{self.dir}: not a readable orbax PyTree item ({e})") from None
        self.use_zarr3 = bool(meta.get("use_zarr3", False))
        self.use_ocdbt = ocp_handlers.is_ocdbt_checkpoint(self.dir)
        self._context = ts_utils.get_ts_context(use_ocdbt=self.use_ocdbt)  # one, shared
        self._open: dict[str, Any] = {}
        self._cache: tuple[tuple, np.ndarray] | None = None  # one block: bounds memory
        self.leaves: dict[str, dict[Path, Leaf]] = {}
        # Where the model's TrainState sits: at the top (pre-training, SFT) or under the RL
        # state's "policy" (a GRPO run); the first root holding params is the model's.
        root = next(
            (r for r in _MODEL_ROOTS if any(e[: len(r) + 1] == (*r, PARAMS) for e in entries)),
            (),
        )
        n = len(root)
        for collection in (PARAMS, EXPERT_BIAS):
            if not any(e[: n + 1] == (*root, collection) for e in entries):
                raise ConversionError(f"{self.dir}: the state has no '{collection}' entry")
            self.leaves[collection] = {}
            for *keys, value_type in entries:
                if tuple(keys[: n + 1]) != (*root, collection) or value_type not in _ARRAY_TYPES:
                    continue
                t = self._store(".".join(keys))
                self.leaves[collection][tuple(keys[n + 1 :])] = Leaf(
                    tuple(t.shape), np.dtype(t.dtype.numpy_dtype), ".".join(keys)
                )

    def check(
        self,
        want: Mapping[str, Mapping[Path, tuple[tuple[int, ...], Any]]],
        allow_missing: tuple[str, ...] = (),
    ) -> None:
        """The state must hold exactly the leaves (and shapes) the model config implies; leaves
        under a top-level key in `allow_missing` (e.g. "mtp") may be absent."""
        for collection, leaves in want.items():
            have = self.leaves[collection]
            for path, (shape, _) in leaves.items():
                name = ".".join((collection,) + path)
                if path not in have:
                    if path[0] in allow_missing:
                        continue
                    raise ConversionError(
                        f"{self.dir}: missing leaf {name} that the model config implies"
                    )
                if have[path].shape != tuple(shape):
                    raise ConversionError(
                        f"{self.dir}: leaf {name} has shape "
                        f"{list(have[path].shape)}, the model config implies "
                        f"{list(shape)}"
                    )
            extra = sorted(".".join((collection,) + p) for p in set(have) - set(leaves))
            if extra:
                raise ConversionError(
                    f"{self.dir}: leaves not in the model config: {', '.join(extra[:5])}"
                )

    def _store(self, name: str):
        if name not in self._open:
            info = ocp_types.ParamInfo(
                name=name,
                parent_dir=self.dir,
                is_ocdbt_checkpoint=self.use_ocdbt,
                use_zarr3=self.use_zarr3,
                ts_context=self._context,
            )
            spec = ts_utils.build_array_read_spec(info, use_ocdbt=self.use_ocdbt)
            self._open[name] = self._result(
                ts.open(ts.Spec(spec.json), open=True, read=True, context=self._context),
                f"open leaf {name}",
            )
        return self._open[name]

    def _result(self, future, what: str):
        try:
            return future.result()
        except ValueError as e:  # tensorstore's errors; drop the spec dump it appends
            msg = str(e).split(" [tensorstore_spec=")[0]
            raise ConversionError(f"{self.dir}: cannot {what} ({msg})") from None

    def read(self, collection: str, path: Path, index: tuple[int, ...] = ()) -> np.ndarray:
        """leaf[index], reading whole storage chunks along the indexed dims and keeping the last
        block, so a sweep over consecutive indices reads every chunk once."""
        leaf = self.leaves[collection][path]
        t = self._store(leaf.name)
        if not index:
            return np.asarray(self._result(t.read(), f"read leaf {leaf.name}"))
        chunk = t.chunk_layout.read_chunk.shape
        bounds = tuple(
            (i // c * c, min(i // c * c + c, n)) for i, c, n in zip(index, chunk, leaf.shape)
        )
        key = (leaf.name, bounds)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # drop the old block before reading the next
            block = self._result(
                t[tuple(slice(a, b) for a, b in bounds)].read(),
                f"read leaf {leaf.name}{list(index)}",
            )
            self._cache = (key, np.asarray(block))
        local = tuple(i - a for i, (a, _) in zip(index, bounds))
        return self._cache[1][local]


def nest(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """{("a", "b"): x} -> {"a": {"b": x}}: the shape of nnx.to_pure_dict."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


# -- writing ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LazyLeaf:
    """A leaf written region by region: `fill(region)` returns leaf[region] for each cell of the
    grid of `chunk`-shaped regions (clipped at the edges); each region is one storage chunk."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...]
    fill: Callable[[tuple[slice, ...]], np.ndarray]

    def regions(self):
        grid = [-(-n // c) for n, c in zip(self.shape, self.chunk)]
        for cell in np.ndindex(*grid):
            yield tuple(
                slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(cell, self.chunk, self.shape)
            )


class _LazyLeafHandler(ocp_handlers.NumpyHandler):
    """Writes what NumpyHandler writes (typestr np.ndarray), one chunk-sized region at a time."""

    async def serialize(self, values, infos, args=None):
        args = args or [ocp_types.SaveArgs()] * len(values)
        return [
            ocp_future.CommitFutureAwaitingContractedSignals(
                self._write_all(values, infos, args), name="lazy_leaf"
            )
        ]

    async def _write_all(self, values, infos, args):
        opens = []
        for leaf, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info,
                arg=arg,
                global_shape=leaf.shape,
                local_shape=leaf.chunk,
                dtype=leaf.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(
                    use_ocdbt=info.is_ocdbt_checkpoint
                ),
            )
            opens.append(
                ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            )
        stores = await asyncio.gather(*opens)
        # Writes run concurrently up to a byte budget: each one committed alone costs a storage
        # round trip (~17 ms with OCDBT); concurrent ones are committed together. TensorStore
        # may keep a reference to each region instead of copying it: we never modify them.
        in_flight: collections.deque = collections.deque()
        held = 0
        for leaf, info, t in zip(values, infos, stores):
            for region in leaf.regions():
                value = np.asarray(leaf.fill(region)).astype(leaf.dtype, copy=False)
                want = tuple(r.stop - r.start for r in region)
                if value.shape != want:
                    raise AssertionError(f"{info.name}{region}: filled {value.shape}, want {want}")
                write = t[region].write(value, can_reference_source_data_indefinitely=True)
                in_flight.append((write, value.nbytes))
                held += value.nbytes
                while held > WRITE_BUDGET_BYTES and len(in_flight) > 1:
                    fut, n = in_flight.popleft()
                    await fut
                    held -= n
        for fut, _ in in_flight:
            await fut


_REGISTRY = ocp_registry.create_type_handler_registry(
    *ocp_registry._DEFAULT_TYPE_HANDLERS, (LazyLeaf, _LazyLeafHandler())
)


def write_step(
    out_dir: pathlib.Path,
    config: Mapping[str, Any],
    params: Mapping[str, Any],
    expert_bias: Mapping[str, Any],
    step: int = 0,
) -> None:
    """Writes a step directory (no opt_state). `out_dir` must not exist; the caller makes the
    write atomic by writing to a temporary name and renaming."""
    state = {
        "step": np.asarray(step, np.int32),
        PARAMS: dict(params),
        EXPERT_BIAS: dict(expert_bias),
    }
    handler = ocp.CompositeCheckpointHandler(
        **{
            STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_REGISTRY),
            CONFIG: ocp.JsonCheckpointHandler(),
        }
    )
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(
            epath.Path(out_dir),
            args=ocp.args.Composite(
                **{STATE: ocp.args.PyTreeSave(state), CONFIG: ocp.args.JsonSave(dict(config))}
            ),
        )
