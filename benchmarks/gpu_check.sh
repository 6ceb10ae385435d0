#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build dmfast with its CUDA kernels, run the CUDA tests, then the kernel
# benchmarks on the GPU and the ops' bandwidth against the copy bandwidth, printing their tables (JSON under
# benchmarks/results/, copied to $OUT when set), and a 512-px ResNet-50's training throughput. Meant to finish in
# < 8 minutes.
#   bash benchmarks/gpu_check.sh                   (uses .venv, created by `make` if missing)
#   PY=python3 bash benchmarks/gpu_check.sh        (a python that already holds torch, e.g. on a machine offline)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  if "$PY" -c 'import torch' 2>/dev/null; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  else
    TORCH_CUDA_ARCH_LIST="8.0;9.0"
  fi
fi
export TORCH_CUDA_ARCH_LIST DMFAST_CUDA=1 PYTHONUNBUFFERED=1
start=$(date +%s)
if [ "$PY" = .venv/bin/python ]; then
  make build
else  # no registry to install from: build in place against that python's torch; dmfast.cli lives in cli/
  [ -e dmfast/cli ] || { ln -s ../cli dmfast/cli && trap 'rm -f dmfast/cli' EXIT; }
  # The system compiler (the one torch's wheels are built with), not a $CXX elsewhere: on one GPU image $CXX
  # linked libstdc++ statically into _C, and every error message with a number then crashed in std::ostream.
  export CC=cc CXX=c++
  mkdir -p build && MAX_JOBS=$(nproc) "$PY" setup.py -q build_ext --inplace > build/ext.log 2>&1 || { cat build/ext.log; exit 1; }
fi
echo "gpu_check: built in $(( $(date +%s) - start )) s"
ldd dmfast/_C*.so | grep -q libstdc++ || echo "gpu_check: WARNING: _C links no shared libstdc++ (static copy): errors may crash"
"$PY" -c 'import dmfast, torch; assert dmfast._C.built_with_cuda() and torch.cuda.is_available(), "no CUDA build/GPU"; print("GPU:", torch.cuda.get_device_name(), "torch", torch.__version__)'
timeout 300 "$PY" -m pytest tests -q -k "cuda" -p no:cacheprovider -o addopts="-ra" || echo "gpu_check: CUDA TESTS FAILED"
"$PY" -m benchmarks.gpu_bandwidth
"$PY" -m benchmarks.affine_smooth --device cuda --min-run-time 0.5
"$PY" -m benchmarks.attention_cam --device cuda --min-run-time 0.5 --skip-literal
"$PY" -m benchmarks.cam_boxes --device cuda --min-run-time 0.5 --rounds 1
"$PY" -m benchmarks.train_throughput --device cuda  # ResNet-50 at 512 px, bf16, the loader: data-bound or not
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*-cuda.json "$OUT"/ 2>/dev/null || true; fi
echo "gpu_check: done in $(( $(date +%s) - start )) s"
