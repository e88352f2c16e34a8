"""The model cut into pipeline stages, and the three pieces of a stage the executor differentiates.

Partitioning (every stage has the same parameter shapes, so the stages stack into one array that is
sharded on the `pipe` mesh axis and picked per tick by a traced index):
  - the MoE layers are split evenly: stage s runs MoE layers [s*Ls, (s+1)*Ls), Ls = n_moe / S;
  - the first stage also runs the *prologue*: embedding and all dense layers
    (first_k_dense_replace);
  - the last stage also runs the *epilogue*: final norm, head, loss and the MTP modules.
Embedding, dense layers, final norm, head and MTP ("globals") are replicated on every pipeline rank;
their gradients are summed over `pipe` once after the tick loop. In DualPipe ranks 0 and PP-1 hold
both ends, which is where MTP really shares embedding and head; the SPMD program cannot give the
other ranks smaller arrays, so they hold an unused copy (docs/pipeline_execution.md).

The role of a (rank, chunk) is data (a table row), so one branch per op kind serves every role:
prologue and epilogue run under lax.cond and the MoE body is traced once per op kind.

The pieces are the model's own (`Transformer.prologue`, `run_stack`, `epilogue`, the slices of
`Transformer.__call__`), and the loss is the experiment's objective (`model.losses.objective` by
default) evaluated per micro-batch with the whole batch's denominators (`losses.Norms`): the
per-micro-batch values add up to the unpipelined objective up to summation order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import dispatch, losses
from deepseek_jax.parallel import mesh as mesh_lib

STACK = "moe_layers"  # the canonical params/expert_bias key that is cut into stages


def prologue_keys(cfg: config_lib.ModelConfig) -> tuple[str, ...]:
    return ("embed",) + (("dense_layers",) if cfg.n_dense_layers else ())


def epilogue_keys(cfg: config_lib.ModelConfig) -> tuple[str, ...]:
    uses_embed = cfg.tie_embeddings or cfg.mtp_depth > 0  # tied head, or MTP's embedding
    return (
        (("embed",) if uses_embed else ())
        + ("norm",)
        + (() if cfg.tie_embeddings else ("head",))
        + (("mtp",) if cfg.mtp_depth else ())
    )


# -- parameter layouts -------------------------------------------------------------------------


def split(tree: dict) -> tuple[Any, dict]:
    """(stack part [n_moe, ...], everything else) of canonical params or expert biases."""
    return tree[STACK], {k: v for k, v in tree.items() if k != STACK}


def join(stack: Any, rest: dict) -> dict:
    return {**rest, STACK: stack}


def stack_over_pipe(specs: dict) -> dict:
    """PartitionSpecs of canonical params (or biases) with the MoE stack's leading layer axis
    split over `pipe`: rank r stores layers [r*n_moe/PP, (r+1)*n_moe/PP) and their optimizer
    state, which for DualPipe/1F1B/GPipe is its own (direction-0) stage."""

    def one(spec: P) -> P:
        first = spec[0] if len(spec) else None
        rest = () if first is None else (first,) if isinstance(first, str) else tuple(first)
        return P((mesh_lib.PIPE, *rest) if rest else mesh_lib.PIPE, *spec[1:])

    return {**specs, STACK: jax.tree.map(one, specs[STACK], is_leaf=lambda x: isinstance(x, P))}


def to_pipeline(stack: Any, placement: jax.Array, num_stages: int) -> Any:
    """[n_moe, ...] -> [P, K, Ls, ...]: rank r's chunk c holds stage placement[r, c].

    Placement entries >= num_stages mark unused chunks (a one-chunk schedule run by a two-chunk
    executor); they get an arbitrary stage's weights, which the executor never reads.
    """

    def one(a):
        staged = a.reshape(num_stages, a.shape[0] // num_stages, *a.shape[1:])
        return jnp.take(staged, placement, axis=0, mode="clip")

    return jax.tree.map(one, stack)


def from_pipeline(pipe: Any, placement: jax.Array, num_stages: int) -> Any:
    """[P, K, Ls, ...] -> [n_moe, ...], summing every copy of a stage (DualPipe's two copies)."""

    def one(a):
        P, K, Ls = a.shape[:3]
        out = jnp.zeros((num_stages, *a.shape[2:]), a.dtype)
        out = out.at[placement.reshape(-1)].add(a.reshape(P * K, *a.shape[2:]), mode="drop")
        return out.reshape(num_stages * Ls, *a.shape[3:])

    return jax.tree.map(one, pipe)


# -- the pieces of a stage ----------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EpilogueAux:
    """What the epilogue reports besides its loss (zeros where the chunk is not a last stage)."""

    metrics: losses.Metrics  # the objective's metrics for this micro-batch (additive)
    mtp_load: jax.Array  # [J, E] tokens per expert in the MTP MoE blocks
    mtp_balance: jax.Array  # [J] their sequence-balance statistic / M


@dataclasses.dataclass(frozen=True)
class Stage:
    """Static description of a stage; the methods are pure functions of arrays.

    glob: the replicated global params; the `diff` argument of prologue/epilogue holds the groups
    being differentiated (prologue_keys/epilogue_keys) and overrides the same keys of glob.
    env["norms"] and env["weights"] are the step's `losses.Norms` (whole batch) and `Weights`.
    """

    graphdef: Any
    cfg: config_lib.ModelConfig
    microbatches: int
    experts: dispatch.ExpertFn = dispatch.dropless_experts
    objective: losses.Objective = losses.objective

    @property
    def acc_dtype(self):
        return jnp.promote_types(self.cfg.compute_dtype.jnp, jnp.float32)

    def _model(self, glob, bias_glob, chunk, bias_chunk):
        return nnx.merge(self.graphdef, join(chunk, glob), join(bias_chunk, bias_glob))

    # The layers of a stage run unrolled (`unroll=True`). A scanned stack is one opaque while loop
    # per op, so in an F&B branch the two chunks' layers could never interleave
    # (bench/pipeline_overlap.py); unrolled, the branch is one computation that XLA's scheduler can
    # interleave, e.g. one chunk's expert all-to-all with the other's compute. A stage holds few
    # layers (V3 on 16 stages: ~4), so the program grows little.

    def prologue(self, diff: dict, env: dict, ids) -> jax.Array:
        model = self._model({**env["glob"], **diff}, env["glob_bias"], env["stack0"], env["bias0"])
        cos, sin = model.rope_tables(*ids.shape)
        return model.prologue(ids, cos, sin, self.experts, unroll=True)

    def body(self, chunk, x, bias_chunk, env: dict):
        """The stage's MoE layers: ((h, alpha * balance share), (load [Ls, E], balance / M))."""
        model = self._model(env["glob"], env["glob_bias"], chunk, bias_chunk)
        cos, sin = model.rope_tables(*x.shape[:2])
        h, stats = model.run_stack(model.moe_layers, x, cos, sin, self.experts, unroll=True)
        weights = env["weights"]
        loss = weights.balance_alpha * losses.balance_term(stats, env["norms"])
        return (h, loss.astype(self.acc_dtype)), (stats.load_E, stats.balance / self.microbatches)

    def epilogue(self, diff: dict, h, mb, env: dict):
        """Final norm, head, MTP and the objective on this micro-batch: (loss, EpilogueAux)."""
        model = self._model({**env["glob"], **diff}, env["glob_bias"], env["stack0"], env["bias0"])
        cos, sin = model.rope_tables(*mb.inputs.shape)
        out = model.epilogue(
            h, mb.inputs, cos, sin, self.experts, logits=model.cfg.loss_chunk_tokens == 0
        )
        loss, metrics = self.objective(out, mb, env["norms"], env["weights"])
        aux = self.zero_aux()
        aux.metrics = metrics
        if out.mtp_stats is not None:
            aux.mtp_load = out.mtp_stats.load_E
            aux.mtp_balance = out.mtp_stats.balance / self.microbatches
        return loss.astype(self.acc_dtype), aux

    def zero_aux(self, metrics: losses.Metrics | None = None) -> EpilogueAux:
        """Zero accumulators; `metrics`: arrays (or shapes) shaped like the objective's metrics."""
        J, E, dt = self.cfg.mtp_depth, self.cfg.n_routed_experts, self.acc_dtype
        zeros = (
            {} if metrics is None else jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)
        )
        return EpilogueAux(zeros, jnp.zeros((J, E), jnp.float32), jnp.zeros((J,), dt))

    def metric_shapes(self, h, mb, env: dict) -> losses.Metrics:
        """The objective's metrics as ShapeDtypeStructs (the executor sizes its accumulators)."""
        return jax.eval_shape(lambda: self.epilogue({}, h, mb, env)[1].metrics)
