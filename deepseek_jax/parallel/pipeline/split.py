"""The exact zero-bubble backward split: one backward op's jaxpr cut into Bi and W.

A backward op is a pure function `fn(stable, transient) -> (inputs_out, weights_out)`: `stable`
are operands W can read again at its own tick (the chunk's weights, biases, globals, the
micro-batch, norms), `transient` those it cannot (the stored stage input, the received cotangent,
the running gradient accumulators). `inputs_out` is what Bi must produce (the stage-input
gradient and the accumulated global gradients), `weights_out` the weight gradients W produces.

`Split.of` traces `fn` (forward recompute and its vjp together) to a flat jaxpr: `jit` calls are
inlined, and so is every `scan` that carries both kinds of work (the stage's loop over layers, whose
backward body computes a layer's input gradient and its weight gradients), so that every layer's
weight GEMMs become separate equations. Loops of one kind stay loops (a grouped matmul's tile loop:
its forward and input-gradient loops go to Bi, its weight-gradient loop to W); unrolling them would
grow Bi and W with the token count. Which scans mix is found by cutting, and tracing again with
those unrolled, until none does. The equations are then cut by dependency:
  Bi = every equation `inputs_out` depends on (the forward and the input-gradient chain);
  W  = every other equation `weights_out` depends on (the weight GEMMs `x^T g` and their
       reductions), nothing else: no forward recompute, no input-gradient equation twice.
The residuals are the values W reads that Bi defines, or transient operands: for every weight
use, the GEMM's input activation and its output cotangent (plus the few elementwise values a
norm scale's gradient needs). `Split.residuals` lists their shapes; their bytes per micro-batch
are `Split.residual_bytes`. Bi writes them into the executor's `wres` slots, W reads them back.

Equations that hold both kinds of work (a `cond`, a nested `shard_map` such as the expert
all-to-all, a `custom_vjp`) stay whole on the Bi side: the prologue/epilogue conds differentiate
the globals in Bi, and with expert parallelism the routed experts' weight GEMMs (inside the
shard_map) run in Bi too. W evaluates with a strict environment: reading a variable it was not
given raises `MissingResidual`, so a dropped residual is an error, never a silent zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

_INLINE = ("jit", "pjit", "closed_call", "core_call")


class MissingResidual(KeyError):
    """W read a value that is neither a residual it was given nor a stable operand."""


def _val(env: dict, v):
    if isinstance(v, jcore.Literal):
        return v.val
    try:
        return env[v]
    except KeyError:
        raise MissingResidual(
            f"{v} ({v.aval.str_short()}) is not in the W environment: a residual Bi did not store"
        ) from None


def _bind(eqn, invals):
    # As core.eval_jaxpr binds an equation: its context (e.g. the mesh axis types) applies.
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return out if eqn.primitive.multiple_results else [out]


def _inline(jaxpr, consts, args, unroll: frozenset, path: tuple, kept: list) -> list:
    """Evaluates `jaxpr`, tracing jit calls inline, and the scans whose path is in `unroll` as a
    Python loop over iterations. Every other scan is bound whole; its path is appended to
    `kept`, in bind order (= the order of the scan equations in the traced jaxpr)."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    for j, eqn in enumerate(jaxpr.eqns):
        invals = [_val(env, v) for v in eqn.invars]
        name, here = eqn.primitive.name, (*path, j)
        if name in _INLINE:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            closed = inner if isinstance(inner, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(inner, ())
            outs = _inline(closed.jaxpr, closed.consts, invals, unroll, here, kept)
        elif name == "scan" and here in unroll:
            outs = _scan(eqn.params, invals, unroll, here, kept)
        else:
            if name == "scan":
                kept.append(here)
            outs = _bind(eqn, invals)
        env.update(zip(eqn.outvars, outs))
    return [_val(env, v) for v in jaxpr.outvars]


def _scan(p: dict, invals: list, unroll: frozenset, path: tuple, kept: list) -> list:
    nc, nk, n = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    body = p["jaxpr"]
    ys = [None] * n
    for i in reversed(range(n)) if p["reverse"] else range(n):
        args = consts + carry + [x[i] for x in xs]
        out = _inline(body.jaxpr, body.consts, args, unroll, (*path, i), kept)
        carry, ys[i] = out[:nk], out[nk:]
    stacked = [jnp.stack([y[j] for y in ys]) for j in range(len(body.jaxpr.outvars) - nk)]
    return carry + stacked


def _needed(jaxpr, producer: dict, outvars, skip=frozenset()) -> set:
    """Indices of the equations `outvars` depend on, not walking through `skip`."""
    seen, stack = set(), [v for v in outvars if not isinstance(v, jcore.Literal)]
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in seen or i in skip:
            continue
        seen.add(i)
        stack.extend(v for v in jaxpr.eqns[i].invars if not isinstance(v, jcore.Literal))
    return seen


def _cut(jaxpr, n_in: int) -> tuple[set, set]:
    """(Bi, W) equation indices: Bi what the first `n_in` outputs need, W the rest of what the
    weight outputs need."""
    producer = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
    bi = _needed(jaxpr, producer, jaxpr.outvars[:n_in])
    return bi, _needed(jaxpr, producer, jaxpr.outvars[n_in:], skip=frozenset(bi))


def _mixed_scans(jaxpr, n_in: int, bi: set, kept: list) -> set:
    """Paths of the whole scans on the Bi side with an output only W reads: a loop carrying
    both kinds of work (the layer stack's backward), to be unrolled so that its weight GEMMs
    move to W. Scans of one kind (a grouped matmul's tile loop) stay loops."""
    scans = [i for i, e in enumerate(jaxpr.eqns) if e.primitive.name == "scan"]
    assert len(scans) == len(kept), (len(scans), len(kept))
    var = lambda vs: {v for v in vs if not isinstance(v, jcore.Literal)}  # noqa: E731
    bi_reads = var(v for i in bi for v in jaxpr.eqns[i].invars) | var(jaxpr.outvars[:n_in])
    all_reads = var(v for e in jaxpr.eqns for v in e.invars) | var(jaxpr.outvars)
    return {
        path
        for i, path in zip(scans, kept)
        if i in bi and any(v not in bi_reads and v in all_reads for v in jaxpr.eqns[i].outvars)
    }


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A backward op cut into Bi and W equations (static; rebuilt identically by every trace)."""

    jaxpr: Any  # the flat jaxpr of fn over flatten((stable, transient))
    consts: tuple
    n_stable: int
    bi_eqns: tuple
    w_eqns: tuple
    res_vars: tuple  # what Bi hands W, in order
    out_trees: tuple  # treedefs of (inputs_out, weights_out)
    n_inputs_out: int

    @classmethod
    def of(cls, fn: Callable, stable, transient) -> Split:
        flat, tree = jax.tree.flatten((stable, transient))
        n_stable = len(jax.tree.leaves(stable))
        out_trees = []

        def flat_fn(*leaves):
            ins, ws = fn(*jax.tree.unflatten(tree, leaves))
            out_trees[:] = [jax.tree.structure(ins), jax.tree.structure(ws)]
            return jax.tree.leaves(ins) + jax.tree.leaves(ws)

        nested = jax.make_jaxpr(flat_fn)(*flat)
        n_in = out_trees[0].num_leaves
        unroll: frozenset = frozenset()
        while True:  # unroll mixed loops until none is left; each round traces once more
            kept: list = []
            closed = jax.make_jaxpr(
                lambda *a, u=unroll, k=kept: _inline(nested.jaxpr, nested.consts, list(a), u, (), k)
            )(*flat)
            jaxpr = closed.jaxpr
            bi, w = _cut(jaxpr, n_in)
            mixed = _mixed_scans(jaxpr, n_in, bi, kept)
            if not mixed:
                break
            unroll |= mixed
        w_defined = {v for i in w for v in jaxpr.eqns[i].outvars}
        stable_vars = set(jaxpr.invars[:n_stable]) | set(jaxpr.constvars)
        reads = [v for i in sorted(w) for v in jaxpr.eqns[i].invars]
        reads += list(jaxpr.outvars[n_in:])  # a weight gradient Bi computed outright
        res, seen = [], set()
        for v in reads:
            if isinstance(v, jcore.Literal) or v in w_defined or v in stable_vars or v in seen:
                continue
            seen.add(v)
            res.append(v)
        eqns = jaxpr.eqns
        return cls(
            jaxpr,
            tuple(closed.consts),
            n_stable,
            tuple(eqns[i] for i in sorted(bi)),
            tuple(eqns[i] for i in sorted(w)),
            tuple(res),
            tuple(out_trees),
            n_in,
        )

    @property
    def residuals(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        return tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in self.res_vars)

    @property
    def residual_bytes(self) -> int:
        return sum(r.size * jnp.dtype(r.dtype).itemsize for r in self.residuals)

    def _env(self, stable) -> dict:
        return dict(zip(self.jaxpr.constvars, self.consts)) | dict(
            zip(self.jaxpr.invars[: self.n_stable], jax.tree.leaves(stable))
        )

    def input_grads(self, stable, transient) -> tuple[Any, list]:
        """Bi: (inputs_out, residuals for W)."""
        env = self._env(stable) | dict(
            zip(self.jaxpr.invars[self.n_stable :], jax.tree.leaves(transient))
        )
        for eqn in self.bi_eqns:
            env.update(zip(eqn.outvars, _bind(eqn, [_val(env, v) for v in eqn.invars])))
        outs = [_val(env, v) for v in self.jaxpr.outvars[: self.n_inputs_out]]
        return (jax.tree.unflatten(self.out_trees[0], outs), [_val(env, v) for v in self.res_vars])

    def weight_grads(self, stable, residuals, res_vars=None) -> Any:
        """W: weights_out from the stable operands and Bi's residuals only. `res_vars` (tests)
        names the residuals given, default all of them."""
        env = self._env(stable) | dict(
            zip(self.res_vars if res_vars is None else res_vars, residuals)
        )
        for eqn in self.w_eqns:
            env.update(zip(eqn.outvars, _bind(eqn, [_val(env, v) for v in eqn.invars])))
        outs = [_val(env, v) for v in self.jaxpr.outvars[self.n_inputs_out :]]
        return jax.tree.unflatten(self.out_trees[1], outs)

    def count(self, part: str, primitive: str = "dot_general") -> int:
        """Equations of `primitive` in `part` ('bi' or 'w'), inside the loops kept whole too
        (once per loop body, not per iteration), for tests and the bench."""
        return _count(self.bi_eqns if part == "bi" else self.w_eqns, primitive)


def _count(eqns, primitive: str) -> int:
    n = 0
    for e in eqns:
        n += e.primitive.name == primitive
        for v in e.params.values():  # the bodies of a loop, cond or shard_map
            for sub in v if isinstance(v, tuple) else (v,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jcore.Jaxpr):
                    n += _count(sub.eqns, primitive)
    return n
