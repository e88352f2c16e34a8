"""The per-tick ops of the pipeline executor: F, B, Bi, W and F&B as lax.switch branches.

Each branch is (carry, row) -> (carry, outbox [4, b, s, D], log [5]). A chunk's role (first, last
or middle stage) is data, so the prologue (embedding, dense layers) and epilogue (norm, head, loss,
MTP) run under lax.cond and the MoE body is traced once per op kind.

B, Bi and W recompute the stage forward from the stored stage input (jax.vjp; nothing but the
[b, s, D] input is kept between F and the backward):
  F   prologue? -> body -> epilogue?; stores the body input (the prologue output at a first stage).
  B   recompute body; epilogue vjp (last) or the received gradient; body vjp w.r.t. weights and
      input; prologue vjp (first); sends the input gradient.
  Bi  the same, but every vjp is taken w.r.t. activations only: no weight cotangent is computed.
  W   the same as B without the send: weight cotangents, plus the input cotangent the weights
      below need (at a first stage the prologue's weights need the body's input gradient).
Gradients of the replicated globals are added inside the conds, so middle stages never
materialise zero gradients for embedding, head or MTP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from deepseek_jax import batch as batch_lib
from deepseek_jax.model import losses
from deepseek_jax.parallel.pipeline import stages, ticks

Channel, Code = ticks.Channel, ticks.Code


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Carry:
    """One rank's loop state."""

    act: jax.Array  # [A, b, s, D] stage inputs (body inputs), by act slot
    grd: jax.Array  # [G, b, s, D] received output gradients, by grd slot
    d_stack: Any  # [K, Ls, ...] weight gradients of this rank's chunks
    d_glob: dict  # gradients of the replicated globals (summed over `pipe` after the loop)
    load: jax.Array  # [K, Ls, E] tokens per expert, per chunk
    balance: jax.Array  # [K, Ls] sequence-balance statistic / M, per chunk
    epi: stages.EpilogueAux  # loss terms and MTP statistics, summed


def make_env(stack, stack_bias, glob: dict, glob_bias: dict, mbs: batch_lib.Batch,
             norms: losses.Norms, weights: losses.Weights, first: jax.Array, last: jax.Array
             ) -> dict:
    """One rank's arrays as the ops read them: stack/stack_bias [K, Ls, ...], micro-batches
    (every Batch field [M, b, s]), first/last [K] role flags of the rank's chunks."""
    return dict(stack=stack, bias=stack_bias, glob=glob, glob_bias=glob_bias, mbs=mbs,
                norms=norms, weights=weights, first=first, last=last, stack0=take(stack, 0),
                bias0=take(stack_bias, 0))


def init_carry(stage: stages.Stage, env: dict, act_slots: int, grd_slots: int) -> Carry:
    """Empty accumulators and NaN buffers: a read of a slot nobody wrote poisons the result."""
    cfg = stage.cfg
    b, s = env["mbs"].inputs.shape[1:]
    K, Ls = jax.tree.leaves(env["stack"])[0].shape[:2]
    dt = cfg.compute_dtype.jnp
    return Carry(
        act=jnp.full((act_slots, b, s, cfg.d_model), jnp.nan, dt),
        grd=jnp.full((grd_slots, b, s, cfg.d_model), jnp.nan, dt),
        d_stack=jax.tree.map(jnp.zeros_like, env["stack"]),
        d_glob=jax.tree.map(jnp.zeros_like, env["glob"]),
        load=jnp.zeros((K, Ls, cfg.n_routed_experts), jnp.float32),
        balance=jnp.zeros((K, Ls), stage.acc_dtype), epi=zero_aux(stage, env))


def zero_aux(stage: stages.Stage, env: dict) -> stages.EpilogueAux:
    """Zero epilogue accumulators shaped like the objective's metrics (found by tracing it)."""
    b, s = env["mbs"].inputs.shape[1:]
    h = jnp.zeros((b, s, stage.cfg.d_model), stage.cfg.compute_dtype.jnp)
    return stage.zero_aux(stage.metric_shapes(h, take(env["mbs"], 0), env))


def take(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _add(acc: dict, delta: dict) -> dict:
    return {**acc, **jax.tree.map(lambda a, d: a + d.astype(a.dtype),
                                  {k: acc[k] for k in delta}, delta)}


def _put(buf: jax.Array, value: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), i, 0)


