# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, so the package's `torch>=` range is already met; TORCH_SPEC picks another version, and
# TORCH_INDEX an index (https://download.pytorch.org/whl/cpu: the small CPU build where pip would pull CUDA).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_PIP_INDEX := $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
STAMP := $(VENV)/.offrl-installed
LINT_PATHS := offrl tests $(wildcard benchmarks experiments datasets)

.PHONY: setup demo test test-slow lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_INDEX) "$(TORCH_SPEC)" || $(PY) -m pip install -q $(TORCH_PIP_INDEX) "torch>=2.2"
	$(PY) -m pip install -q -e ".[dev,classic]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m offrl.demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	# exit 5 means no test was marked slow: not a failure
	$(PY) -m pytest -q -p no:cacheprovider -m slow -n 2 -rP --durations=15; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
