# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/skray demo

test: $(STAMP)
	$(BIN)/ruff check platform tests benchmarks pipelines
	$(BIN)/ruff format --check platform tests benchmarks pipelines
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python benchmarks/model_throughput.py

clean:
	rm -rf $(VENV) .skray
