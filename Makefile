# The README's commands. `make demo` and `make test` install everything on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; an unpinned torch would pull a multi-GB CUDA build. Override on GPU hosts.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/hubert-ray demo

# Test files run on TEST_WORKERS processes (pytest-xdist), each file whole in one of them: most
# of the suite waits (Ray starting, subprocesses, killed jobs), so two overlap on two cores.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The whole suite, every tier (what CI runs): tests/unit, tests/ray, tests/integration, tests/gpu.
test: install
	$(PYTEST)

# The unit tier only: no Ray, no subprocess, no S3 server (about a minute on two cores).
test-fast: install
	$(PYTEST) tests/unit

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf demo_out .pytest_cache
