"""The exact zero-bubble split (parallel/pipeline/split.py): Bi then W equals one full B.

The ops run outside shard_map on one rank's arrays (DualPipe PP=2, rank 0: chunk 0 is the first
stage with the prologue, chunk 1 the last stage with the epilogue, so every role is covered),
with the pipeline tests' model and parameters. A full B is compared with Bi followed by W
(exact split) and with the recompute split's Bi + W: weight gradients, global gradients and the
sent input gradient, float64 within 1e-12 and float32 within 1e-6 (per leaf max|a-b| / max|b|).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from deepseek_jax.model import grouped, losses
from deepseek_jax.parallel.config import BackwardSplit
from deepseek_jax.parallel.pipeline import ops as ops_lib
from deepseek_jax.parallel.pipeline import split as split_lib
from deepseek_jax.parallel.pipeline import stages
from deepseek_jax.parallel.pipeline.ticks import Channel, Code
from deepseek_jax.train import pipeline_step
from deepseek_jax.train import state as state_lib
from tests.parallel import pipeline_harness as h

TOL = {"float64": 1e-12, "float32": 1e-6}
ROW = dict(act=0, grd=0, wres=0, act2=-1, grd2=-1)


def _env(dtype: str):
    cfg = h.model_config(dtype)
    graphdef, _, _ = state_lib.abstract_model(cfg)
    st, batch = h.state(dtype)
    stage = stages.Stage(graphdef, cfg, h.MICROBATCHES)
    stack, glob = stages.split(st.params)
    bstack, bglob = stages.split(st.expert_bias)
    placement = jnp.array([[0, 1]])  # one rank holding both stages of a 2-stage model
    take0 = lambda t: ops_lib.take(stages.to_pipeline(t, placement, 2), 0)  # noqa: E731
    norms = losses.norms(batch, cfg.mtp_depth, stage.acc_dtype, h.MICROBATCHES)
    weights = losses.Weights(jnp.asarray(0.3, stage.acc_dtype), 1e-2)
    env = ops_lib.make_env(
        take0(stack),
        take0(bstack),
        glob,
        bglob,
        pipeline_step.microbatched(batch, h.MICROBATCHES),
        norms,
        weights,
        jnp.array([1, 0]),
        jnp.array([0, 1]),
    )
    return stage, env


def _run(dtype: str):
    """For both chunks: the carry and outbox after B, after exact Bi+W and after recompute Bi+W,
    and the exact split itself."""
    with jax.enable_x64(dtype == "float64"):
        stage, env = _env(dtype)

    def fn(env):
        exact = ops_lib.Ops(stage, env, BackwardSplit.EXACT)
        recompute = ops_lib.Ops(stage, env, BackwardSplit.RECOMPUTE)
        carry0 = ops_lib.init_carry(stage, env, 1, 1, exact.residuals, 1)
        key = jax.random.key(0)
        b, s = env["mbs"].inputs.shape[1:]
        x = jax.random.normal(key, (b, s, stage.cfg.d_model), carry0.act.dtype)
        g = jax.random.normal(jax.random.fold_in(key, 1), x.shape, x.dtype)
        carry0 = dataclasses.replace(carry0, act=x[None], grd=g[None])
        outbox = jnp.zeros((4, *x.shape), x.dtype)
        out = {}
        for c in (0, 1):
            mb = 3
            full = exact.backward(carry0, Code.B, c, mb, ROW, outbox)
            carry, box = exact.backward(carry0, Code.BI, c, mb, ROW, outbox)
            carry, _ = exact.backward(carry, Code.W, c, mb, ROW, box)
            r_carry, r_box = recompute.backward(carry0, Code.BI, c, mb, ROW, outbox)
            r_carry, _ = recompute.backward(r_carry, Code.W, c, mb, ROW, r_box)
            out[c] = dict(full=full, exact=(carry, box), recompute=(r_carry, r_box))
        return out

    with jax.enable_x64(dtype == "float64"):
        return jax.device_get(jax.jit(fn).lower(env).compile(h.FAST_COMPILE)(env))


def _grads(pair, c):
    carry, box = pair
    return dict(d_stack=carry.d_stack, d_glob=carry.d_glob, d_x=box[Channel.GRD0 + c])


@pytest.fixture(scope="module", params=list(TOL))
def results(request):
    return request.param, _run(request.param)


def test_exact_and_recompute_split_equal_full_backward(results):
    dtype, out = results
    for c in (0, 1):
        want = _grads(out[c]["full"], c)
        assert jax.tree.reduce(max, jax.tree.map(lambda a: float(np.abs(a).max()), want)) > 0
        for mode in ("exact", "recompute"):
            err, leaf = h.worst(_grads(out[c][mode], c), want)
            print(f"{dtype} chunk {c} {mode}: max rel {err:.1e} at {leaf}")
            assert err <= TOL[dtype], (mode, c, leaf, err)


def _body_split(dtype: str):
    """The exact split of chunk 1 (last stage) traced outside any executor, with its operands."""
    stage, env = _env(dtype)
    ops = ops_lib.Ops(stage, env, BackwardSplit.EXACT)
    rng = np.random.default_rng(0)
    b, s = env["mbs"].inputs.shape[1:]
    x = jnp.asarray(rng.standard_normal((b, s, stage.cfg.d_model)), dtype)
    transient = (jax.tree.map(jnp.zeros_like, env["glob"]), x, x)
    return ops, ops._stable(1, 0), transient


def test_w_runs_only_weight_gemms_and_needs_every_residual():
    ops, stable, transient = _body_split("float32")
    sp = ops.split
    n_weights = len(jax.tree.leaves(stable["chunk"]))
    w_gemms = sp.count("w", "dot_general") + sp.count("w", "ragged_dot_general")
    assert w_gemms > 0 and sp.count("bi", "dot_general") > 0
    # W holds no equation of the forward or of the input-gradient chain: none of its outputs
    # is read by a Bi equation.
    w_out = {v for e in sp.w_eqns for v in e.outvars}
    assert not any(
        v in w_out for e in sp.bi_eqns for v in e.invars if not isinstance(v, jcore.Literal)
    )
    # Jitted: run equation by equation, each op would compile on its own (a minute here).
    weight_grads = jax.jit(lambda st, r, kept=None: sp.weight_grads(st, r, kept), static_argnums=2)
    (d_glob, d_x), res = jax.jit(sp.input_grads)(stable, transient)
    want = jax.jit(ops._grads)(stable, transient)[1]
    got = weight_grads(stable, res)
    assert h.worst(got, want)[0] <= 1e-6
    assert len(jax.tree.leaves(got)) == n_weights
    # A cotangent dropped from what Bi hands W is an error, never a silent zero.
    for i in (0, len(res) // 2, len(res) - 1):
        kept = tuple(v for j, v in enumerate(sp.res_vars) if j != i)
        with pytest.raises(split_lib.MissingResidual, match="a residual Bi did not store"):
            weight_grads(stable, [r for j, r in enumerate(res) if j != i], kept)
    # And a residual W was handed wrong (zeros) changes the weight gradients.
    zeroed = [jnp.zeros_like(r) if j == len(res) // 2 else r for j, r in enumerate(res)]
    assert h.worst(weight_grads(stable, zeroed), want)[0] > 1e-3
    print(
        f"residuals: {len(res)} arrays, {sp.residual_bytes} bytes per micro-batch "
        f"(stage input: {x_bytes(transient[1])} bytes); W: {w_gemms} GEMMs, "
        f"{len(sp.w_eqns)} equations; Bi: {len(sp.bi_eqns)} equations"
    )


def x_bytes(x) -> int:
    return x.size * x.dtype.itemsize


def _layer_stack(stable, transient):
    """A scanned stack of grouped-matmul layers and its vjp, as a stage's backward op: the layer
    loop's backward carries both kinds of work, each layer's tile loops only one."""
    w_LEDD, sizes_E = stable
    x_ZD, g_ZD = transient

    def body(x_ZD, w_EDD):
        return jnp.tanh(grouped.tiled(x_ZD, w_EDD, sizes_E, tile=8)), None

    _, vjp = jax.vjp(lambda x, w: jax.lax.scan(body, x, w)[0], x_ZD, w_LEDD)
    return vjp(g_ZD)


def test_mixed_loops_are_unrolled_and_single_kind_loops_stay_loops():
    L, E, D = 3, 4, 8
    rng = np.random.default_rng(0)
    counts = {}
    with jax.enable_x64(True):  # float64: Bi + W and the plain vjp agree to rounding
        w = jnp.asarray(rng.standard_normal((L, E, D, D)) / np.sqrt(D), jnp.float64)
        for rows in (32, 128):
            sizes = jnp.asarray([rows // 2, 0, rows // 4, rows // 4], jnp.int32)  # one empty
            x, g = (jnp.asarray(rng.standard_normal((rows, D)), jnp.float64) for _ in range(2))
            stable, transient = (w, sizes), (x, g)
            sp = split_lib.Split.of(_layer_stack, stable, transient)
            # The layer loop is gone (each layer's weight gradient is its own W work); the tile
            # loops stay: one weight-gradient loop per layer in W, the forward and
            # input-gradient ones in Bi.
            top = lambda eqns: sum(e.primitive.name == "scan" for e in eqns)  # noqa: E731
            assert top(sp.w_eqns) == L and top(sp.bi_eqns) >= 2 * L
            assert sp.count("w", "dot_general") == L  # one x^T g per layer, in its tile loop
            counts[rows] = (len(sp.bi_eqns), len(sp.w_eqns))
            dx, res = jax.jit(sp.input_grads)(stable, transient)
            want_dx, want_dw = jax.jit(_layer_stack)(stable, transient)
            np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
            dw = jax.jit(sp.weight_grads)(stable, res)
            np.testing.assert_allclose(dw, want_dw, rtol=1e-12, atol=1e-12)
    # So Bi and W do not grow with the rows (4x the tiles here).
    assert counts[32] == counts[128], counts
