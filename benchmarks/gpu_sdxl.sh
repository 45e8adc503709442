#!/usr/bin/env bash
# One GPU run that proves the command line on CUDA and measures Flat-LoRA's cost on real-size SDXL.
#   bash benchmarks/gpu_sdxl.sh [OUT_DIR]               one CUDA GPU, about 10 minutes, ~40 GB of GPU memory
#   bash benchmarks/gpu_sdxl.sh --cpu-smoke [OUT_DIR]   every step at the tiny model's size on a CPU (a test runs it)
# 1. benchmarks/gpu_end_to_end.py: a real-size SDXL folder with random bf16 weights from the published
#    configs (no download), train_dreambooth_flat.py at 1024 px, bf16, both text encoders, gradient
#    checkpointing, 8-bit Adam, 20 steps, a checkpoint and a resume, both files reloaded into a fresh
#    pipeline with diffusers' load_lora_weights -> OUT_DIR/end_to_end/end_to_end.json
# 2. Flat-LoRA / LoRA / minimal reference step ratios (benchmarks/flat_vs_lora.py), 1024 px, batch 1,
#    both text encoders, without and with gradient checkpointing -> OUT_DIR/<setting>.txt and .json
# 3. Flat-LoRA's own work isolated (row norms, noise) -> OUT_DIR/flat_overhead.txt
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then SMOKE=1; shift; fi
OUT="${1:-benchmarks/results/gpu_sdxl}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
if [[ $SMOKE == 1 ]]; then
  E2E=(--cpu-smoke)
  COMMON=(--model tiny --resolution 32 --batch 1 --rank 4 --precision no --sigma 0.1 --quick --memory-steps 0)
  OVERHEAD=(--model tiny --precision no --rank 4 --rounds 1)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
  E2E=()
  COMMON=(--model sdxl --resolution 1024 --batch 1 --rank 4 --precision bf16 --sigma 0.1
          --steps 10 --warmup 2 --memory-steps 3)
  OVERHEAD=(--model sdxl --precision bf16 --rank 4 --text-encoders --rounds 10)
fi
echo "=== end to end"
"$PY" -m benchmarks.gpu_end_to_end "${E2E[@]}" --out "$OUT/end_to_end" | tee "$OUT/end_to_end.txt"
for ckpt in no_checkpointing checkpointing; do
  name="text_encoders_${ckpt}"
  flags=(--train-text-encoder)
  [[ $ckpt == checkpointing ]] && flags+=(--gradient-checkpointing)
  echo "=== $name"
  "$PY" -m benchmarks.flat_vs_lora "${COMMON[@]}" "${flags[@]}" --json "$OUT/$name.json" | tee "$OUT/$name.txt"
done
echo "=== flat overhead"
"$PY" -m benchmarks.flat_overhead "${OVERHEAD[@]}" | tee "$OUT/flat_overhead.txt"
