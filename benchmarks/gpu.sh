#!/usr/bin/env bash
# gptlab on a CUDA GPU in one bounded run: the 124M training step (gptlab and transformers, bf16,
# torch.compile, MFU), fp16 with the grad scaler, resume, DDP (2+ GPUs), generation against
# transformers, and the whole `gptlab train` loop. Sized for about 5 minutes on an H200 (an estimate:
# no GPU has run it yet); no phase starts after 8 minutes and the run is killed at 9 (`timeout`).
# Needs only the working tree and the machine's torch, transformers, tiktoken, safetensors, tqdm and
# matplotlib: no install, no network. Writes benchmarks/results/gpu.json, gpu.md (printed at the end)
# and gpu.log, and copies them into $OUT when it is set.
# Extra arguments go to benchmarks/gpu_bench.py (e.g. --phases train,train_hf; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout --kill-after=15 540 "${PYTHON:-python3}" benchmarks/gpu_bench.py --device cuda "$@"
