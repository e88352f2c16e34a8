"""The model cut into pipeline stages, and the three pieces of a stage the executor differentiates.

Partitioning (every stage has the same parameter shapes, so the stages stack into one array that is
sharded on the `stage` mesh axis and picked per tick by a traced index):
  - the MoE layers are split evenly: stage s runs MoE layers [s*Ls, (s+1)*Ls), Ls = n_moe / S;
  - the first stage also runs the *prologue*: embedding and all dense layers
    (first_k_dense_replace);
  - the last stage also runs the *epilogue*: final norm, head, loss and the MTP modules.
Embedding, dense layers, final norm, head and MTP ("globals") are replicated on every pipeline rank;
their gradients are summed over `stage` once after the tick loop. In DualPipe ranks 0 and PP-1 hold
both ends, which is where MTP really shares embedding and head; the SPMD program cannot give the
other ranks smaller arrays, so they hold an unused copy (docs/pipeline_execution.md).

The role of a (rank, chunk) is data (a table row), so one branch per op kind serves every role:
prologue and epilogue run under lax.cond and the MoE body is traced once per op kind.

Loss normalisation: the pipelined loss is the sum over micro-batches of per-micro-batch terms whose
denominators are global (token counts of the whole batch; M for the per-sequence balance means), so
it equals `losses.objective` of the unpipelined model on the whole batch up to summation order.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax.model import block as block_lib
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import hooks
from deepseek_jax.model import stack
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.train import losses

STACK = "moe_layers"  # the canonical params/expert_bias key that is cut into stages


class Role(enum.IntEnum):
    """What a (rank, chunk) runs besides its MoE layers."""

    FIRST = 0  # the prologue before them; reads token ids, sends no gradient
    MID = 1
    LAST = 2  # the epilogue after them; sends no activation


def prologue_keys(cfg: config_lib.ModelConfig) -> tuple[str, ...]:
    return ("embed",) + (("dense_layers",) if cfg.n_dense_layers else ())


def epilogue_keys(cfg: config_lib.ModelConfig) -> tuple[str, ...]:
    uses_embed = cfg.tie_embeddings or cfg.mtp_depth > 0  # tied head, or MTP's embedding
    return ((("embed",) if uses_embed else ()) + ("norm",)
            + (() if cfg.tie_embeddings else ("head",)) + (("mtp",) if cfg.mtp_depth else ()))


# -- parameter layouts -------------------------------------------------------------------------


def split(tree: dict) -> tuple[Any, dict]:
    """(stack part [n_moe, ...], everything else) of canonical params or expert biases."""
    return tree[STACK], {k: v for k, v in tree.items() if k != STACK}


def join(stack: Any, rest: dict) -> dict:
    return {**rest, STACK: stack}


def stack_on_stage(specs: dict) -> dict:
    """PartitionSpecs of canonical params (or biases) with the MoE stack's leading layer axis
    split over `stage`: rank r stores layers [r*n_moe/PP, (r+1)*n_moe/PP) and their optimizer
    state, which for DualPipe/1F1B/GPipe is its own (direction-0) stage."""

    def one(spec: P) -> P:
        first = spec[0] if len(spec) else None
        rest = () if first is None else (first,) if isinstance(first, str) else tuple(first)
        return P((mesh_lib.STAGE, *rest) if rest else mesh_lib.STAGE, *spec[1:])

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


# -- global normalisers -------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Norms:
    """Whole-batch denominators, so that per-micro-batch terms sum to the unpipelined loss."""

    tokens: jax.Array  # max(sum of loss_mask, 1): the main CE's masked mean
    mtp_tokens: jax.Array  # [D]: the same per MTP depth (masks shifted left by k)
    mtp_lambda: jax.Array  # this step's MTP weight


def norms(batch: dict, depth: int, mtp_lambda: jax.Array, dtype: Any) -> Norms:
    mask = batch["loss_mask"].astype(dtype)
    _, m_DBS = losses.mtp_targets(batch["targets"], mask, depth)
    return Norms(jnp.maximum(mask.sum(), 1.0), jnp.maximum(m_DBS.sum(axis=(1, 2)), 1.0),
                 mtp_lambda)


# -- the pieces of a stage ----------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EpilogueAux:
    """The epilogue's metrics, already normalised (zeros where the chunk is not a last stage)."""

    lm: jax.Array  # main CE term of this micro-batch
    mtp: jax.Array  # [D] MTP CE terms per depth
    mtp_load: jax.Array  # [D, E] tokens per expert in the MTP MoE blocks
    mtp_balance: jax.Array  # [D] their sequence-balance statistic / M


