"""Integrity of a checkpoint step directory: a manifest written inside orbax's atomic commit,
content fingerprints of the train state, and the checks that decide whether a step is safe to
restore.

Three layers, cheapest first (docs/checkpoints.md has the costs):

1. Structure: orbax's commit marker, our `manifest.json`, every file it lists present with its
   recorded size, and every metadata/JSON file parseable. Only stats and small reads; retention runs
   it on each save to find the newest good step.
2. Optional CRC32 of every file (`file_checksums=True`): reads the whole checkpoint once on the
   primary host at save and at restore.
3. Content fingerprints: one uint32 per state leaf, an order-sensitive hash of its bits computed on
   device (integer sums, so exact under any sharding). Recomputed after a restore on the new mesh,
   they prove the values came back bit-identical whatever the file format or resharding did.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

MANIFEST = "manifest.json"
FORMAT = 1
# Written by orbax after our manifest (inside the same atomic rename), so they cannot be listed.
_UNLISTED = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST})
_COMMIT_MARKER = "commit_success.txt"
# Files that must parse as JSON; checked even when their sizes match (garbage of equal length).
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata", "config/metadata")
_STAT_THREADS = 16


# ----------------------------------------------------------------------------- fingerprints


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The leaf's raw bits as uint32 words (typed PRNG keys through their key data)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.dtypes.itemsize_bits(x.dtype)
    if bits in (32, 64):  # 64 bits become a trailing axis of 2 words
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    w = _words(x)
    # Position enters the hash so that permuted or misplaced shards change the result; the flat
    # index wraps past 2**32 elements, which only weakens (never breaks) the check.
    sharding = jax.typeof(w).sharding
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(w.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, w.shape, dim, out_sharding=sharding)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= w.shape[dim]
    return jnp.sum(_fmix32(w ^ _fmix32(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


def _supported(x: Any) -> bool:
    """Leaves we can hash; others (sub-byte ints, complex) are saved but not fingerprinted."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    if jnp.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.bool_:
        return True
    return jax.dtypes.itemsize_bits(dtype) in (8, 16, 32, 64) and not jnp.issubdtype(
        dtype, jnp.complexfloating
    )


def _device_group(x: Any) -> tuple[int, ...]:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        return ()
    return tuple(sorted(d.id for d in sharding.device_set))


def _replicated_on(leaves: Sequence[Any]) -> Any:
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def _stack_fingerprints(xs: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_fingerprint(x) for x in xs])


@functools.cache
def _fingerprint_fn(out_sharding: Any) -> Any:
    # One jit per output sharding; jit's own cache then keys on the leaves' shapes and shardings.
    return jax.jit(_stack_fingerprints, out_shardings=out_sharding)


def start_fingerprints(state: Any) -> list[tuple[list[int], jax.Array]]:
    """Dispatches the fingerprint computation (asynchronously) and returns handles.

    Leaves are grouped by device set, since one jit cannot mix arrays committed to different
    devices. Every process must call this (the jit spans all hosts' shards); only the primary host
    needs to read the result, with `finish_fingerprints`.
    """
    leaves = jax.tree.leaves(state)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(leaves):
        if _supported(x):
            groups.setdefault(_device_group(x), []).append(i)
    handles = []
    for indices in groups.values():
        group = [leaves[i] for i in indices]
        handles.append((indices, _fingerprint_fn(_replicated_on(group))(group)))
    return handles


def finish_fingerprints(handles: list[tuple[list[int], jax.Array]], n_leaves: int) -> list:
    """Blocks on the handles; returns one int (or None where unsupported) per state leaf."""
    out: list[int | None] = [None] * n_leaves
    for indices, values in handles:
        # Replicated, so the first local shard holds everything (also on a multi-host mesh).
        host = np.asarray(values.addressable_data(0))
        for i, v in zip(indices, host.tolist()):
            out[i] = int(v)
    return out


def fingerprints(state: Any) -> list:
    return finish_fingerprints(start_fingerprints(state), len(jax.tree.leaves(state)))


# ----------------------------------------------------------------------------- manifest


