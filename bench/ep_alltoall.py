"""Bytes the expert all-to-alls move per train step, from the compiled HLO, vs the analytic minimum.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python bench/ep_alltoall.py [--d_model=256 --seq=128 --batch=16]

For each expert-parallel layout on 8 (simulated) devices, compiles the real sharded train step
(MoE + MTP on), sums the result bytes of every all-to-all that the expert shard_map emits
(dispatch and return, forward and backward; an op in the scanned layer stack counts once per
layer) on one device, and divides by the minimum: every (token, choice) row crosses once per
direction, i.e. per step and device
    moe_calls x 2 (dispatch, return) x 2 (forward, backward) x X_local x top_k x d_model x bytes,
with moe_calls = MoE layers + MoE MTP depths. The dense ALL_TO_ALL exchange sends a worst-case
buffer of C = X_local * min(top_k, E_local) rows to each of the EP ranks, so its ratio is
EP * min(top_k, E_local) / top_k; RAGGED_ALL_TO_ALL sends exactly the routed rows (ratio 1, plus
the per-rank counts) but cannot be compiled by XLA:CPU, so it is not measured here.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from deepseek_jax.batch import Batch
from deepseek_jax.model import config as model_config
from deepseek_jax.parallel import config as parallel_config
from deepseek_jax.parallel import hlo_stats
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.train import config as train_config
from deepseek_jax.train import optim, sharded
from deepseek_jax.train import state as state_lib

Preset = parallel_config.Preset
LAYOUTS = [
    (Preset.DATA_EXPERT, dict(data=4, expert=2)),
    (Preset.DATA_EXPERT, dict(data=2, expert=4)),
    (Preset.DATA_EXPERT, dict(expert=8)),
    (Preset.FSDP_EXPERT_TP, dict(fsdp=2, expert=2, tensor=2)),
]


def measure(
    model: model_config.ModelConfig,
    train: train_config.TrainConfig,
    cfg: parallel_config.ParallelConfig,
) -> dict:
    tx = optim.optimizer(train)
    graphdef, _, _ = state_lib.abstract_model(model)
    plan = plan_lib.make_plan(cfg, model, train.global_batch_size)
    step = sharded.train_step(plan, model, train, graphdef, tx)
    batch_struct = jax.ShapeDtypeStruct(
        (train.global_batch_size, train.seq_len), jnp.int32, sharding=plan.batch_sharding()
    )
    batch = Batch(
        inputs=batch_struct,
        targets=batch_struct,
        target_bytes=batch_struct,
        loss_mask=jax.ShapeDtypeStruct(
            batch_struct.shape, jnp.float32, sharding=plan.batch_sharding()
        ),
    )
    t0 = time.perf_counter()
    hlo = step.lower(sharded.abstract_state(plan, model, tx), batch).compile().as_text()
    compile_s = time.perf_counter() - t0
    ops = [
        c for c in hlo_stats.collectives(hlo) if c.kind == "all-to-all" and "shard_map" in c.op_name
    ]
    itemsize = model.compute_dtype.jnp.itemsize
    data_ops = [c for c in ops if "s32[" not in c.result_type]  # not the per-expert counts
    sizes = plan.sizes
    x_local = (
        train.global_batch_size * train.seq_len // (sizes["data"] * sizes["fsdp"] * sizes["expert"])
    )
    calls = model.n_moe_layers + (model.mtp_depth if model.mtp_is_moe else 0)
    minimum = calls * 2 * 2 * x_local * model.num_experts_per_tok * model.d_model * itemsize
    moved = sum(c.bytes * c.count for c in data_ops)
    ep, e_local = sizes["expert"], model.n_routed_experts // sizes["expert"]
    k = model.num_experts_per_tok
    return dict(
        layout=f"{cfg.preset.value} " + " ".join(f"{a}={v}" for a, v in sizes.items() if v > 1),
        ops=sum(c.count for c in data_ops),
        count_bytes=sum(c.bytes * c.count for c in ops) - moved,
        moved=moved,
        minimum=minimum,
        ratio=moved / minimum,
        formula=ep * min(k, e_local) / k,
        compile_s=compile_s,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    model = model_config.ModelConfig(
        vocab_size=1024,
        d_model=args.d_model,
        n_layers=3,
        first_k_dense_replace=1,
        intermediate_size=4 * args.d_model,
        n_heads=4,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=1,
        moe_intermediate_size=args.d_model // 2,
        num_experts_per_tok=4,
        n_group=8,
        topk_group=4,
        mtp_depth=1,
    )
    train = train_config.TrainConfig(global_batch_size=args.batch, seq_len=args.seq)
    print(
        f"model: d_model={model.d_model}, {model.n_moe_layers} MoE layers + "
        f"{model.mtp_depth} MoE MTP depth, E={model.n_routed_experts}, "
        f"top_k={model.num_experts_per_tok}, float32; batch {args.batch} x {args.seq} tokens"
    )
    print(
        "| layout | all-to-alls run | bytes moved / device / step | analytic minimum | ratio | "
        "EP*min(k,E_l)/k | count bytes | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for preset, sizes in LAYOUTS:
        cfg = parallel_config.ParallelConfig(preset=preset, **sizes)
        r = measure(model, train, cfg)
        print(
            f"| {r['layout']} | {r['ops']} | {r['moved']:,} | {r['minimum']:,} | "
            f"{r['ratio']:.2f} | {r['formula']:.2f} | {r['count_bytes']} | "
            f"{r['compile_s']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
