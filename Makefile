# Every target creates the virtualenv it needs in .venv, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint check bench clean

$(BIN)/refresher: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

demo: $(BIN)/refresher  ## run the whole loop against a local IdP for a minute
	$(BIN)/refresher demo --duration 60

test: $(BIN)/refresher  ## the test suite
	$(BIN)/pytest

lint: $(BIN)/refresher  ## ruff and mypy
	$(BIN)/ruff check refresher tests bench
	$(BIN)/ruff format --check refresher tests bench
	$(BIN)/mypy refresher

check: lint test

bench: $(BIN)/refresher  ## benchmarks (several minutes): write window, overhead, scale, start-up
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
