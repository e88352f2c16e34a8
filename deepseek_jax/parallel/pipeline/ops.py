"""The per-tick ops of the pipeline executor: F, B, Bi, W and F&B as lax.switch branches.

Each branch is (carry, row) -> (carry, outbox [4, b, s, D], log [5]). A chunk's role (first, last
or middle stage) is data, so the prologue (embedding, dense layers) and epilogue (norm, head, loss,
MTP) run under lax.cond and the MoE body is traced once per op kind.

B and Bi recompute the stage forward from the stored stage input (jax.vjp; nothing but the
[b, s, D] input is kept between F and the backward):
  F   prologue? -> body -> epilogue?; stores the body input (the prologue output at a first stage).
  B   recompute body; epilogue vjp (last) or the received gradient; body vjp w.r.t. weights and
      input; prologue vjp (first); sends the input gradient.
With `BackwardSplit.EXACT` (split.py) Bi and W are B cut in two by dependency:
  Bi  the equations of B that the input gradient and the globals' gradients need (forward
      recompute, epilogue and prologue vjps, the body's input-gradient chain); sends the input
      gradient and writes the residuals the body's weight gradients need into its `wres` slot.
  W   the remaining equations of B: the body's weight GEMMs, from the `wres` slot only.
With `BackwardSplit.RECOMPUTE` (no residual buffers):
  Bi  B with every vjp taken w.r.t. activations only: no weight cotangent is computed.
  W   B without the send: weight cotangents, plus the input cotangent the weights below need,
      i.e. a second forward recompute and input-gradient chain.
Gradients of the replicated globals are added inside the conds, so middle stages never
materialise zero gradients for embedding, head or MTP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deepseek_jax import batch as batch_lib
from deepseek_jax.model import losses
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel.pipeline import split as split_lib
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
    wres: tuple = ()  # per residual of the exact split, [R, ...] by wres slot (Bi -> W)


def make_env(
    stack,
    stack_bias,
    glob: dict,
    glob_bias: dict,
    mbs: batch_lib.Batch,
    norms: losses.Norms,
    weights: losses.Weights,
    first: jax.Array,
    last: jax.Array,
    active: jax.Array | None = None,
) -> dict:
    """One rank's arrays as the ops read them: stack/stack_bias [K, Ls, ...], micro-batches
    (every Batch field [M, b, s]), first/last [K] role flags of the rank's chunks, and with
    uneven stages active [K, Ls] (0: a padding slot, run as the identity)."""
    return dict(
        active=active,
        stack=stack,
        bias=stack_bias,
        glob=glob,
        glob_bias=glob_bias,
        mbs=mbs,
        norms=norms,
        weights=weights,
        first=first,
        last=last,
        stack0=take(stack, 0),
        bias0=take(stack_bias, 0),
    )


def init_carry(
    stage: stages.Stage,
    env: dict,
    act_slots: int,
    grd_slots: int,
    residuals: tuple = (),
    wres_slots: int = 0,
) -> Carry:
    """Empty accumulators and NaN buffers: a read of a slot nobody wrote poisons the result.
    `residuals`: the exact split's residual shapes (`Ops.residuals`), `wres_slots` of each."""
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
        balance=jnp.zeros((K, Ls), stage.acc_dtype),
        epi=zero_aux(stage, env),
        wres=tuple(_poisoned((wres_slots, *r.shape), r.dtype) for r in residuals),
    )


def _poisoned(shape, dtype) -> jax.Array:
    return jnp.full(shape, jnp.nan if jnp.issubdtype(dtype, jnp.inexact) else 0, dtype)


def zero_aux(stage: stages.Stage, env: dict) -> stages.EpilogueAux:
    """Zero epilogue accumulators shaped like the objective's metrics (found by tracing it)."""
    b, s = env["mbs"].inputs.shape[1:]
    h = jnp.zeros((b, s, stage.cfg.d_model), stage.cfg.compute_dtype.jnp)
    return stage.zero_aux(stage.metric_shapes(h, take(env["mbs"], 0), env))


def take(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _add(acc: dict, delta: dict) -> dict:
    return {
        **acc,
        **jax.tree.map(lambda a, d: a + d.astype(a.dtype), {k: acc[k] for k in delta}, delta),
    }


def _put(buf: jax.Array, value: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), i, 0)


