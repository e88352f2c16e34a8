"""Resumable checkpoints: train state, data-iterator state, config and run metadata under
`<workdir>/checkpoints/<step>/`, saved asynchronously with orbax, restored onto the current mesh,
verified before use (docs/checkpoints.md).

Generic over the train state: any pytree of jax.Arrays (typed PRNG keys included). The loop owns
when to save; this module owns how, what survives retention, and which step is safe to resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from orbax.checkpoint._src.metadata import array_metadata_store

from deepseek_jax import errors
from deepseek_jax.train import checkpoint_integrity as integrity

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config", "meta")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
QUARANTINE = "quarantine"


class CheckpointError(errors.UserError, RuntimeError):
    """A requested checkpoint is unusable, or no usable checkpoint is left."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any  # the pytree, laid out as the abstract target asked
    data: dict | None  # this process's data-iterator state; None if saved by another process count
    config: dict
    meta: dict


# ----------------------------------------------------------------------------- data item


@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Mapping


@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    pass


class _PerProcessJsonHandler(ocp.CheckpointHandler):
    """Each process's iterator state in its own file: orbax's JsonSave writes the primary's only,
    but every host reads a different shard of the data."""

    @staticmethod
    def _name() -> str:
        return f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: _DataSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self._name()).write_text(json.dumps(dict(args.item)))

    def restore(self, directory: epath.Path, args: _DataRestore | None = None) -> dict | None:
        path = directory / self._name()
        if not path.exists():
            saved = sorted(p.name for p in directory.iterdir())
            log.warning(
                "data-iterator state in %s was saved as %s, not %s (different process "
                "count): the loop gets data=None",
                directory,
                saved,
                self._name(),
            )
            return None
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def close(self) -> None:
        pass


ocp.args.register_with_handler(_PerProcessJsonHandler, for_save=True)(_DataSave)
ocp.args.register_with_handler(_PerProcessJsonHandler, for_restore=True)(_DataRestore)


# ----------------------------------------------------------------------------- retention


@dataclasses.dataclass
class _KeepNewestGood:
    """Keep the last `keep_last`, every `keep_every`-th, and the newest step that verifies.

    The last rule is why a corrupt newer step can never make retention delete the only good one.
    Orbax deletes on the primary host only, so other hosts skip the (file I/O) verification.
    """

    keep_last: int
    keep_every: int | None
    owner: Checkpointer

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        steps = [c.step for c in checkpoints]
        keep = [
            i >= len(steps) - self.keep_last
            or (self.keep_every is not None and s % self.keep_every == 0)
            for i, s in enumerate(steps)
        ]
        if jax.process_index() == self.owner.primary_host:
            for i in reversed(range(len(steps))):
                if steps[i] == self.owner._inflight_step:
                    continue  # being written now; not good until it is committed
                reason = self.owner.verify(steps[i])
                if reason is None:
                    keep[i] = True
                    break
                log.warning(
                    "checkpoint step %d fails verification (%s); retention keeps an older good one",
                    steps[i],
                    reason,
                )
        return keep


# ----------------------------------------------------------------------------- multi-host


def _all_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array([int(ok)], np.int32))))


def _from_primary(value: int, primary: int) -> int:
    if jax.process_count() == 1:
        return value
    out = multihost_utils.broadcast_one_to_all(
        np.array(value, np.int64), is_source=jax.process_index() == primary
    )
    return int(out)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- the checkpointer


