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
#    bf16 ($OUT/summary.txt). AUTO picks tiled on GPU (ragged_dot is an E-fold dense rewrite
#    there: bench/grouped_hlo.py); this is the timing that should confirm or overturn it.
# 2. The optimised HLO of the ragged_dot step (XLA_FLAGS --xla_dump_to) and its census: the
#    `ragged-dot` instructions left, every custom-call target (a cuDNN grouped GEMM shows as a
#    __cudnn$fusion custom call or fusion kind; cuBLAS GEMMs as __cublas$gemm), and the largest
#    dots: the dense rewrite multiplies every row by every expert, a dot of shape [E, rows, F]
#    (in the CPU smoke run below: f32[8, 128, 64] at 8 experts). docs/model.md says what the jax
#    0.10.2 source leads us to expect.
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
"$PY" - "$OUT" <<'EOF' | tee "$OUT/ragged_dot_hlo.txt"
import collections, math, pathlib, re, sys
found = sorted(pathlib.Path(sys.argv[1], "hlo").glob("*jit_train_step*after_optimizations.txt"))
if not found:
    sys.exit(f"no optimised train-step HLO dumped in {sys.argv[1]}/hlo")
text = found[-1].read_text()
print(f"== {found[-1]}")
print("ragged-dot instructions left:", len(re.findall(r" ragged-dot\(", text)))
targets = collections.Counter(re.findall(r'custom_call_target="([^"]*)"', text))
print("custom-call targets:", dict(targets))
print("fusion kinds:", dict(collections.Counter(re.findall(r"kind=(k\w+)", text))))
print("lines mentioning cudnn:", sum("cudnn" in line.lower() for line in text.splitlines()))
# a dense rewrite of ragged_dot computes every row against every expert: look for the biggest
rows = []
for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?(\S+) = \(?(\w+)\[([\d,]*)\].* (dot|custom-call)\(", line)
    if m:
        dims = [int(d) for d in m.group(3).split(",") if d]
        rows.append((math.prod(dims), m.group(4), m.group(2), dims, m.group(1)))
print("the 8 largest dot / custom-call outputs (elements, op, dtype, shape, name):")
for r in sorted(rows, reverse=True)[:8]:
    print("  ", *r)
EOF
echo "results in $OUT"