class Ops:
    """Builds the branches over `env`: the rank's arrays inside shard_map (stack [K, ...], its
    biases, globals, micro-batches [M, b, s], norms, loss weights, and the per-chunk role flags
    first/last). With the exact split the backward is cut once, here (`split`), and every Bi and
    W branch evaluates its half of the same equations."""

    def __init__(
        self,
        stage: stages.Stage,
        env: dict,
        split: parallel_config.BackwardSplit = parallel_config.BackwardSplit.EXACT,
    ):
        self.stage, self.env = stage, env
        self.zero_aux = zero_aux(stage, env)
        self.pro_keys = stages.prologue_keys(stage.cfg)
        self.epi_keys = stages.epilogue_keys(stage.cfg)
        self.split = None
        if split is parallel_config.BackwardSplit.EXACT:
            b, s = env["mbs"].inputs.shape[1:]
            x = jnp.zeros((b, s, stage.cfg.d_model), stage.cfg.compute_dtype.jnp)
            transient = (jax.tree.map(jnp.zeros_like, env["glob"]), x, x)
            self.split = split_lib.Split.of(self._grads, self._stable(0, 0), transient)

    @property
    def residuals(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """Shapes of the values the exact Bi stores for its W (empty with recompute)."""
        return self.split.residuals if self.split else ()

    def _glob(self, keys, glob=None) -> dict:
        return {k: (self.env["glob"] if glob is None else glob)[k] for k in keys}

    def _stable(self, c, mb) -> dict:
        """What the backward of (c, mb) reads that W can read again at its own tick."""
        env = self.env
        return dict(
            chunk=take(env["stack"], c),
            bias=take(env["bias"], c),
            batch=take(env["mbs"], mb),
            first=env["first"][c],
            last=env["last"][c],
            active=None if env["active"] is None else env["active"][c],
            env={k: env[k] for k in ("glob", "glob_bias", "norms", "weights", "stack0", "bias0")},
        )

    def forward(self, carry: Carry, c, mb, slot, outbox):
        st, env = self.stage, self.env
        batch = take(env["mbs"], mb)
        x = jax.lax.cond(
            env["first"][c] > 0,
            lambda: st.prologue({}, env, batch),
            lambda: carry.act[slot].astype(st.cfg.compute_dtype.jnp),
        )
        active = None if env["active"] is None else env["active"][c]
        (h, _), (load, balance) = st.body(
            take(env["stack"], c), x, take(env["bias"], c), env, active, batch
        )
        _, epi = jax.lax.cond(
            env["last"][c] > 0,
            lambda: st.epilogue({}, h, batch, env),
            lambda: (jnp.zeros((), st.acc_dtype), self.zero_aux),
        )
        carry = dataclasses.replace(
            carry,
            act=_put(carry.act, x, slot),
            load=carry.load.at[c].add(load),
            balance=carry.balance.at[c].add(balance),
            epi=jax.tree.map(jnp.add, carry.epi, epi),
        )
        return carry, _put(outbox, h, Channel.ACT0 + c)

    def _grads(self, stable: dict, transient: tuple, weights: bool = True):
        """One chunk's backward as a pure function: ((d_glob, d_x), d_chunk | None) from the
        stable operands and (d_glob, stage input x, received output gradient)."""
        st = self.stage
        env = {**self.env, **stable["env"]}
        chunk, bias, batch, on = (stable[k] for k in ("chunk", "bias", "batch", "active"))
        d_glob, x, received = transient
        if weights:
            (h, aux_loss), body_vjp = jax.vjp(
                lambda p, x_: st.body(p, x_, bias, env, on, batch)[0], chunk, x
            )
        else:
            (h, aux_loss), body_vjp = jax.vjp(
                lambda x_: st.body(chunk, x_, bias, env, on, batch)[0], x
            )

        def from_loss(d_glob):
            if weights:
                _, vjp = jax.vjp(
                    lambda d, h_: st.epilogue(d, h_, batch, env)[0],
                    self._glob(self.epi_keys, env["glob"]),
                    h,
                )
                d_epi, g_h = vjp(jnp.ones((), st.acc_dtype))
                return _add(d_glob, d_epi), g_h
            _, vjp = jax.vjp(lambda h_: st.epilogue({}, h_, batch, env)[0], h)
            return d_glob, vjp(jnp.ones((), st.acc_dtype))[0]

        def from_downstream(d_glob):
            return d_glob, received.astype(h.dtype)

        d_glob, g_h = jax.lax.cond(stable["last"] > 0, from_loss, from_downstream, d_glob)
        cot = body_vjp((g_h, jnp.ones_like(aux_loss)))
        if not weights:
            return (d_glob, cot[0]), None
        d_chunk, d_x = cot

        def into_prologue(d_glob):
            _, vjp = jax.vjp(
                lambda d: st.prologue(d, env, batch), self._glob(self.pro_keys, env["glob"])
            )
            return _add(d_glob, vjp(d_x)[0])

        d_glob = jax.lax.cond(stable["first"] > 0, into_prologue, lambda d: d, d_glob)
        return (d_glob, d_x), d_chunk

    def _add_chunk(self, carry: Carry, c, d_chunk) -> Carry:
        return dataclasses.replace(
            carry,
            d_stack=jax.tree.map(
                lambda a, d: a.at[c].add(d.astype(a.dtype)), carry.d_stack, d_chunk
            ),
        )

    def backward(self, carry: Carry, kind: Code, c, mb, row: dict, outbox, sfx: str = ""):
        stable = self._stable(c, mb)
        if kind is Code.W and self.split is not None:  # the weight GEMMs, from the residuals
            res = [buf[row["wres"]] for buf in carry.wres]
            return self._add_chunk(carry, c, self.split.weight_grads(stable, res)), outbox
        transient = (carry.d_glob, carry.act[row["act" + sfx]], carry.grd[row["grd" + sfx]])
        if kind is Code.BI and self.split is not None:
            (d_glob, d_x), res = self.split.input_grads(stable, transient)
            carry = dataclasses.replace(
                carry,
                d_glob=d_glob,
                wres=tuple(_put(buf, r, row["wres"]) for buf, r in zip(carry.wres, res)),
            )
        else:
            (d_glob, d_x), d_chunk = self._grads(stable, transient, weights=kind is not Code.BI)
            carry = dataclasses.replace(carry, d_glob=d_glob)
            if d_chunk is not None:
                carry = self._add_chunk(carry, c, d_chunk)
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
                    carry, outbox = self.backward(carry, code, row["c"], row["mb"], row, outbox)
            if code is Code.FB:
                with jax.named_scope("pp_backward"):
                    carry, outbox = self.backward(
                        carry, Code.B, row["c2"], row["mb2"], row, outbox, "2"
                    )
            log = jnp.stack([jnp.int32(code), row["c"], row["m"], row["c2"], row["m2"]])
            return carry, outbox, log

        return run
