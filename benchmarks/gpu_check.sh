#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build dmfast with its CUDA kernels, run the CUDA tests, then the kernel
# benchmarks on the GPU, printing their tables (JSON under benchmarks/results/). Meant to finish in < 8 minutes.
#   bash benchmarks/gpu_check.sh            (uses .venv, created by `make` if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  if [ -x "$PY" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  else
    TORCH_CUDA_ARCH_LIST="8.0;9.0"
  fi
fi
export TORCH_CUDA_ARCH_LIST DMFAST_CUDA=1
start=$(date +%s)
make build
"$PY" -c 'import dmfast, torch; assert dmfast._C.built_with_cuda() and torch.cuda.is_available(), "no CUDA build/GPU"; print("GPU:", torch.cuda.get_device_name())'
"$PY" -m pytest tests -q -k "cuda" -p no:cacheprovider
"$PY" -m benchmarks.affine_smooth --device cuda --min-run-time 0.5
"$PY" -m benchmarks.attention_cam --device cuda --min-run-time 0.5 --skip-literal
"$PY" -m benchmarks.cam_boxes --device cuda --min-run-time 0.5 --rounds 1
echo "gpu_check: done in $(( $(date +%s) - start )) s"
