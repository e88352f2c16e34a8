#!/usr/bin/env bash
# FP8 vs BF16 train step on ONE GPU, and whether XLA:GPU made FP8 GEMMs of model/fp8.py's
# dequantize -> dot. Prepared for an H200 lent by the device tool (~6 min: 3 policies x 2 sizes,
# one compile each).
#
#   bash bench/fp8_gpu.sh            # results in $OUT (default /tmp/fp8_gpu)
#
# 1. bench/fp8_step.py on configs/small.py widened to GEMM-bound shapes (d=2048, FFN 8192, 64
#    experts x 1408 top-6; the pipeline_gpu.sh stage), bfloat16 compute, seq $SEQ x batch $BATCH:
#    the jitted train step under model.matmul_policy = bf16, fp8_blockwise and default, step ms
#    and the ratio to bf16.
# 2. The optimized HLO of each ($OUT/hlo_<seq>/<policy>.hlo.txt) and its census: dots with
#    f8e4m3fn operands, cuBLASLt FP8 GEMM custom-calls (__cublas$lt$matmul$f8), fusions that take
#    f8 and contain a dot (the dequantize fused into a wider GEMM), all dots and cuBLAS GEMMs.
#    model/fp8.py scales per 1x128 / 128x128 tile; XLA's FP8 rewriter is documented for
#    per-tensor scales only, so "dequantize fused into wider GEMMs" is the expected verdict and
#    an FP8 GEMM the surprise. The grep lines below show the first instances either way.
# 3. A second size with SEQ doubled, to see whether the FP8/BF16 ratio moves with GEMM size.
#
# Needs jax with CUDA in $PY (default: python). CPU smoke run of the script itself (every f8
# count is 0 there: FP8 is emulated on CPU):
#   PY=.venv/bin/python SEQ=64 BATCH=1 STEPS=2 EXTRA="--set model.d_model=128 \
#     --set model.intermediate_size=256 --set model.moe_intermediate_size=128 \
#     --set model.n_routed_experts=8 --set model.n_group=2 --set model.topk_group=1 \
#     --set model.num_experts_per_tok=2 --set model.n_layers=2" bash bench/fp8_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-/tmp/fp8_gpu}
SEQ=${SEQ:-4096}
BATCH=${BATCH:-2}
STEPS=${STEPS:-10}
source bench/gpu_env.sh

SIZE=(--set model.d_model=2048 --set model.n_heads=16 --set model.q_lora_rank=768
      --set model.kv_lora_rank=512 --set model.qk_nope_head_dim=128
      --set model.qk_rope_head_dim=64 --set model.v_head_dim=128
      --set model.n_routed_experts=64 --set model.moe_intermediate_size=1408
      --set model.num_experts_per_tok=6 --set model.n_group=8 --set model.topk_group=4
      --set model.intermediate_size=8192 --set model.n_layers=4
      --set model.compute_dtype=bfloat16 --set train.global_batch_size="$BATCH")
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
SIZE+=("${EXTRA_ARGS[@]}")

for seq in "$SEQ" "$((2 * SEQ))"; do
    "$PY" bench/fp8_step.py --config=configs/small.py "${SIZE[@]}" --set train.seq_len="$seq" \
        --policies=bf16,fp8_blockwise,default --steps="$STEPS" --hlo_dir="$OUT/hlo_$seq" \
        --json="$OUT/step_$seq.json" | tee "$OUT/step_$seq.txt"
done

# The first FP8-looking GEMMs of the FP8 program, if any, for the record.
for hlo in "$OUT"/hlo_*/fp8_blockwise.hlo.txt; do
    echo "== $hlo"
    grep -E "(dot|convolution|custom-call)\(.*f8e4m3fn" "$hlo" | cut -c1-240 | head -n 5 \
        || echo "no dot or custom-call with an f8e4m3fn operand"
    echo "lines mentioning f8e4m3fn: $(grep -c "f8e4m3fn" "$hlo" || true)"
done | tee "$OUT/fp8_grep.txt"
echo "results in $OUT"
