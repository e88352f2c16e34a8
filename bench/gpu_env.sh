# Sourced by the bench/*_gpu.sh scripts after they set PY and OUT: the output folder, the
# import path, no preallocation (the scripts compile several programs side by side), and the
# device and jax version recorded in $OUT/gpu.txt beside the results.
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt" \
    || echo "no nvidia-smi" | tee "$OUT/gpu.txt"
"$PY" -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
