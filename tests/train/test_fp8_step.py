"""Where the FP8 recipe applies in a real train step: a walk over the step's jaxpr shows E4M3
operands on every Linear and routed-expert GEMM (forward, dgrad, wgrad) and nowhere else (not the
embedding, head, router, norms, attention core or MTP's norms); BF16 puts bfloat16 operands on the
same GEMMs; the optimizer state has the configured dtypes."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.extend import core as jcore

from deepseek_jax.batch import Batch
from deepseek_jax.model import config as config_lib
from deepseek_jax.model import layers, precision, transformer
from deepseek_jax.model import moe as moe_lib
from deepseek_jax.train import config as train_config
from deepseek_jax.train import optim
from deepseek_jax.train import state as state_lib
from deepseek_jax.train import step as step_lib

Policy = precision.MatmulPolicy
F8 = jnp.dtype(jnp.float8_e4m3fn)
DOTS = {"dot_general", "ragged_dot_general"}
# Dims chosen distinct so an op is recognisable by shape: vocab 40, experts 6.
MODEL = config_lib.ModelConfig(
    vocab_size=40,
    d_model=32,
    n_layers=2,
    first_k_dense_replace=1,
    intermediate_size=48,
    n_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_routed_experts=6,
    n_shared_experts=1,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    mtp_depth=1,
)
TRAIN = train_config.TrainConfig(steps=4, global_batch_size=2, seq_len=16)


def subjaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def live_eqns(jaxpr):
    """Equations whose results are used (XLA drops the rest, e.g. the primal of a jax.vjp)."""
    live = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    keep = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(o in live for o in eqn.outvars):
            keep.append(eqn)
            live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
    return keep[::-1]


@dataclasses.dataclass
class Walk:
    fed: collections.Counter  # dots by operand kind: "f8" (dequantized E4M3), dtype name else
    dots: list  # (kind, operand shapes) of every live dot
    f8_users: collections.Counter  # primitives that consume a value converted from E4M3


def operand_kind(var, producer) -> str:
    """ "f8" when the operand is convert(E4M3) * scale (through layout ops), else its dtype."""
    if not isinstance(var, jcore.Var):
        return "literal"
    eqn = producer.get(var)
    while eqn is not None and eqn.primitive.name in ("transpose", "reshape", "broadcast_in_dim"):
        eqn = producer.get(eqn.invars[0])
    if eqn is not None and eqn.primitive.name == "mul":
        for u in eqn.invars:
            src = producer.get(u) if isinstance(u, jcore.Var) else None
            if src is not None and src.primitive.name == "convert_element_type":
                if src.invars[0].aval.dtype == F8:
                    return "f8"
    return str(var.aval.dtype)


def walk(jaxpr, out: Walk):
    eqns = live_eqns(jaxpr)
    producer = {o: e for e in eqns for o in e.outvars}
    for eqn in eqns:
        name = eqn.primitive.name
        for v in eqn.invars:
            src = producer.get(v) if isinstance(v, jcore.Var) else None
            if src is not None and src.primitive.name == "convert_element_type":
                if src.invars[0].aval.dtype == F8:
                    out.f8_users[name] += 1
        if name in DOTS:
            kinds = {operand_kind(v, producer) for v in eqn.invars[:2]}
            kind = "f8" if kinds == {"f8"} else "mixed" if "f8" in kinds else kinds.pop()
            out.fed[kind] += 1
            out.dots.append((kind, tuple(v.aval.shape for v in eqn.invars[:2]), eqn.outvars[0]))
        for sub in subjaxprs(eqn):
            walk(sub, out)
    return out


def gemm_sites(cfg) -> int:
    """Weight GEMMs the policy covers, per traced layer body (stacks are scanned, so one each):
    every Linear but the head, and three grouped GEMMs per MoE layer."""
    model = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.Linear)]
    moes = [m for _, m in nnx.iter_graph(model) if isinstance(m, moe_lib.MoE)]
    assert model.head.policy is Policy.DEFAULT
    covered = [m for m in linears if m.policy is cfg.matmul_policy]
    assert len(covered) == len(linears) - 1  # all but the head
    return len(covered) + 3 * len(moes)


@pytest.fixture(scope="module")
def walks():
    batch = Batch(
        inputs=jnp.zeros((2, 16), jnp.int32),
        targets=jnp.zeros((2, 16), jnp.int32),
        loss_mask=jnp.ones((2, 16), jnp.float32),
        target_bytes=jnp.ones((2, 16), jnp.int32),
    )
    out = {}
    for policy in [Policy.DEFAULT, Policy.BF16, Policy.FP8_BLOCKWISE]:
        # ragged_dot: one dot per grouped GEMM, so the walk can see its operands; the tiled
        # kernel slices them per tile (tests/model/test_fp8.py checks FP8 through it).
        cfg = dataclasses.replace(
            MODEL, matmul_policy=policy, grouped_matmul=config_lib.GroupedMatmul.RAGGED_DOT
        )
        tx = optim.optimizer(TRAIN)
        graphdef, _, _ = state_lib.abstract_model(cfg)
        fn = step_lib.make_train_step(graphdef, TRAIN, tx)
        jaxpr = jax.make_jaxpr(fn)(state_lib.abstract_state(cfg, tx), batch)
        out[policy] = walk(jaxpr.jaxpr, Walk(collections.Counter(), [], collections.Counter()))
    return out


def test_fp8_operands_on_every_weight_gemm_forward_and_backward(walks):
    sites = gemm_sites(dataclasses.replace(MODEL, matmul_policy=Policy.FP8_BLOCKWISE))
    assert sites == 31  # dense layer 8 Linears; MoE layer and MTP 8 + 3 expert GEMMs; eh_proj
    fp8, default = walks[Policy.FP8_BLOCKWISE], walks[Policy.DEFAULT]
    assert fp8.fed["f8"] == 3 * sites  # forward, dgrad and wgrad of each
    assert fp8.fed["mixed"] == 0
    # The same GEMMs as without the policy: the rest are the excluded ops, untouched.
    assert sum(fp8.fed.values()) == sum(default.fed.values())
    assert default.fed["f8"] == 0 and not default.f8_users


def test_no_f8_in_the_excluded_ops(walks):
    fp8 = walks[Policy.FP8_BLOCKWISE]
    # Values converted from E4M3 are only ever scaled (and laid out) for a GEMM: no norm,
    # softmax, gather, router or loss reads one.
    assert set(fp8.f8_users) == {"mul"}, fp8.f8_users
    E, V = MODEL.n_routed_experts, MODEL.vocab_size
    excluded = collections.Counter()
    for kind, shapes, out in fp8.dots:
        dims = {d for s in (*shapes, out.aval.shape) for d in s}
        if V in dims:
            excluded["head"] += 1
        elif E in dims and all(len(s) == 2 for s in (*shapes, out.aval.shape)):
            excluded["router"] += 1
        elif any(len(s) == 4 for s in shapes):
            excluded["attention core"] += 1
        else:
            continue
        assert kind == "float32", (kind, shapes)
    # forward + both backward GEMMs of the head and the MTP head, and of the two routers;
    # QK^T and PV per attention (dense, MoE, MTP) with their gradients.
    assert excluded["head"] >= 6 and excluded["router"] >= 6 and excluded["attention core"] >= 12


def test_bf16_policy_puts_bfloat16_operands_on_the_same_gemms(walks):
    bf16 = walks[Policy.BF16]
    # All three GEMMs of each Linear, forward and dgrad of the expert GEMMs; the expert wgrad
    # (the grouped matmul's transpose) takes float32 operands holding bfloat16 values.
    assert bf16.fed["bfloat16"] == 3 * 25 + 2 * 6
    assert sum(bf16.fed.values()) == sum(walks[Policy.DEFAULT].fed.values())
    assert not bf16.f8_users and bf16.fed["mixed"] == 0


@pytest.mark.parametrize("moments", list(train_config.MomentDType))
def test_optimizer_state_dtypes(moments):
    cfg = dataclasses.replace(TRAIN, adam_moment_dtype=moments)
    tx = optim.optimizer(cfg)
    state = state_lib.abstract_state(MODEL, tx)
    adam = [
        s
        for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "nu"))
        if hasattr(s, "nu")
    ]
    assert len(adam) == 1
    want = jnp.dtype(moments.value)
    for leaf in jax.tree.leaves((adam[0].mu, adam[0].nu)):
        assert leaf.dtype == want
    for leaf in jax.tree.leaves(state.params):  # master params stay float32
        assert leaf.dtype == jnp.float32


def test_bf16_moments_follow_optax_adam_rounded():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(3)]
    ref = optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)
    for dtype in [jnp.float32, jnp.bfloat16]:
        ours = optim.scale_by_adam_stored_as(dtype, 0.9, 0.95, 1e-8)
        s_ours, s_ref = ours.init(params), ref.init(params)
        for g in grads:
            u_ours, s_ours = ours.update(g, s_ours)
            u_ref, s_ref = ref.update(g, s_ref)
            if dtype == jnp.float32:  # optax's arithmetic, bit for bit
                assert jnp.array_equal(u_ours["w"], u_ref["w"])
        assert s_ours.mu["w"].dtype == dtype and s_ours.nu["w"].dtype == dtype
        rel = jnp.linalg.norm(u_ours["w"] - u_ref["w"]) / jnp.linalg.norm(u_ref["w"])
        assert rel < (1e-7 if dtype == jnp.float32 else 2e-2)
