# Quick start: `make run` (set up + run the embedded default), `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION     := 2.13.0
DEEPSPEED_VERSION := 0.19.8
STAMP  := $(VENV)/.installed

.PHONY: setup chromium run test test-fast bench clean

setup: $(STAMP)

# Headless Chromium: the status page's browser test. Debian's package, installed here like every
# other dependency (as root, e.g. CI and the container; elsewhere it says what to run).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	      || { echo "could not install chromium (apt-get install chromium)"; exit 1; }; \
	  else echo "chromium is missing: run 'sudo apt-get install chromium' (the status page's browser test needs it)"; exit 1; fi

# torch first and pinned (constraints keep every later install from replacing it: an unpinned torch
# pulls several GB of CUDA wheels), then the stack, then deepspeed built against that torch.
$(STAMP): requirements.txt requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3 wheel==0.48.0 setuptools==84.2.1
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -c $(VENV)/constraints.txt deepspeed==$(DEEPSPEED_VERSION)
	touch $(STAMP)

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./trainer.sh

test: setup chromium
	$(PY) -m pytest -q tests

test-fast: setup chromium
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) bench/throughput.py --corpus data/pretrain.jsonl
	$(PY) bench/prep_throughput.py
	$(PY) bench/pipeline.py
	$(PY) bench/quant.py
	$(PY) bench/memory.py
	$(PY) bench/resume.py
	$(PY) bench/hub_faults.py

clean:
	rm -rf work output