@dataclasses.dataclass(frozen=True)
class Stage:
    """Static description of a stage; the methods are pure functions of arrays.

    glob: the replicated global params; the `diff` argument of prologue/epilogue holds the groups
    being differentiated (prologue_keys/epilogue_keys) and overrides the same keys of glob.
    """

    graphdef: Any
    cfg: config_lib.ModelConfig
    balance_alpha: float
    microbatches: int

    @property
    def acc_dtype(self):
        return jnp.promote_types(self.cfg.compute_dtype.jnp, jnp.float32)

    def _model(self, glob, bias_glob, chunk, bias_chunk):
        return nnx.merge(self.graphdef, join(chunk, glob), join(bias_chunk, bias_glob))

    def _layers(self, module, h, cos, sin):
        """Transformer.run_stack with the layer loop unrolled. A scanned stack is one opaque
        while loop per op, so in an F&B branch the two chunks' layers could never interleave
        (bench/pipeline_overlap.py); unrolled, the branch is one computation that XLA's scheduler
        can interleave, e.g. one chunk's expert all-to-all with the other's compute. A stage holds
        few layers (V3 on 16 stages: ~4), so the program grows little."""
        graphdef, state = nnx.split(module)

        def step(carry, layer_state):
            return nnx.merge(graphdef, layer_state)(carry, cos, sin)

        return jax.lax.scan(stack.remat(step, self.cfg.remat), h, state, unroll=True)

    def prologue(self, diff: dict, env: dict, ids) -> jax.Array:
        """Embedding and dense layers, in the order of Transformer.__call__."""
        model = self._model({**env["glob"], **diff}, env["glob_bias"], env["stack0"],
                            env["bias0"])
        cos, sin = model.rope_tables(*ids.shape)
        x = hooks.constrain(model.embed(ids), block_lib.ACT_BSD)
        if model.dense_layers is not None:
            x, _ = self._layers(model.dense_layers, x, cos, sin)
        return x

    def body(self, chunk, x, bias_chunk, env: dict):
        """The stage's MoE layers: ((h, alpha * balance / M), (load [Ls, E], balance / M))."""
        model = self._model(env["glob"], env["glob_bias"], chunk, bias_chunk)
        cos, sin = model.rope_tables(*x.shape[:2])
        h, stats = self._layers(model.moe_layers, x, cos, sin)
        balance = stats.balance / self.microbatches
        loss = (self.balance_alpha * jnp.sum(balance)).astype(self.acc_dtype)
        return (h, loss), (stats.load_E, balance)

    def epilogue(self, diff: dict, h, mb: dict, norms: Norms, env: dict):
        """Final norm, head, this micro-batch's loss terms and MTP: (loss, EpilogueAux)."""
        cfg = self.cfg
        model = self._model({**env["glob"], **diff}, env["glob_bias"], env["stack0"],
                            env["bias0"])
        ids = mb["inputs"]
        cos, sin = model.rope_tables(*ids.shape)
        h = model.norm(h)
        logits = model.logits(h)
        mask = mb["loss_mask"].astype(logits.dtype)
        lm = jnp.sum(losses.token_nll(logits, mb["targets"]) * mask) / norms.tokens
        aux = self.zero_aux()
        aux.lm, loss = lm, lm
        if model.mtp is not None:
            mtp_logits, mtp_stats = model.mtp(h, ids, model.embed, model.logits, cos, sin)
            t_DBS, m_DBS = losses.mtp_targets(mb["targets"], mask, cfg.mtp_depth)
            aux.mtp = jax.vmap(lambda lg, t, m: jnp.sum(losses.token_nll(lg, t) * m))(
                mtp_logits, t_DBS, m_DBS) / norms.mtp_tokens
            loss = loss + norms.mtp_lambda * jnp.mean(aux.mtp)
            if mtp_stats is not None:
                aux.mtp_load = mtp_stats.load_E
                aux.mtp_balance = mtp_stats.balance / self.microbatches
                loss = loss + self.balance_alpha * jnp.sum(aux.mtp_balance)
        return loss.astype(self.acc_dtype), aux

    def zero_aux(self) -> EpilogueAux:
        D, E, dt = self.cfg.mtp_depth, self.cfg.n_routed_experts, self.acc_dtype
        return EpilogueAux(jnp.zeros((), dt), jnp.zeros((D,), dt), jnp.zeros((D, E), jnp.float32),
                           jnp.zeros((D,), dt))
