#!/usr/bin/env bash
# Pipeline op costs on ONE GPU (prepared for an H200 lent by the device tool; ~5 min).
#
#   bash bench/pipeline_gpu.sh            # results in $OUT (default /tmp/pipeline_gpu)
#
# What one GPU can and cannot tell about the pipeline:
# - The pipelined step itself needs PP devices on the `pipe` mesh axis. XLA:GPU cannot simulate
#   devices (--xla_force_host_platform_device_count is CPU-only), so on one GPU the real
#   pipelined step does not run at all; timing it per schedule needs PP >= 2 GPUs.
# - What is meaningful on one GPU: the cost of each op the executor runs per tick -- F, B, Bi,
#   W and F&B of one stage, the very lax.switch branches of deepseek_jax/parallel/pipeline/ops.py
#   -- in bfloat16 at a token count where the GPU is busy. From them:
#     * (Bi+W)/B: what the recompute-based zero-bubble split costs on this hardware;
#     * F&B/(F+B): whether XLA overlaps anything between the two halves of an F&B branch on one
#       device (no expert all-to-all here: with one device there is nothing to hide);
#     * the cost model's predicted step time and bubble for every schedule at PP=4 and 8
#       (lock-step = this executor, asynchronous = the official DualPipe).
#   And the unpipelined train step of the same model (two stages' layers, 2 sequences) for the
#   absolute scale: the pipeline does n_stages * (F + B) per micro-batch and B recomputes the
#   forward, so 2 * (F + B) per sequence against the plain step shows what recompute costs.
# - Not measured here: ppermute latency between ranks, the EP all-to-all hidden behind the other
#   chunk's compute, lock-step stalls between real ranks. Those need >= 2 GPUs and a profile
#   (jax.profiler trace: per-device busy time vs wall time, gaps around collective-permute).
#
# Needs jax with CUDA in $PY (default: python). Sizes are set below; shrink SEQ or LAYERS if the
# device time left is short (each op compiles once: 10 jitted ops and one train step).
# CPU smoke run of the script itself:
#   PY=.venv/bin/python SEQ=16 EXTRA="--set model.d_model=64 --set model.n_routed_experts=8 \
#     --set model.moe_intermediate_size=32 --set model.n_group=2 --set model.topk_group=1 \
#     --set model.num_experts_per_tok=2 --set model.n_heads=2" bash bench/pipeline_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-/tmp/pipeline_gpu}
SEQ=${SEQ:-4096}
LAYERS=${LAYERS:-2}
source bench/gpu_env.sh

# A stage of a mid-size DeepSeek-V3-shaped model (d=2048, 64 experts top-6, MLA), bf16 compute.
SIZE=(--set model.d_model=2048 --set model.n_heads=16 --set model.q_lora_rank=768
      --set model.kv_lora_rank=256 --set model.qk_nope_head_dim=128
      --set model.qk_rope_head_dim=64 --set model.v_head_dim=128
      --set model.n_routed_experts=64 --set model.moe_intermediate_size=1408
      --set model.num_experts_per_tok=6 --set model.n_group=8 --set model.topk_group=4
      --set model.intermediate_size=8192 --set model.compute_dtype=bfloat16
      --set train.seq_len="$SEQ")
# EXTRA: more --set overrides, applied last (e.g. a tiny smoke size on a CPU).
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
SIZE+=("${EXTRA_ARGS[@]}")

"$PY" bench/pipeline_costs.py --config=configs/small.py "${SIZE[@]}" --layers="$LAYERS" \
    --microbatch=1 --reps=10 --unpipelined-batch=2 --json > "$OUT/costs.json"
"$PY" - "$OUT/costs.json" <<'EOF' | tee "$OUT/costs.txt"
import json, sys
d = json.load(open(sys.argv[1]))
for size, t in d["per_op_s"].items():
    print(size, " ".join(f"{k}={1e3 * v:.2f}ms" for k, v in t.items()),
          f"(Bi+W)/B={(t['Bi'] + t['W']) / t['B']:.2f} FB/(F+B)={t['FB'] / (t['F'] + t['B']):.2f}")
print("unpipelined train step, 2 sequences:", d["unpipelined_step_s"], "s")
for r in d["rows"]:
    print(f"{r['schedule']:9s} PP={r['pp']} M={r['microbatches']:2d} lock-step "
          f"{r['lockstep']:.4f}s bubble {100 * r['lockstep_bubble']:.1f}% | async "
          f"{r['asynchronous']:.4f}s bubble {100 * r['async_bubble']:.1f}%")
EOF
echo "results in $OUT"
