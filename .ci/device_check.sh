#!/usr/bin/env bash
# The accelerator check and one paper-recipe task, as run on a lent GPU machine
# (docs/performance.md, "On a GPU"). The machine's image has JAX, flax, optax,
# orbax and torch; what it lacks travels as wheels in .whl/ (see the docs), and
# the PyTorch reference as .ref/ref_torch.py. Writes under $OUT (default ./out).
set -u
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export ENERGYFLOW_REF_TORCH=${ENERGYFLOW_REF_TORCH:-$PWD/.ref/ref_torch.py}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$OUT/nvidia_smi.csv" 2>&1
# 1. the GPU check: stages start only within GPU_CHECK_BUDGET_S seconds
timeout "${GPU_CHECK_TIMEOUT_S:-320}" python3 -m energyflow_jax.bench --gpu-check \
  --out "$OUT/gc" --skip "${GPU_CHECK_SKIP:-}" --budget-s "${GPU_CHECK_BUDGET_S:-240}" 2>&1 | tee "$OUT/gpu_check.log" | cut -c1-400
# 2. the paper recipe on one task, 3 seeds vmapped, with its evaluation
timeout "${PAPER_TIMEOUT_S:-240}" python3 -m energyflow_jax.main \
  --config=sweeps/sweep_metaworld.py:paper --config.task="${PAPER_TASK:-button-press-v3}" \
  --config.optim.total_steps="${PAPER_STEPS:-5000}" --config.eval.num_workers=12 \
  --config.log.progress=False --config.log.tensorboard=False --workdir=/tmp/paper \
  > "$OUT/paper.log" 2>&1
echo "paper run exit: $?" | tee -a "$OUT/paper.log"
tail -c 3000 "$OUT/paper.log"
for f in results.md results.json report.json; do cp /tmp/paper/$f "$OUT/paper_$f" 2>/dev/null; done
m=$(find /tmp/paper -name metrics.jsonl | head -1); [ -n "$m" ] && cp "$m" "$OUT/paper_metrics.jsonl"
find /tmp/paper -maxdepth 3 -name '*.json*' >> "$OUT/paper.log" 2>&1
