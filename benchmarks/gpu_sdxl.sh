#!/usr/bin/env bash
# Flat-LoRA vs LoRA vs the minimal reference step on the real SDXL architecture (random bf16
# weights built from its published config), 1024 px, batch 1, on one CUDA GPU.
# Four settings: UNet only / with both text encoders, each without and with gradient checkpointing.
# Usage: bash benchmarks/gpu_sdxl.sh [OUT_DIR]   (about 10 minutes on an H100; needs ~40 GB)
# Writes OUT_DIR/<setting>.txt (the printed report) and OUT_DIR/<setting>.json for each setting.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu_sdxl}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
COMMON=(--model sdxl --resolution 1024 --batch 1 --rank 4 --precision bf16 --sigma 0.1
        --steps 20 --warmup 3 --memory-steps 3)
for te in unet text_encoders; do
  for ckpt in no_checkpointing checkpointing; do
    name="${te}_${ckpt}"
    flags=()
    [[ $te == text_encoders ]] && flags+=(--train-text-encoder)
    [[ $ckpt == checkpointing ]] && flags+=(--gradient-checkpointing)
    echo "=== $name"
    "$PY" -m benchmarks.flat_vs_lora "${COMMON[@]}" "${flags[@]}" --json "$OUT/$name.json" | tee "$OUT/$name.txt"
  done
done
# Flat-LoRA's own work isolated (row norms, noise in forward and backward), UNet + text encoders.
"$PY" -m benchmarks.flat_overhead --model sdxl --precision bf16 --rank 4 --text-encoders --rounds 10 \
  | tee "$OUT/flat_overhead.txt"
