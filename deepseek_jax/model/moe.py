"""DeepSeekMoE layer: router + bias (selection only) + routed experts + always-on shared experts.

The routed-expert computation is an explicit `dispatch.ExpertFn` argument: the single-device
`dispatch.dropless_experts` by default, the expert-parallel one from `parallel.expert` on a mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.model import config as config_lib
from deepseek_jax.model import dispatch, layers, routing


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEStats:
    load_E: jax.Array  # tokens routed to each expert in this call (selection incl. bias)
    balance: jax.Array  # sequence-wise balance statistic sum_i f_i P_i (times alpha in the loss)


class Gate(nnx.Module):
    def __init__(self, cfg: config_lib.MoEConfig, *, rngs: nnx.Rngs):
        E = cfg.n_routed_experts
        # Router kept in float32 as HF does (`_keep_in_fp32_modules_strict`): routing is discrete.
        self.kernel = layers.param(
            rngs, (cfg.d_model, E), ("embed", None), std=cfg.init_std, dtype=cfg.param_dtype
        )
        self.bias = (
            layers.ExpertBias(
                jnp.zeros((E,), layers.accum_dtype(cfg.param_dtype)), logical_axes=(None,)
            )
            if cfg.use_bias
            else None
        )

    def __call__(self, x_XD: jax.Array) -> jax.Array:
        dt = layers.accum_dtype(self.kernel[...].dtype)
        return x_XD.astype(dt) @ self.kernel[...].astype(dt)


class MoE(nnx.Module):
    def __init__(self, cfg: config_lib.MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E, D, F = cfg.n_routed_experts, cfg.d_model, cfg.d_expert
        self.gate = Gate(cfg, rngs=rngs)
        kw = dict(std=cfg.init_std, dtype=cfg.param_dtype)
        self.w1 = layers.param(rngs, (E, D, F), ("expert", "embed", "expert_mlp"), **kw)
        self.w3 = layers.param(rngs, (E, D, F), ("expert", "embed", "expert_mlp"), **kw)
        self.w2 = layers.param(rngs, (E, F, D), ("expert", "expert_mlp", "embed"), **kw)
        shared_cfg = config_lib.MLPConfig(
            D,
            cfg.n_shared_experts * F,
            cfg.init_std,
            cfg.param_dtype,
            cfg.compute_dtype,
            cfg.matmul,
        )
        self.shared = layers.MLP(shared_cfg, rngs=rngs) if cfg.n_shared_experts else None

    def __call__(
        self, x_BSD: jax.Array, experts: dispatch.ExpertFn = dispatch.dropless_experts
    ) -> tuple[jax.Array, MoEStats]:
        cfg = self.cfg
        B, S, D = x_BSD.shape
        x_XD = x_BSD.reshape(B * S, D).astype(cfg.compute_dtype)
        bias = None if self.gate.bias is None else self.gate.bias[...]
        r = routing.route(self.gate(x_XD), bias, cfg)
        dt = cfg.compute_dtype
        y_XD = experts(
            x_XD,
            r.idx_Xk,
            r.weights_Xk,
            self.w1[...].astype(dt),
            self.w3[...].astype(dt),
            self.w2[...].astype(dt),
            grouped_matmul=cfg.grouped_matmul,
            policy=cfg.matmul,
        )
        y_BSD = y_XD.reshape(B, S, D)
        if self.shared is not None:
            y_BSD = y_BSD + self.shared(x_BSD)
        stats = MoEStats(
            load_E=routing.expert_load(r.idx_Xk, cfg.n_routed_experts),
            balance=routing.sequence_balance(r.scores_XE.reshape(B, S, -1), cfg.top_k),
        )
        return y_BSD, stats
