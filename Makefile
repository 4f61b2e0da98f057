# Two entry points: `make demo` and `make test`. Both create or refresh .venv and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins: the wheels that lie on the development machine; override for other platforms,
# e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# One stamp per torch spec, so that `make test TORCH=...` reinstalls.
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: demo test lint format venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[train,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cnc demo --out demo_out

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
