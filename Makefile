# The README's commands. CI calls `make test` through .ci/run.
PY      := .venv/bin/python
# The CPU build of torch is pinned so a fresh machine does not pull a multi-GB CUDA wheel;
# on a GPU machine override it, e.g. `make setup TORCH_SPEC=torch==2.11.0`.
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PRESET  ?= tiny
STEPS   ?= 300

.PHONY: setup pretrain test test-gpu lint format bench clean

setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[data,hf,dev]"
	touch $@

pretrain: setup
	$(PY) -m fat5 pretrain --preset $(PRESET) --out runs/$(PRESET) --overwrite train.max_steps=$(STEPS)
	$(PY) -m fat5 generate --model runs/$(PRESET)/final --max-new-tokens 24 --demo

test: setup
	$(PY) -m pytest -q -n 2 --timeout=600 tests

test-gpu:
	python3 -m pytest -q -m gpu tests

lint: setup
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: setup
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

bench:
	bash benchmarks/run_gpu.sh

clean:
	rm -rf .venv runs build *.egg-info
