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
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax import batch as batch_lib
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import dispatch, losses
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel import sharding as sharding_lib

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


def layer_counts(n_moe: int, num_stages: int) -> tuple[int, ...]:
    """Real MoE layers per stage. Every stage has Ls = ceil(n_moe / S) layer slots; the
    S * Ls - n_moe padding slots go to the ends, where the embedding and dense layers (first
    stage) and the head, loss and MTP (last stage) already sit: the pair (last, first) takes
    them first, split evenly (the last stage the odd one), each keeping at least one real layer,
    then the pair (S-2, 1), and so on inward. V3 (58 MoE layers on 16 stages, Ls = 4): 1 MoE
    layer (+ 3 dense) on stage 0, 1 (+ head, MTP) on stage 15, 4 on every other stage."""
    S = num_stages
    Ls = -(-n_moe // S)
    if n_moe < S:
        raise ValueError(f"{n_moe} MoE layers cannot fill {S} stages (at least one per stage)")
    counts, pad = [Ls] * S, S * Ls - n_moe
    for i in range(S // 2 + S % 2):
        pair = (S - 1 - i, i) if S - 1 - i != i else (i,)
        while pad and any(counts[s] > 1 for s in pair):
            for s in pair:  # one slot at a time, the later stage first
                if pad and counts[s] > 1:
                    counts[s], pad = counts[s] - 1, pad - 1
    return tuple(counts)


def slots(n_moe: int, num_stages: int) -> np.ndarray:
    """[S + 1, Ls] canonical layer index of each stage's layer slots; n_moe marks a padding slot
    (real layers first in each stage), and row S (an unused chunk) is all padding."""
    counts = layer_counts(n_moe, num_stages)
    Ls = max(counts)
    out = np.full((num_stages + 1, Ls), n_moe, np.int32)
    start = 0
    for s, n in enumerate(counts):
        out[s, :n] = np.arange(start, start + n)
        start += n
    return out


def active(placement, n_moe: int, num_stages: int) -> np.ndarray:
    """[P, K, Ls] int32: 1 where rank r's chunk c holds a real layer in slot l, 0 for padding."""
    index = slots(n_moe, num_stages)[np.minimum(np.asarray(placement), num_stages)]
    return (index < n_moe).astype(np.int32)


def stack_over_pipe(specs: dict, abstract: dict, sizes, what: str = "params") -> dict:
    """PartitionSpecs of canonical params (or biases) with the MoE stack split over `pipe`.

    When PP divides the layer count, on the leading layer axis: rank r stores layers
    [r*n_moe/PP, (r+1)*n_moe/PP) and their optimizer state, which for DualPipe/1F1B/GPipe is its
    own (direction-0) stage. When it does not (uneven stages, `layer_counts`), every layer is
    split over `pipe` on another dimension (sharding.add_axis: the first one PP divides), so each
    rank still stores 1/PP of the stack; the step's gather into the pipelined layout then moves
    every stage's layers to its rank (as it already moves DualPipe's second copy). No dimension
    divisible by PP is a bad layout: ValueError naming the array."""
    n = sizes[mesh_lib.PIPE]

    def one(path, spec: P, leaf) -> P:
        if leaf.shape[0] % n == 0:
            first = spec[0] if len(spec) else None
            rest = () if first is None else (first,) if isinstance(first, str) else tuple(first)
            return P((mesh_lib.PIPE, *rest) if rest else mesh_lib.PIPE, *spec[1:])
        out = sharding_lib.add_axis(spec, leaf.shape, mesh_lib.PIPE, sizes)
        if out is None:
            name = "/".join((what, STACK) + sharding_lib.path_keys(path))
            raise ValueError(
                f"parallel.pipe={n}: {name} of shape {tuple(leaf.shape)} (sharded {spec}): its "
                f"{leaf.shape[0]} layers do not split evenly over pipe={n} and no other "
                "dimension is divisible by it; pick a parallel.pipe that divides model.n_layers "
                "- first_k_dense_replace or one of the layer's dimensions"
            )
        return out

    stack = jax.tree_util.tree_map_with_path(
        one, specs[STACK], abstract[STACK], is_leaf=lambda x: isinstance(x, P)
    )
    return {**specs, STACK: stack}


def to_pipeline(stack: Any, placement: jax.Array, num_stages: int) -> Any:
    """[n_moe, ...] -> [P, K, Ls, ...]: rank r's chunk c holds stage placement[r, c].

    Placement entries >= num_stages mark unused chunks (a one-chunk schedule run by a two-chunk
    executor); they, and the padding slots of uneven stages (`slots`), get an arbitrary real
    layer's weights, which the executor never uses (`active` masks padding slots to the identity).
    """

    def one(a):
        index = slots(a.shape[0], num_stages)  # static: numpy
        staged = jnp.take(a, index.reshape(-1), axis=0, mode="clip")
        staged = staged.reshape(num_stages + 1, index.shape[1], *a.shape[1:])
        return jnp.take(staged, placement, axis=0, mode="clip")

    return jax.tree.map(one, stack)


def from_pipeline(
    pipe: Any, placement: jax.Array, num_stages: int, n_moe: int | None = None
) -> Any:
    """[P, K, Ls, ...] -> [n_moe, ...], summing every copy of a stage (DualPipe's two copies) and
    dropping padding slots and unused chunks. n_moe defaults to S * Ls (even stages)."""

    def one(a):
        P, K, Ls = a.shape[:3]
        n = num_stages * Ls if n_moe is None else n_moe
        index = jnp.asarray(slots(n, num_stages))[jnp.minimum(placement, num_stages)]
        out = jnp.zeros((n, *a.shape[3:]), a.dtype)
        return out.at[index.reshape(-1)].add(a.reshape(P * K * Ls, *a.shape[3:]), mode="drop")

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

    # Every stage function takes its micro-batch `mb`: packed samples (mb.segment_ids,
    # mb.positions) must reach each stage's attention and RoPE, not only the first stage's.

    def prologue(self, diff: dict, env: dict, mb: batch_lib.Batch) -> jax.Array:
        model = self._model({**env["glob"], **diff}, env["glob_bias"], env["stack0"], env["bias0"])
        cos, sin = model.rope_tables(*mb.inputs.shape, mb.positions)
        return model.prologue(
            mb.inputs, cos, sin, self.experts, unroll=True, segment_ids_BS=mb.segment_ids
        )

    def body(self, chunk, x, bias_chunk, env: dict, active_L, mb: batch_lib.Batch):
        """The stage's MoE layers: ((h, alpha * balance share), (load [Ls, E], balance / M)).
        active_L [Ls]: 0 marks a padding slot of an uneven stage (the identity, zero stats)."""
        model = self._model(env["glob"], env["glob_bias"], chunk, bias_chunk)
        cos, sin = model.rope_tables(*x.shape[:2], mb.positions)
        h, stats = model.run_stack(
            model.moe_layers,
            x,
            cos,
            sin,
            self.experts,
            unroll=True,
            active_L=active_L,
            segment_ids_BS=mb.segment_ids,
        )
        weights = env["weights"]
        loss = weights.balance_alpha * losses.balance_term(stats, env["norms"])
        return (h, loss.astype(self.acc_dtype)), (stats.load_E, stats.balance / self.microbatches)

    def epilogue(self, diff: dict, h, mb, env: dict):
        """Final norm, head, MTP and the objective on this micro-batch: (loss, EpilogueAux)."""
        model = self._model({**env["glob"], **diff}, env["glob_bias"], env["stack0"], env["bias0"])
        cos, sin = model.rope_tables(*mb.inputs.shape, mb.positions)
        out = model.epilogue(
            h,
            mb.inputs,
            cos,
            sin,
            self.experts,
            logits=model.cfg.loss_chunk_tokens == 0,
            segment_ids_BS=mb.segment_ids,
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