def leaf_table(state: Any) -> list[list]:
    """[path, shape, dtype] per leaf: what a restore target must match."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [[jax.tree_util.keystr(p), list(x.shape), str(x.dtype)] for p, x in flat]


def _walk(root: epath.Path) -> dict[str, int]:
    sizes = {}
    for dirpath, _, filenames in root.walk():
        for name in filenames:
            path = epath.Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel not in _UNLISTED:
                sizes[rel] = path.stat().length
    return sizes


def _crc32(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(
    step_dir: epath.Path, step: int, leaves: list[list], prints: list, checksums: bool
) -> None:
    """Lists every file orbax wrote (and optionally its CRC32) plus the leaf table.

    Called on the primary host from orbax's post-finalisation hook, i.e. after every host's writes
    are durable and before the tmp directory is renamed: the manifest is part of the atomic commit.
    """
    sizes = _walk(step_dir)
    doc = {
        "format": FORMAT,
        "step": step,
        "files": sizes,
        "crc32": {rel: _crc32(step_dir / rel) for rel in sizes} if checksums else None,
        "leaves": [row + [fp] for row, fp in zip(leaves, prints)],
    }
    (step_dir / MANIFEST).write_text(json.dumps(doc, indent=1))


def read_manifest(step_dir: epath.Path) -> dict:
    doc = json.loads((step_dir / MANIFEST).read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a format-{FORMAT} manifest")
    return doc


# ----------------------------------------------------------------------------- checks


def _size_or_none(path: epath.Path) -> int | None:
    try:
        return path.stat().length
    except FileNotFoundError:
        return None


def check_structure(step_dir: epath.Path, step: int) -> str | None:
    """Returns why the step is unusable, or None. Stats files and parses small JSON only."""
    if not step_dir.is_dir():
        return "step directory is missing"
    if not (step_dir / _COMMIT_MARKER).exists():
        return f"not finalised ({_COMMIT_MARKER} missing: the save was interrupted)"
    try:
        doc = read_manifest(step_dir)
    except FileNotFoundError:
        return f"{MANIFEST} missing (written at commit; a finalised step always has one)"
    except (ValueError, UnicodeDecodeError) as e:
        return f"{MANIFEST} unreadable: {e}"
    if doc.get("step") != step:
        return f"{MANIFEST} is for step {doc.get('step')}"
    # Stats in parallel: one round trip each on a network filesystem, and this runs in save().
    with concurrent.futures.ThreadPoolExecutor(_STAT_THREADS) as pool:
        sizes = pool.map(_size_or_none, [step_dir / rel for rel in doc["files"]])
        for (rel, size), actual in zip(doc["files"].items(), sizes):
            if actual is None:
                return f"file {rel} missing"
            if actual != size:
                return f"file {rel} has {actual} bytes, {size} written (truncated or overwritten)"
    json_files = [
        *_JSON_FILES,
        *(r for r in doc["files"] if r.startswith("data/") and r.endswith(".json")),
    ]
    for rel in json_files:
        try:
            json.loads((step_dir / rel).read_text())
        except FileNotFoundError:
            return f"file {rel} missing"
        except (ValueError, UnicodeDecodeError) as e:
            return f"file {rel} is not valid JSON ({e})"
    return None


def check_checksums(step_dir: epath.Path, manifest: Mapping) -> str | None:
    """CRC32 of every file, where the manifest recorded them; reads the whole step."""
    for rel, crc in (manifest.get("crc32") or {}).items():
        if _crc32(step_dir / rel) != crc:
            return f"file {rel} fails its CRC32 (content changed after the save)"
    return None


def check_target(manifest: Mapping, abstract_state: Any, step: int) -> None:
    """Raises ValueError if the restore target does not have the saved leaves.

    A mismatch is the caller's error (a changed model or optimizer), not a corrupt checkpoint, so
    it must not trigger the fallback that quarantines newer steps.
    """
    saved = {row[0]: (tuple(row[1]), row[2]) for row in manifest["leaves"]}
    wanted = {row[0]: (tuple(row[1]), row[2]) for row in leaf_table(abstract_state)}
    if saved == wanted:
        return
    missing = sorted(set(saved) - set(wanted))[:5]
    extra = sorted(set(wanted) - set(saved))[:5]
    differ = [
        f"{k}: saved {saved[k]} vs target {wanted[k]}"
        for k in sorted(set(saved) & set(wanted))
        if saved[k] != wanted[k]
    ][:5]
    raise ValueError(
        f"restore target does not match checkpoint step {step}: "
        f"not in target {missing}, not in checkpoint {extra}, differing {differ}"
    )


def check_fingerprints(manifest: Mapping, restored_state: Any) -> str | None:
    expected = {row[0]: row[3] for row in manifest["leaves"]}
    paths = [row[0] for row in leaf_table(restored_state)]
    for path, got in zip(paths, fingerprints(restored_state)):
        want = expected.get(path)
        if want is not None and got is not None and want != got:
            return f"leaf {path} restored with different contents (fingerprint {got} != {want})"
    return None
