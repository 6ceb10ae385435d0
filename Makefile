# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when it is missing,
# install torch and the other dependencies into it, build the extension in place, then run their job.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.dmfast-installed
# Toolkit root for the CUDA builds (the folder with lib64/libcudart.so).
CUDA_HOME ?= $(firstword $(foreach d,/usr/local/cuda $(sort $(wildcard /usr/local/cuda-*)),$(if $(wildcard $(d)/lib64/libcudart.so),$(d))))
CUDA_ARCHS ?= 8.0;9.0
PYTEST_ARGS ?=
FUZZ_RUNS ?= 20
# A list read from pyproject.toml, the one source of the dependencies (tomllib, or pip's copy of it before 3.11).
PYPROJECT = $$($(PY) -c 'import sys; toml = __import__("tomllib") if sys.version_info >= (3, 11) else __import__("pip._vendor.tomli", fromlist=["load"]); t = toml.load(open("pyproject.toml", "rb")); print(*eval(sys.argv[1], {"t": t}))' $(1))

.PHONY: demo test fuzz build bench cuda-compile cmake-check sanitize ci clean

# The build tools (torch among them) first, then the package itself, editable, with its test extra: its
# dependencies come from pyproject.toml and the `dmfast` command lands in .venv/bin.
$(INSTALLED): pyproject.toml Makefile setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(call PYPROJECT,'t["build-system"]["requires"]')
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

# Incremental ninja builds of the extension into dmfast/.
build: $(INSTALLED)
	mkdir -p build && MAX_JOBS=2 $(PY) setup.py -q build_ext --inplace > build/ext.log 2>&1 || { cat build/ext.log; exit 1; }

demo: build
	$(VENV)/bin/dmfast demo --out out/demo --overwrite

# The deterministic suite (fixed seeds): what CI runs.
test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The tests that draw random inputs, FUZZ_RUNS times with fresh seeds; a failing seed is printed for replay
# (DMFAST_TEST_SEED=N make test). Not part of CI.
fuzz: build
	@for i in $$(seq $(FUZZ_RUNS)); do \
	  seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
	  echo "fuzz run $$i/$(FUZZ_RUNS): DMFAST_TEST_SEED=$$seed"; \
	  DMFAST_TEST_SEED=$$seed $(PY) -m pytest tests -m random_inputs -q -x -p no:cacheprovider $(PYTEST_ARGS) \
	    || { echo "fuzz: failed with DMFAST_TEST_SEED=$$seed"; exit 1; }; \
	done

bench: build
	$(PY) -m pip install -q $(call PYPROJECT,'t["project"]["optional-dependencies"]["bench"]')
	$(PY) -m benchmarks.affine_smooth
	$(PY) -m benchmarks.attention_cam
	$(PY) -m benchmarks.cam_boxes
	$(PY) -m benchmarks.predict
	$(PY) -m benchmarks.precision
	$(PY) -m benchmarks.data_loading
	$(PY) -m benchmarks.pipeline
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-only -q

# Compile (and link) the CUDA kernels for sm_80 and sm_90 without a GPU, into build-cuda/, so they never rot.
cuda-compile: $(INSTALLED)
	@test -n "$(CUDA_HOME)" || { echo "cuda-compile: no CUDA toolkit found (set CUDA_HOME)"; exit 1; }
	CUDA_HOME=$(CUDA_HOME) DMFAST_CUDA=1 DMFAST_CPU_VARIANTS=base TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" MAX_JOBS=2 \
	  $(PY) setup.py -q build_ext --build-temp build-cuda/temp --build-lib build-cuda/lib

# The CMake library against libtorch plus its C++ test.
cmake-check: $(INSTALLED)
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" cmake -S . -B build-cmake -G Ninja \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME)) \
	  -DCUDA_nvrtc_LIBRARY="$$($(PY) -c 'import glob, os, torch; print((glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "lib", "libnvrtc.so*")) + [""])[0])')"
	cmake --build build-cmake -j2
	ctest --test-dir build-cmake --output-on-failure

# The CPU kernels and their C++ test built with AddressSanitizer and UndefinedBehaviorSanitizer (build-sanitize/),
# then the test: any report fails it. Leak checking is off: libtorch keeps its registries until exit.
sanitize: $(INSTALLED)
	TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" cmake -S . -B build-sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDMFAST_SANITIZE=ON -DDMFAST_CPU_ARCH=none \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME)) \
	  -DCUDA_nvrtc_LIBRARY="$$($(PY) -c 'import glob, os, torch; print((glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "lib", "libnvrtc.so*")) + [""])[0])')"
	cmake --build build-sanitize -j2
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --test-dir build-sanitize --output-on-failure

ci:
	bash .ci/run

clean:
	rm -rf build build-cuda build-cmake build-sanitize dmfast/_C*.so *.egg-info
