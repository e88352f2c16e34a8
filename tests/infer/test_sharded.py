"""Decode on 8 simulated devices (data x tensor, and expert parallelism) equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax.infer import decode, kv_cache
from deepseek_jax.model import dispatch, transformer
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel import sharding as sharding_lib
from deepseek_jax.train import state as state_lib
from tests.parallel import cases

Mode = kv_cache.DecodeMode
CFG = cases.CFG
LENGTHS = np.array([5, 9, 7, 3, 8, 6, 9, 4])
STEPS = 3


def run(graphdef, params, bias, mode, plan=None):
    """Prefill + STEPS decode steps: logits [B, STEPS + 1, Y] (float32)."""
    B, T = len(LENGTHS), int(LENGTHS.max()) + STEPS + 1
    seq = ((np.arange(B * T).reshape(B, T) * 13 + 5) % CFG.vocab_size).astype(np.int32)
    prompts = np.where(
        np.arange(LENGTHS.max())[None] < LENGTHS[:, None], seq[:, : LENGTHS.max()], 0
    )

    experts = dispatch.dropless_experts if plan is None else plan.experts()

    def pre(p, b, t, n, c):
        return decode.prefill(nnx.merge(graphdef, p, b), t, n, c, experts)

    def step(p, b, t, c):
        logits, _, c = decode.forward(nnx.merge(graphdef, p, b), t, c, experts=experts)
        return logits[:, 0], c.with_length(c.length_B + 1)

    cache = kv_cache.init(CFG, B, T, mode)
    args = (params, bias)
    tok = jnp.asarray(prompts)
    lens = jnp.asarray(LENGTHS, jnp.int32)
    if plan is not None:
        pre, step = plan.wrap(pre), plan.wrap(step)
        logical_p, logical_b = state_lib.logical_axes(CFG)
        specs = [
            sharding_lib.tree_specs(plan.rules, lg, a, plan.sizes, name)
            for lg, a, name in ((logical_p, params, "params"), (logical_b, bias, "bias"))
        ]
        args = tuple(
            jax.device_put(a, sharding_lib.named(plan.mesh, s)) for a, s in zip(args, specs)
        )
        cache_sh = kv_cache.shardings(cache, plan.mesh, plan.rules)
        cache = jax.device_put(cache, cache_sh)
        tok, lens = (
            jax.device_put(tok, plan.batch_sharding()),
            jax.device_put(lens, cache_sh.length_B),
        )
    pre, step = jax.jit(pre), jax.jit(step, donate_argnums=3)
    logits, _, cache = pre(*args, tok, lens, cache)
    out = [logits]
    for j in range(STEPS):
        ids = jnp.asarray(seq[np.arange(B), LENGTHS + j][:, None])
        if plan is not None:
            ids = jax.device_put(ids, plan.batch_sharding())
        logits, cache = step(*args, ids, cache)
        out.append(logits)
    return np.stack([np.asarray(o) for o in out], 1), cache


@pytest.fixture(scope="module")
def model():
    return state_lib.split(transformer.Transformer(CFG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def single(model):
    return {mode: run(*model, mode)[0] for mode in Mode}


MESHES = {
    "data4_tensor2": parallel_config.ParallelConfig(
        preset=parallel_config.Preset.FSDP_TP, data=4, tensor=2
    ),
    "data2_expert4": cases.parallel(parallel_config.Preset.DATA_EXPERT),
}


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sharded_decode_equals_one_device(model, single, mesh, mode):
    plan = plan_lib.make_plan(MESHES[mesh], CFG, len(LENGTHS))
    got, cache = run(*model, mode, plan)
    rel = cases.rel_err(got, single[mode])
    print(f"{mesh} {mode.value}: max rel diff {rel:.2e}")
    assert rel <= 1e-5
    for kv in cache.stacks.values():
        for leaf in jax.tree.leaves(kv):
            spec = leaf.sharding.spec
            assert spec[1] is not None  # batch split
            if isinstance(kv, kv_cache.LatentKV):
                assert "tensor" not in jax.tree.leaves(tuple(spec))  # latent replicated
        if isinstance(kv, kv_cache.FullKV) and plan.sizes["tensor"] > 1:
            assert kv.k_LBTHK.sharding.spec[3] == "tensor"  # per-head cache split like heads