class Ops:
    """Builds the branches over `env`: the rank's arrays inside shard_map (stack [K, ...], its
    biases, globals, micro-batches [M, b, s], norms, loss weights, and the per-chunk role flags
    first/last)."""

    def __init__(self, stage: stages.Stage, env: dict):
        self.stage, self.env = stage, env
        self.zero_aux = zero_aux(stage, env)
        self.pro_keys = stages.prologue_keys(stage.cfg)
        self.epi_keys = stages.epilogue_keys(stage.cfg)

    def _glob(self, keys) -> dict:
        return {k: self.env["glob"][k] for k in keys}

    def forward(self, carry: Carry, c, mb, slot, outbox):
        st, env = self.stage, self.env
        batch = take(env["mbs"], mb)
        x = jax.lax.cond(env["first"][c] > 0, lambda: st.prologue({}, env, batch.inputs),
                         lambda: carry.act[slot].astype(st.cfg.compute_dtype.jnp))
        (h, _), (load, balance) = st.body(take(env["stack"], c), x, take(env["bias"], c), env)
        _, epi = jax.lax.cond(env["last"][c] > 0,
                              lambda: st.epilogue({}, h, batch, env),
                              lambda: (jnp.zeros((), st.acc_dtype), self.zero_aux))
        carry = dataclasses.replace(
            carry, act=_put(carry.act, x, slot), load=carry.load.at[c].add(load),
            balance=carry.balance.at[c].add(balance),
            epi=jax.tree.map(jnp.add, carry.epi, epi))
        return carry, _put(outbox, h, Channel.ACT0 + c)

    def backward(self, carry: Carry, kind: Code, c, mb, slot, gslot, outbox):
        st, env = self.stage, self.env
        batch = take(env["mbs"], mb)
        chunk, bias = take(env["stack"], c), take(env["bias"], c)
        x = carry.act[slot]
        weights = kind is not Code.BI
        if weights:
            (h, aux_loss), body_vjp = jax.vjp(lambda p, x_: st.body(p, x_, bias, env)[0], chunk, x)
        else:
            (h, aux_loss), body_vjp = jax.vjp(lambda x_: st.body(chunk, x_, bias, env)[0], x)
        received = carry.grd[gslot]

        def from_loss(d_glob):
            if weights:
                _, vjp = jax.vjp(lambda d, h_: st.epilogue(d, h_, batch, env)[0],
                                 self._glob(self.epi_keys), h)
                d_epi, g_h = vjp(jnp.ones((), st.acc_dtype))
                return _add(d_glob, d_epi), g_h
            _, vjp = jax.vjp(lambda h_: st.epilogue({}, h_, batch, env)[0], h)
            return d_glob, vjp(jnp.ones((), st.acc_dtype))[0]

        def from_downstream(d_glob):
            return d_glob, received.astype(h.dtype)

        d_glob, g_h = jax.lax.cond(env["last"][c] > 0, from_loss, from_downstream, carry.d_glob)
        cot = body_vjp((g_h, jnp.ones_like(aux_loss)))
        if weights:
            d_chunk, d_x = cot

            def into_prologue(d_glob):
                _, vjp = jax.vjp(lambda d: st.prologue(d, env, batch.inputs),
                                 self._glob(self.pro_keys))
                return _add(d_glob, vjp(d_x)[0])

            d_glob = jax.lax.cond(env["first"][c] > 0, into_prologue, lambda d: d, d_glob)
            carry = dataclasses.replace(carry, d_glob=d_glob, d_stack=jax.tree.map(
                lambda a, d: a.at[c].add(d.astype(a.dtype)), carry.d_stack, d_chunk))
        else:
            (d_x,) = cot
        if kind is not Code.W:
            outbox = _put(outbox, d_x, Channel.GRD0 + c)
        return carry, outbox

    def branch(self, code: Code) -> Callable:
        def run(carry: Carry, row: dict):
            outbox = jnp.zeros((4,) + carry.act.shape[1:], carry.act.dtype)
            # The scopes name each half in the HLO metadata (bench/pipeline_overlap.py reads them).
            if code in (Code.F, Code.FB):
                with jax.named_scope("pp_forward"):
                    carry, outbox = self.forward(carry, row["c"], row["mb"], row["act"], outbox)
            if code in (Code.B, Code.BI, Code.W):
                with jax.named_scope(f"pp_{code.name.lower()}"):
                    carry, outbox = self.backward(carry, code, row["c"], row["mb"], row["act"],
                                                  row["grd"], outbox)
            if code is Code.FB:
                with jax.named_scope("pp_backward"):
                    carry, outbox = self.backward(carry, Code.B, row["c2"], row["mb2"],
                                                  row["act2"], row["grd2"], outbox)
            log = jnp.stack([jnp.int32(code), row["c"], row["m"], row["c2"], row["m2"]])
            return carry, outbox, log

        return run
