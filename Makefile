# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is missing,
# install torch and the other dependencies into it, build the extension in place, then run their job.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
DEPS := $(VENV)/.dmfast-deps
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Toolkit root for the CUDA builds (the folder with lib64/libcudart.so).
CUDA_HOME ?= $(firstword $(foreach d,/usr/local/cuda $(sort $(wildcard /usr/local/cuda-*)),$(if $(wildcard $(d)/lib64/libcudart.so),$(d))))
CUDA_ARCHS ?= 8.0;9.0
PYTEST_ARGS ?=

.PHONY: demo test build bench cuda-compile cmake-check ci clean

$(DEPS): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q "setuptools>=77" wheel ninja pybind11 numpy scipy pillow click rich pytest pytest-benchmark
	touch $@

EDITABLE := $(VENV)/.dmfast-editable

# Editable install once (the `dmfast` command lands in .venv/bin); later builds are incremental ninja runs that
# put the extension into dmfast/.
$(EDITABLE): $(DEPS) setup.py
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(EDITABLE)
	mkdir -p build && MAX_JOBS=2 $(PY) setup.py -q build_ext --inplace > build/ext.log 2>&1 || { cat build/ext.log; exit 1; }

demo: build
	$(VENV)/bin/dmfast demo --out out/demo

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: build
	$(PY) -m pip install -q opencv-python-headless
	$(PY) -m benchmarks.affine_smooth
	$(PY) -m benchmarks.attention_cam
	$(PY) -m benchmarks.cam_boxes
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-only -q

# Compile (and link) the CUDA kernels for sm_80 and sm_90 without a GPU, into build-cuda/, so they never rot.
cuda-compile: $(DEPS)
	@test -n "$(CUDA_HOME)" || { echo "cuda-compile: no CUDA toolkit found (set CUDA_HOME)"; exit 1; }
	CUDA_HOME=$(CUDA_HOME) DMFAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=2 \
	  $(PY) setup.py -q build_ext --build-temp build-cuda/temp --build-lib build-cuda/lib

# The CMake library against libtorch plus its C++ test.
cmake-check: $(DEPS)
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" cmake -S . -B build-cmake -G Ninja \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME)) \
	  -DCUDA_nvrtc_LIBRARY="$$($(PY) -c 'import glob, os, torch; print((glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "lib", "libnvrtc.so*")) + [""])[0])')"
	cmake --build build-cmake -j2
	ctest --test-dir build-cmake --output-on-failure

ci: cuda-compile cmake-check test

clean:
	rm -rf build build-cuda build-cmake dmfast/_C*.so *.egg-info