def _json_item(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    try:  # fail here, naming the item, rather than in orbax's background thread
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint item {name!r} is not JSON-serialisable: {e}") from e


def _mesh_shape(state: Any) -> dict | None:
    for x in jax.tree.leaves(state):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return {str(k): int(v) for k, v in sharding.mesh.shape.items()}
    return None


def abstract_state(state: Any) -> Any:
    """The restore target for a state laid out like `state` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


@dataclasses.dataclass
class _Inflight:
    step: int
    leaves: list
    handles: list


_registered_one_replica: list = []  # registered once per process: orbax logs each override


def _single_process_writes_one_replica() -> None:
    """With one process, each distinct shard is written from one replica (orbax's ArrayHandler
    with `use_replica_parallel=False`, registered for jax.Array in orbax's global registry).

    Orbax's default on CPU and TPU splits a replicated shard among its replicas so that several
    hosts share the writing. One process has nobody to share it with, and the split costs a
    sliced copy per device, each a program compiled the first time a shape is seen: 16-19 s of
    the first save of configs/tiny.py replicated on 8 CPU devices (docs/checkpoints.md, Measured
    cost). Orbax itself turns it off on GPU. Multi-process runs keep orbax's default; restore is
    unaffected.
    """
    if jax.process_count() == 1 and not _registered_one_replica:
        handler = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False,
            # As orbax's default handler: the per-array metadata that brings typed PRNG keys
            # back as keys (without it a key<fry> restores as its uint32 data).
            array_metadata_store=array_metadata_store.Store(),
        )
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        _registered_one_replica.append(True)


def _absolute(workdir: str | epath.PathLike) -> epath.Path:
    """Orbax refuses relative local paths (at the first save, after the run has trained):
    anchor them at the current directory here. URIs (gs://...) are absolute already."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
    """Saves and restores `<workdir>/checkpoints/<step>/{state,data,config,meta}`.

    Every process calls every method (orbax coordinates; JSON items and deletions are written by
    `primary_host` only). Not thread-safe: call from the training loop's thread.
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        *,
        keep_last: int = 3,
        keep_every: int | None = None,
        file_checksums: bool = False,
        primary_host: int = 0,
        timeout_s: int = 1200,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be None or >= 1, got {keep_every}")
        self.directory = _absolute(workdir) / "checkpoints"
        self.primary_host = primary_host
        self.file_checksums = file_checksums
        self._inflight_step: int | None = None
        self._inflight: _Inflight | None = None
        self._ours: set[int] = set()  # steps this run saved or restored: same timeline
        is_primary = jax.process_index() == primary_host
        if is_primary:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Orbax removes these on start-up (cleanup_tmp_directories); say so first.
            for path in self.directory.iterdir():
                if _TMP_SUFFIX in path.name:
                    log.warning(
                        "checkpoint step %s was interrupted while saving (%s left "
                        "behind); removing it",
                        path.name.split(".")[0],
                        path.name,
                    )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(
                timeout_secs=timeout_s, post_finalization_callback=self._on_commit
            ),
            preservation_policy=_KeepNewestGood(keep_last, keep_every, self),
            cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=primary_host),
        )
        _single_process_writes_one_replica()
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": _PerProcessJsonHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=handlers, options=options
        )

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        state: Any,
        *,
        data: Mapping | None = None,
        config: Any = None,
        meta: Mapping | None = None,
        wait: bool = False,
    ) -> bool:
        """Starts an asynchronous save of `step`; False if that step is already on disk.

        Blocks only for the previous save to finish (if still running) and the device-to-host copy;
        `state` may be donated or overwritten as soon as this returns. `wait=True` blocks until the
        step is committed (preemption, end of training).
        """
        step = int(step)
        self.wait_until_finished()
        if step in self._manager.all_steps():
            if step not in self._ours:
                raise CheckpointError(
                    f"checkpoint step {step} exists from another run (after restoring an older "
                    "step, call discard_after(step) before training on)"
                )
            log.info("checkpoint step %d already saved; not saving it again", step)
            return False
        data_doc, config_doc = _json_item("data", data), _json_item("config", config)
        meta_doc = {
            "step": step,
            "time": time.time(),
            "jax_version": jax.__version__,
            "orbax_version": ocp.__version__,
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "mesh": _mesh_shape(state),
            **_json_item("meta", meta),
        }
        leaves = integrity.leaf_table(state)
        # Dispatched before orbax's copy so it reads the same buffers; fetched in the background.
        self._inflight = _Inflight(step, leaves, integrity.start_fingerprints(state))
        self._inflight_step = step
        self._ours.add(step)
        self._manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=_DataSave(data_doc),
                config=ocp.args.JsonSave(config_doc),
                meta=ocp.args.JsonSave(meta_doc),
            ),
        )
        if wait:
            self.wait_until_finished()
        return True

    def _on_commit(self) -> None:
        """Orbax's post-finalisation hook: primary host, background thread, after every host's
        writes and before the atomic rename. Writing the manifest here makes it part of the commit;
        raising here leaves the step uncommitted."""
        job = self._inflight
        assert job is not None, "orbax finalised a save this Checkpointer did not start"
        step_dir = self.directory / f"{job.step}{_TMP_SUFFIX}"
        if not step_dir.exists():  # commit-file atomicity (e.g. GCS): written in place
            step_dir = self.directory / str(job.step)
        prints = integrity.finish_fingerprints(job.handles, len(job.leaves))
        integrity.write_manifest(step_dir, job.step, job.leaves, prints, self.file_checksums)

    def wait_until_finished(self) -> None:
        """Blocks until the pending save is committed; re-raises its error if it failed."""
        try:
            self._manager.wait_until_finished()
        finally:
            self._inflight_step = None
            self._inflight = None

    # ------------------------------------------------------------------ inspect

    def all_steps(self) -> list[int]:
        """Committed steps orbax knows about (not verified), ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def verify(self, step: int) -> str | None:
        """Cheap structural check of one step (see checkpoint_integrity); None if it looks good."""
        return integrity.check_structure(self.directory / str(step), step)

    def _step_dirs(self) -> list[int]:
        """Every integer-named step directory, committed or not, newest first."""
        if not self.directory.exists():
            return []
        steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()]
        return sorted(steps, reverse=True)

    # ------------------------------------------------------------------ restore

    def restore(self, step: int | None, abstract_state: Any) -> Restored | None:
        """Restores `step` (or the newest good step) onto the shardings of `abstract_state`.

        `abstract_state`: the state's pytree with jax.ShapeDtypeStruct leaves carrying `.sharding`
        for the current mesh (any mesh: the saved layout does not matter). With `step=None`, a step
        that fails verification is logged as a warning with its reason, moved to
        `checkpoints/quarantine/`, and the next older one is tried; returns None if there are no
        checkpoints. An explicit `step` that fails raises CheckpointError; newer steps are left
        alone (see discard_after). A target whose leaves differ from the saved ones raises
        ValueError (never treated as corruption).
        """
        self.wait_until_finished()
        if step is not None:
            restored, reason = self._try_restore(int(step), abstract_state)
            if restored is None:
                raise CheckpointError(f"checkpoint step {step} in {self.directory}: {reason}")
            return restored
        candidates = self._step_dirs()
        if jax.process_count() > 1:  # the primary's listing for everyone: same loop, same barriers
            is_primary = jax.process_index() == self.primary_host
            n = _from_primary(len(candidates), self.primary_host)
            mine = np.array(candidates if is_primary else [0] * n, np.int64)
            candidates = (
                [int(s) for s in multihost_utils.broadcast_one_to_all(mine, is_source=is_primary)]
                if n
                else []
            )
        bad: list[tuple[int, str]] = []
        for i, candidate in enumerate(candidates):
            restored, reason = self._try_restore(candidate, abstract_state)
            if restored is not None:
                if bad:
                    self._quarantine([s for s, _ in bad])
                return restored
            if i + 1 < len(candidates):
                log.warning(
                    "checkpoint step %d in %s is unusable (%s); falling back to step %d",
                    candidate,
                    self.directory,
                    reason,
                    candidates[i + 1],
                )
            bad.append((candidate, reason))
        if not bad:
            return None
        # Nothing is moved: quarantining is only worth it when a good step replaces the bad ones.
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {r}" for s, r in bad)
            + ". Nothing was moved or deleted. To start this run from scratch, move "
            f"{self.directory} aside (or use a new --workdir); to start from the weights of "
            "another checkpoint, also set --config.checkpoint.init_from=<step dir>."
        )

    def _try_restore(self, step: int, abstract_state: Any) -> tuple[Restored | None, str]:
        step_dir = self.directory / str(step)
        reason = ""
        if jax.process_index() == self.primary_host:
            reason = self.verify(step) or ""
            if not reason and self.file_checksums:
                manifest = integrity.read_manifest(step_dir)
                reason = integrity.check_checksums(step_dir, manifest) or ""
        if not _from_primary(int(not reason), self.primary_host):
            return None, reason or "rejected by the primary host"
        manifest = integrity.read_manifest(step_dir)
        integrity.check_target(manifest, abstract_state, step)  # caller's error: propagates
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=_DataRestore(),
                    config=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            reason = integrity.check_fingerprints(manifest, out.state) or ""
        except Exception as e:  # noqa: BLE001 -- any read failure means this step is unusable
            out, reason = None, f"restore failed: {type(e).__name__}: {e}"
        if not _all_agree(not reason):
            return None, reason or "failed on another host"
        self._ours.add(step)
        return Restored(
            step=step, state=out.state, data=out.data, config=dict(out.config), meta=dict(out.meta)
        ), ""

    def discard_after(self, step: int) -> list[int]:
        """Moves every step newer than `step` to quarantine/ (e.g. to branch a run from an older
        checkpoint restored explicitly); returns them. Without this, those steps would shadow the
        new timeline's saves."""
        self.wait_until_finished()
        newer = [s for s in self._step_dirs() if s > step]
        if newer:
            self._quarantine(newer, why="superseded")
        return newer

    def _quarantine(self, steps: list[int], why: str = "unusable") -> None:
        """Moves steps aside (never deletes them): orbax would otherwise refuse to save those step
        numbers again, and a person may still want to look at them."""
        if jax.process_index() == self.primary_host:
            target = self.directory / QUARANTINE
            target.mkdir(exist_ok=True)
            for s in steps:
                dest = target / f"{s}-{why}-{int(time.time())}"
                (self.directory / str(s)).rename(dest)
                log.warning("moved %s checkpoint step %d to %s", why, s, dest)
        _sync("deepseek_jax_checkpoint_quarantine")
        self._manager.reload()

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
