"""The parallel plan: the mesh and the rules, and what follows from them alone.

    plan = plan_lib.make_plan(exp.parallel, exp.model, exp.train.global_batch_size)
    plan.batch_sharding()             # [B, S] batch arrays: rows over the batch axes
    plan.experts()                    # the model's routed-expert function on this mesh
    jax.jit(plan.wrap(fn))            # fn traced with activation constraints on this mesh
    plan.global_batch(local_batch, G) # this process's numpy rows -> a global sharded Batch

`make_plan` checks everything that can be checked before a compile (validate.py) and fails with
the numbers involved. The train state's shardings and the jitted steps are built from a plan by
train/sharded.py; this package never imports train/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import batch as batch_lib
from deepseek_jax.model import config as model_config
from deepseek_jax.model import constraints, dispatch
from deepseek_jax.parallel import config as config_lib
from deepseek_jax.parallel import expert as expert_lib
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel import sharding as sharding_lib
from deepseek_jax.parallel import validate


@dataclasses.dataclass(frozen=True)
class Plan:
    cfg: config_lib.ParallelConfig
    mesh: Any  # jax.sharding.Mesh, or an AbstractMesh for device-free sharding arithmetic
    rules: sharding_lib.Rules

    @property
    def sizes(self) -> dict[str, int]:
        return mesh_lib.sizes_of(self.mesh)

    # -- shardings --------------------------------------------------------------------------------
    def batch_spec(self) -> P:
        axes = tuple(a for a in self.rules.act_batch if self.sizes[a] > 1)
        return P(axes or None, None)

    def batch_sharding(self) -> NamedSharding:
        """[B, S] arrays: rows split over the batch axes (data, fsdp, expert)."""
        return NamedSharding(self.mesh, self.batch_spec())

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    # -- what the model is given on this mesh -----------------------------------------------------
    def experts(self) -> dispatch.ExpertFn:
        """The routed-expert function: shard_map + all-to-all over the expert axes."""
        return expert_lib.make_expert_fn(self.mesh, self.rules, self.cfg.expert_exchange)

    @contextlib.contextmanager
    def constraints(self) -> Iterator[None]:
        """Activation constraints on this mesh, for whatever is traced inside."""
        with constraints.activation_constraint(sharding_lib.constraint_fn(self.mesh, self.rules)):
            yield

    def wrap(self, fn: Callable) -> Callable:
        """fn with the activation constraints installed while it is traced: the context is entered
        inside the traced function, so every trace jit makes of it sees the constraints."""

        @functools.wraps(fn)
        def wrapped(*args):
            with self.constraints():
                return fn(*args)

        return wrapped

    # -- data -------------------------------------------------------------------------------------
    def data_shard(self, global_batch_size: int) -> tuple[int, int]:
        """(index, count): this process loads rows index*G/count .. (index+1)*G/count - 1.

        Those are the rows its devices hold under the batch sharding; with `jax.make_mesh`'s
        process-major device order that is process_index of process_count when the batch axes
        span the processes, and (0, 1) when processes are replicas of each other (e.g. a tensor
        axis that spans hosts). A layout where a process's rows are not one aligned block fails.
        """
        index_map = self.batch_sharding().devices_indices_map((global_batch_size, 1))
        rows = set()
        for device in self.mesh.local_devices:
            sl = index_map[device][0]
            rows.update(range(*sl.indices(global_batch_size)))
        lo, hi = min(rows), max(rows) + 1
        n = hi - lo
        if len(rows) != n or lo % n or global_batch_size % n:
            raise ValueError(
                f"process {jax.process_index()}: its devices hold batch rows {sorted(rows)} of "
                f"{global_batch_size}, not one aligned block; reorder the mesh so the batch axes "
                f"{mesh_lib.BATCH_AXES} are outermost across processes"
            )
        return lo // n, global_batch_size // n

    def global_batch(
        self, local: batch_lib.Batch | Mapping[str, np.ndarray], global_batch_size: int
    ) -> batch_lib.Batch:
        """This process's rows (numpy; the data pipeline's records by field name, or a Batch)
        -> a Batch of global sharded arrays, every field of it."""
        if not isinstance(local, batch_lib.Batch):
            local = batch_lib.Batch.from_dict(local)
        sharding = self.batch_sharding()
        return jax.tree.map(
            lambda v: jax.make_array_from_process_local_data(
                sharding, np.asarray(v), (global_batch_size,) + np.shape(v)[1:]
            ),
            local,
        )


def make_plan(
    cfg: config_lib.ParallelConfig,
    model_cfg: model_config.ModelConfig,
    global_batch_size: int,
    devices: Sequence[jax.Device] | None = None,
) -> Plan:
    """Validates (before any compile) and builds the mesh over `devices` (default: all)."""
    n = len(jax.devices() if devices is None else devices)
    sizes = mesh_lib.axis_sizes(cfg, n)
    rules = sharding_lib.rules_for(cfg.preset)
    validate.check(cfg, rules, sizes, model_cfg, global_batch_size)
    return Plan(cfg, mesh_lib.make_mesh(cfg, devices), rules)


def make_abstract_plan(
    cfg: config_lib.ParallelConfig,
    model_cfg: model_config.ModelConfig,
    global_batch_size: int,
    n_devices: int,
) -> Plan:
    """The same plan over an AbstractMesh: shardings and memory without the devices."""
    sizes = mesh_lib.axis_sizes(cfg, n_devices)
    rules = sharding_lib.rules_for(cfg.preset)
    validate.check(cfg, rules, sizes, model_cfg, global_batch_size)
    return Plan(cfg, mesh_lib.abstract_mesh(cfg, n_devices), rules)
