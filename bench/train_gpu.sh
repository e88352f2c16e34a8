#!/usr/bin/env bash
# bf16 train step time and MFU of a ~1B-active model on ONE GPU, for every grouped matmul and
# attention core, and whether XLA:GPU made `ragged_dot` a grouped GEMM. Prepared for an H200
# lent by the device tool (~8 min: four compiles of a 10-layer scanned model, 10 steps each).
#
#   bash bench/train_gpu.sh            # results in $OUT (default /tmp/train_gpu)
#
# 1. bench/train_step.py on the DeepSeek-V2-Lite geometry (d=2048, 16 heads, kv_lora 512, 64
#    routed experts x 1408 top-6 + 2 shared) cut to $LAYERS layers with vocab 32768: 0.96B
#    active and 5.5B total parameters at 10 layers (model/counting.py), bfloat16 compute,
#    remat full, seq $SEQ x batch $BATCH. For model.grouped_matmul = ragged_dot and tiled, and
#    model.attention.impl = dense and blockwise: step seconds, tokens/s, model FLOP/s, MFU
#    against the same run's 2048^2 bf16 dot and against the H200's nominal 989 TFLOP/s dense
#    bf16 ($OUT/summary.txt). AUTO picks ragged_dot on GPU; this is the measurement behind it.
# 2. The optimised HLO of the ragged_dot step (XLA_FLAGS --xla_dump_to) and its census: the
#    `ragged-dot` instructions left, every custom-call target (a cuDNN grouped GEMM shows as a
#    __cudnn$fusion custom call or fusion kind; cuBLAS GEMMs as __cublas$gemm), and the largest
#    dots (a dense rewrite multiplies every row by every expert: a dot with E*F = 90112 or a
#    64-sized batch dimension). docs/model.md says what the jax 0.10.2 source leads us to expect.
#
# Needs jax with CUDA in $PY (default: python). CPU smoke run of the script itself:
#   PY=.venv/bin/python LAYERS=2 SEQ=64 BATCH=1 STEPS=1 EXTRA="--set model.d_model=128 \
#     --set model.n_heads=2 --set model.kv_lora_rank=32 --set model.qk_nope_head_dim=16 \
#     --set model.qk_rope_head_dim=8 --set model.v_head_dim=16 --set model.intermediate_size=256 \
#     --set model.moe_intermediate_size=64 --set model.n_routed_experts=8 \
#     --set model.num_experts_per_tok=2 --set model.vocab_size=512" bash bench/train_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-/tmp/train_gpu}
LAYERS=${LAYERS:-10}
SEQ=${SEQ:-4096}
BATCH=${BATCH:-2}
STEPS=${STEPS:-10}
source bench/gpu_env.sh

SIZE=(--set model.n_layers="$LAYERS" --set model.vocab_size=32768
      --set model.compute_dtype=bfloat16 --set model.remat=full
      --set train.seq_len="$SEQ" --set train.global_batch_size="$BATCH")
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
SIZE+=("${EXTRA_ARGS[@]}")

for gmm in ragged_dot tiled; do
    for attn in dense blockwise; do
        name="${gmm}_${attn}"
        dump=()
        if [ "$name" = ragged_dot_dense ]; then
            rm -rf "$OUT/hlo"
            dump=(env XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$OUT/hlo --xla_dump_hlo_as_text")
        fi
        # one failure (e.g. out of memory) must not lose the other rows
        "${dump[@]}" "$PY" bench/train_step.py --config=configs/deepseek_v2_lite.py "${SIZE[@]}" \
            --set model.grouped_matmul="$gmm" --set model.attention.impl="$attn" \
            --parts=mfu --steps="$STEPS" --json="$OUT/$name.json" > "$OUT/$name.txt" 2>&1 \
            || echo "$name failed: see $OUT/$name.txt"
    done
done

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
NOMINAL = 989e12  # H200 SXM dense bf16
print(f"{'grouped matmul / attention':28} {'step s':>8} {'tokens/s':>10} {'MFU (dot)':>10} {'MFU (989T)':>10}")
for f in sorted(out.glob("*_*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem:28} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['mfu']:10.1%} "
          f"{r['model_flops_per_s'] / NOMINAL:10.1%}")
print(f"active {r['active_params'] / 1e9:.2f}B, total {r['total_params'] / 1e9:.2f}B params, "
      f"{r['train_flops_per_token'] / 1e9:.2f} GFLOP per token, {r['tokens_per_step']} tokens "
      f"per step; the 2048^2 dot peak of the last run {r['matmul_peak_flops_per_s'] / 1e12:.1f} "
      f"TFLOP/s")
EOF

# The ragged_dot step's optimised HLO: was ragged_dot lowered to a grouped GEMM?
hlo=$(ls -S "$OUT"/hlo/*after_optimizations.txt 2>/dev/null | head -n 1 || true)
{
    if [ -z "$hlo" ]; then
        echo "no optimised HLO dumped in $OUT/hlo"
    else
        echo "== $hlo (the largest module: the train step)"
        echo "ragged-dot instructions left: $(grep -c " ragged-dot(" "$hlo" || true)"
        echo "custom-call targets:"
        grep -o 'custom_call_target="[^"]*"' "$hlo" | sort | uniq -c | sort -rn || true
        echo "fusion kinds:"
        grep -o 'kind=k[A-Za-z]*' "$hlo" | sort | uniq -c | sort -rn || true
        echo "cudnn mentions: $(grep -c -i "cudnn" "$hlo" || true)"
        echo "the 8 largest dot / GEMM outputs (a dense rewrite of ragged_dot is E times the rows):"
        grep -E " (dot|custom-call)\(" "$hlo" | sed -E 's/^ *(ROOT )?%?([^ ]+) = ([^ ]+) .*/\3 \2/' \
            | awk '{ n = 1; s = $1; gsub(/[^0-9,]/, " ", s); split(s, d, /[ ,]+/);
                     for (i in d) if (d[i] != "") n *= d[i]; print n, $0 }' \
            | sort -rn | head -n 8 || true
    fi
} | tee "$OUT/ragged_dot_hlo.txt"
echo "results in $OUT"
