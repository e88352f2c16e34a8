"""The parallel plan: one object that holds the mesh and the rules and hands out everything the loop
and the steps need -- state and batch shardings, the state created already sharded, the jitted
sharded train/eval steps with the model hooks installed, and global batches from per-host data.

    plan = plan_lib.make_plan(exp.parallel, exp.model, exp.train.global_batch_size)
    state = plan.init_state(exp.model, tx, seed)  # or ckpt.restore(None, plan.abstract_state(..))
    step = plan.jit_train_step(step_lib.make_train_step(graphdef, exp.train, tx), exp.model, tx)
    state, metrics = step(state, plan.global_batch(local_numpy_batch))

`make_plan` checks everything that can be checked before a compile (validate.py) and fails with
the numbers involved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.model import config as model_config
from deepseek_jax.model import hooks
from deepseek_jax.parallel import config as config_lib
from deepseek_jax.parallel import expert as expert_lib
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel import sharding as sharding_lib
from deepseek_jax.parallel import stages
from deepseek_jax.parallel import validate
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib


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

    def state_specs(self, model_cfg: model_config.ModelConfig,
                    abstract: state_lib.TrainState) -> state_lib.TrainState:
        logical_params, logical_bias = state_lib.logical_axes(model_cfg)
        sizes = self.sizes
        params = sharding_lib.tree_specs(self.rules, logical_params, abstract.params, sizes,
                                         "params")
        bias = sharding_lib.tree_specs(self.rules, logical_bias, abstract.expert_bias, sizes,
                                       "expert_bias")
        if self.cfg.pipeline is not config_lib.Pipeline.NONE:  # each rank keeps its stages' layers
            params, bias = stages.stack_on_stage(params), stages.stack_on_stage(bias)
        opt = sharding_lib.mirror_specs(params, abstract.params, abstract.opt_state)
        return state_lib.TrainState(step=P(), params=params, expert_bias=bias, opt_state=opt)

    def state_shardings(self, model_cfg: model_config.ModelConfig,
                        tx: optax.GradientTransformation) -> state_lib.TrainState:
        return _state_shardings(self, model_cfg, tx)

    def abstract_state(self, model_cfg: model_config.ModelConfig,
                       tx: optax.GradientTransformation) -> state_lib.TrainState:
        """ShapeDtypeStructs carrying this plan's shardings (checkpoint restore targets)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            _abstract_state(model_cfg, tx), self.state_shardings(model_cfg, tx))

    # -- state and steps --------------------------------------------------------------------------
    def init_state(self, model_cfg: model_config.ModelConfig, tx: optax.GradientTransformation,
                   seed: int) -> state_lib.TrainState:
        """A jitted init whose outputs are born sharded: no device ever holds the whole model."""
        return state_lib.init_state(model_cfg, tx, seed,
                                    out_shardings=self.state_shardings(model_cfg, tx))

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """Activation constraints and the expert-parallel MoE, for whatever is traced inside."""
        constrain = sharding_lib.constraint_fn(self.mesh, self.rules)
        experts = expert_lib.make_expert_fn(self.mesh, self.rules, self.cfg.expert_exchange)
        with hooks.activation_constraint(constrain), hooks.expert_implementation(experts):
            yield

    def wrap(self, fn: Callable) -> Callable:
        """fn with the hooks installed while it is traced (contextvars are read at trace time)."""

        @functools.wraps(fn)
        def wrapped(*args):
            with self.hooks():
                return fn(*args)

        return wrapped

    def jit_train_step(self, train_step: Callable, model_cfg: model_config.ModelConfig,
                       tx: optax.GradientTransformation) -> Callable:
        """(state, batch) -> (state, metrics): one jit, explicit in/out shardings, state donated;
        metrics come back replicated so every process can read them."""
        return step_lib.jit_train_step(self.wrap(train_step), self.state_shardings(model_cfg, tx),
                                       self.batch_sharding(), self.replicated())

    def jit_eval_step(self, eval_step: Callable, model_cfg: model_config.ModelConfig,
                      tx: optax.GradientTransformation) -> Callable:
        s = self.state_shardings(model_cfg, tx)
        return jax.jit(self.wrap(eval_step),
                       in_shardings=(s.params, s.expert_bias, self.batch_sharding()),
                       out_shardings=self.replicated())

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
                f"{mesh_lib.BATCH_AXES} are outermost across processes")
        return lo // n, global_batch_size // n

    def global_batch(self, local: Mapping[str, np.ndarray], global_batch_size: int
                     ) -> dict[str, jax.Array]:
        """This process's rows (numpy, from the data pipeline) -> global sharded arrays."""
        sharding = self.batch_sharding()
        return {k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (global_batch_size,) + np.shape(v)[1:])
            for k, v in local.items()}


# Both trace the model init (seconds for a large model); the loop asks several times.
@functools.lru_cache(maxsize=8)
def _abstract_state(model_cfg, tx) -> state_lib.TrainState:
    return state_lib.abstract_state(model_cfg, tx)


@functools.lru_cache(maxsize=8)
def _state_shardings(plan: Plan, model_cfg, tx) -> state_lib.TrainState:
    specs = plan.state_specs(model_cfg, _abstract_state(model_cfg, tx))
    return sharding_lib.named(plan.mesh, specs)


def make_plan(cfg: config_lib.ParallelConfig, model_cfg: model_config.ModelConfig,
              global_batch_size: int, devices: Sequence[jax.Device] | None = None) -> Plan:
    """Validates (before any compile) and builds the mesh over `devices` (default: all)."""
    n = len(jax.devices() if devices is None else devices)
    sizes = mesh_lib.axis_sizes(cfg, n)
    rules = sharding_lib.rules_for(cfg.preset)
    validate.check(cfg, rules, sizes, model_cfg, global_batch_size)
    return Plan(cfg, mesh_lib.make_mesh(cfg, devices), rules)


def make_abstract_plan(cfg: config_lib.ParallelConfig, model_cfg: model_config.ModelConfig,
                       global_batch_size: int, n_devices: int) -> Plan:
    """The same plan over an AbstractMesh: shardings and memory without the devices."""
    sizes = mesh_lib.axis_sizes(cfg, n_devices)
    rules = sharding_lib.rules_for(cfg.preset)
    validate.check(cfg, rules, sizes, model_cfg, global_batch_size)
    return Plan(cfg, mesh_lib.abstract_mesh(cfg, n_devices), rules)
