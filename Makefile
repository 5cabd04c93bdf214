# Quick start: `make run` (set up + run the embedded default), `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION     := 2.13.0
DEEPSPEED_VERSION := 0.19.8
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

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

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
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
