#!/usr/bin/env bash
# Decode throughput on ONE GPU, bf16: naive vs absorbed MLA, and MTP speculative vs plain.
# Prepared for an H200 lent by the device tool (~6 min; the small config compiles a few seconds
# per shape).
#
#   bash bench/decode_gpu.sh            # results in $OUT (default /tmp/decode_gpu)
#
# 1. bench/decode.py's cache part on configs/small.py widened to a bandwidth-bound size (d=2048,
#    16 heads, kv_lora 512, rope 64: V3's per-head and latent dims), bfloat16 compute and cache, at
#    context 2k / 8k / 32k and batch 1 / 8 / 32: absorbed vs naive tokens/s side by side, cache
#    bytes measured from the arrays next to the formula.
# 2. MTP speculative decoding on the tiny model trained here for TRAIN_STEPS steps (the smoke
#    model; ~1 min on a GPU): acceptance per draft position, mean accepted length, speedup at
#    batch 1 for k = 1, 2, 3 (a tiny model on a GPU is launch-bound: the speedup there measures
#    how many verify steps are saved, not a bandwidth win).
#
# Needs jax with CUDA in $PY (default: python). CPU smoke run of the script itself:
#   PY=.venv/bin/python CONTEXTS=64 BATCHES=1 TRAIN_STEPS=20 SPEC_TOKENS=8 EXTRA="--set model.d_model=64 \
#     --set model.n_heads=2 --set model.kv_lora_rank=16 --set model.q_lora_rank=32" \
#     bash bench/decode_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-/tmp/decode_gpu}
CONTEXTS=${CONTEXTS:-2048,8192,32768}
BATCHES=${BATCHES:-1,8,32}
TRAIN_STEPS=${TRAIN_STEPS:-600}
SPEC_TOKENS=${SPEC_TOKENS:-128}
source bench/gpu_env.sh

SIZE=(--set model.d_model=2048 --set model.n_heads=16 --set model.q_lora_rank=768
      --set model.kv_lora_rank=512 --set model.qk_nope_head_dim=128
      --set model.qk_rope_head_dim=64 --set model.v_head_dim=128 --set model.n_layers=4)
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
SIZE+=("${EXTRA_ARGS[@]}")

"$PY" bench/decode.py --config=configs/small.py "${SIZE[@]}" --parts=cache --dtypes=bfloat16 \
    --contexts="$CONTEXTS" --batches="$BATCHES" --steps=20 --json="$OUT/cache.json" \
    | tee "$OUT/cache.txt"

rm -rf "$OUT/smoke"
"$PY" -m deepseek_jax.train --config=configs/tiny.py --workdir="$OUT/smoke" \
    --config.train.steps="$TRAIN_STEPS" --config.train.eval_every="$TRAIN_STEPS" \
    > "$OUT/train.log" 2>&1
tail -n 3 "$OUT/train.log"
"$PY" bench/decode.py --config=configs/tiny.py --parts=spec --spec-checkpoint="$OUT/smoke" \
    --spec-tokens="$SPEC_TOKENS" --json="$OUT/spec.json" | tee "$OUT/spec.txt"
echo "results in $OUT"
