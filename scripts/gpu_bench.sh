#!/usr/bin/env bash
# The performance issue's GPU check, for a machine with one accelerator and no network (about 5 min).
# Needs only jax, flax, optax (no TFDS, grain or torch): every benchmark here runs on synthetic
# batches. Run from the repository root:  PYTHONPATH=. bash scripts/gpu_bench.sh [python]
set -uo pipefail
PY=${1:-python3}
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/jaxdist-gpu}; mkdir -p "$OUT"
STEPS=${STEPS:-200}  # timed steps per round
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"
# the classic CNN data-parallel step vs a hand-written jit loop, global batch 512 (the CPU table's batch)
timeout 240 "$PY" -m benchmarks.dp --devices 1 --strategies jit,shard_map --global_batch 512 \
  --steps "$STEPS" --rounds 3 2>&1 | tee "$OUT/dp.txt"
# a batch large enough to fill a GPU
timeout 240 "$PY" -m benchmarks.dp --devices 1 --strategies jit --global_batch 4096 \
  --steps "$((STEPS / 2))" --rounds 3 2>&1 | tee "$OUT/dp_4096.txt"
