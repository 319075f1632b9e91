# vidgen: `make demo` runs the whole pipeline on CPU; `make test` runs the tests.
# Both install into .venv first when needed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := outputs/demo
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: help install test test-slow demo bench lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install vidgen with its dev extras

test: $(STAMP)  ## run the test suite (slow tests skipped)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## run every test, the slow ones included
	$(PY) -m pytest -q -m ''

data/synthetic/train: | $(STAMP)
	$(PY) -m vidgen.data.synthetic --out data/synthetic --num-videos 512 --val-videos 32 \
		--size 64 --frames 17 --fps 8 --seed 0

demo: $(STAMP) data/synthetic/train  ## VAE stages 1-2 on bundled synthetic data (CPU, minutes)
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/vae_stage1 paths.run_dir=$(DEMO)/vae_stage1
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/vae_stage2 paths.run_dir=$(DEMO)/vae_stage2 \
		model.init_from=$(DEMO)/vae_stage1
	@echo "demo outputs: $(DEMO)/ (vae_stage1/, vae_stage2/: config.yaml, checkpoints/, samples/, csv/, vae/)"

bench: $(STAMP)  ## benchmarks against peer implementations (prints ratios)
	$(PY) bench/bench_data.py
	$(PY) bench/bench_vae.py
	$(PY) bench/bench_vae_stage3.py
	$(PY) bench/bench_dit.py

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check vidgen tests bench train.py eval.py

clean:  ## remove outputs and caches (keeps .venv and data)
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
