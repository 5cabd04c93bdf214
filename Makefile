# Quick start: `make run` (set up + run the embedded default), `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup chromium run test test-fast bench bench-env bench-convert gpu-wheels gpu-check gpu-dry-run clean

setup: $(STAMP)

# Headless Chromium: the status page's browser test. Debian's package, installed here like every
# other dependency (as root, e.g. CI and the container; elsewhere it says what to run).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	      || { echo "could not install chromium (apt-get install chromium)"; exit 1; }; \
	  else echo "chromium is missing: run 'sudo apt-get install chromium' (the status page's browser test needs it)"; exit 1; fi

# Versions: requirements*.txt, and constraints.txt for what is installed outside them. torch first
# (the constraints keep every later install from replacing it: an unpinned torch pulls several GB
# of CUDA wheels), then the stack, then deepspeed built against that torch.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip wheel setuptools
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt deepspeed
	touch $(STAMP)

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./trainer.sh

# The suite runs on one pytest-xdist worker per core (at most 4; TEST_WORKERS=1 runs it in one
# process), the cores shared out between them (tests/conftest.py); an idle worker takes tests
# queued on a busy one (worksteal), so the long end-to-end tests do not end up queued on one.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test: setup chromium
	$(PYTEST) tests

test-fast: setup chromium
	$(PYTEST) -m "not slow" tests

bench: setup
	$(PY) bench/throughput.py --corpus data/pretrain.jsonl
	$(PY) bench/prep_throughput.py
	$(PY) bench/streaming.py
	$(PY) bench/packing.py
	$(PY) bench/pipeline.py
	$(PY) bench/quant.py
	$(PY) bench/memory.py
	$(PY) bench/resume.py
	$(PY) bench/hub_faults.py

# bench/convert.py runs GGUF files in llama.cpp: llama-cpp-python, built from PyPI (a C++ build of
# ~10 minutes on 2 cores) in an environment of its own, not the pipeline's. Built for AVX2 rather
# than -march=native: a CPU that lists AMX while the kernel does not enable it (a VM) would get
# AMX q8_0 kernels that die with SIGILL.
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
.venv-bench/.installed:
	$(PYTHON) -m venv .venv-bench
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" .venv-bench/bin/python -m pip install -q --no-cache-dir \
	  llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	touch $@
bench-env: .venv-bench/.installed
bench-convert: setup bench-env
	$(PY) bench/convert.py --llama-python .venv-bench/bin/python

# bench/gpu.sh on a machine with NVIDIA GPUs, its own CUDA torch and no network: the libraries it
# lacks, as wheels for its Python (GPU_PYTHON), in .whl/ (~48 MB): ours at the pins, their own
# dependencies at the versions installed here, deepspeed built here without compiled ops. Carry .whl/
# to that machine beside the checkout; bench/gpu.sh installs them there.
GPU_PYTHON ?= 3.12
GPU_WHEEL_PACKAGES := trl peft bitsandbytes datasets dill multiprocess pydantic pydantic_core pydantic-settings \
                      annotated-types typing_inspection python-dotenv hjson
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$($(PY) -c "import importlib.metadata as m; print(*(f'{n}=={m.version(n)}' for n in '$(GPU_WHEEL_PACKAGES)'.split()))")
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --no-build-isolation -c constraints.txt deepspeed -w .whl
	@ls .whl; du -sh .whl

# The GPU checks (needs a GPU), and their flow on this machine without one (small sizes, CPU).
gpu-check:
	bench/gpu.sh
gpu-dry-run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHON=$(PY) GPU_WHEELS=/nonexistent bench/gpu.sh --dry-run

clean:
	rm -rf work output
