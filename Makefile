# Every target creates the virtualenv it needs in .venv, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# The locks, written by `make lock` from pyproject.toml (which keeps its ranges for library
# users): every package at one exact version with the sha256 of each of its files on PyPI, in
# one universal resolution valid for CPython 3.11 (CI, the floor of requires-python) and 3.12
# (the image) on any platform. requirements.lock is the runtime's (the Dockerfile);
# requirements-dev.lock adds the `test` extra (this virtualenv, so CI) and pins the runtime
# packages to the same versions as requirements.lock.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
# The oldest Python the universal resolution must hold for (requires-python's floor); newer
# ones are covered by the same resolution.
LOCK_PYTHON := 3.11
# The lock tool, and the installer the virtualenv upgrades itself to (neither is a dependency
# of the project, so neither is in the locks).
UV_VERSION := 0.13.9
PIP_VERSION := 26.3
INDEX_URL ?= https://pypi.org/simple

# pip and uv fetch from $(INDEX_URL) alone: no pip configuration file is read (PIP_CONFIG_FILE
# set to /dev/null skips them all) and the environment's index, find-links and constraint
# settings are dropped. The locks hold the hashes of PyPI's files: a file of the same version
# from a local mirror or wheel folder (rebuilt, so hashed differently) would fail
# --require-hashes. Certificates, proxies and timeouts still apply.
PIP_ENV := env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_NO_INDEX \
	-u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null
PIP := $(PIP_ENV) $(BIN)/python -m pip
PIP_INSTALL := $(PIP) install --quiet --index-url $(INDEX_URL)

.PHONY: demo test lint check bench lock clean

# The virtualenv is made from scratch whenever the dev lock changes, so it holds exactly the
# lock (a package dropped from the lock leaves it too); the copy of the lock inside it records
# what it was made from.
$(VENV)/$(DEV_LOCK): $(DEV_LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	$(PIP_INSTALL) pip==$(PIP_VERSION)
	$(PIP_INSTALL) --require-hashes -r $(DEV_LOCK)
	cp $(DEV_LOCK) $@

# Then the project itself, editable and without dependencies. `pip check` fails when
# pyproject.toml asks for a package or range the lock does not provide: run `make lock`.
$(BIN)/refresher: $(VENV)/$(DEV_LOCK) pyproject.toml
	$(PIP_INSTALL) --no-deps -e .
	$(PIP) check
	@touch $@

demo: $(BIN)/refresher  ## run the whole loop against a local IdP for a minute
	$(BIN)/refresher demo --duration 60

test: $(BIN)/refresher  ## the test suite
	$(BIN)/pytest

lint: $(BIN)/refresher  ## ruff and mypy
	$(BIN)/ruff check refresher tests bench testdoubles
	$(BIN)/ruff format --check refresher tests bench testdoubles
	$(BIN)/mypy refresher testdoubles bench

check: lint test

bench: $(BIN)/refresher  ## benchmarks (several minutes): write window, overhead, scale, start-up
	$(BIN)/python -m bench

# uv, at a pinned version, in a throwaway virtualenv of its own under .tools/ (gitignored).
UV_VENV := .tools/uv-$(UV_VERSION)
UV := $(UV_VENV)/bin/uv
$(UV):
	$(PYTHON) -m venv --clear $(UV_VENV)
	$(PIP_ENV) $(UV_VENV)/bin/python -m pip install --quiet --index-url $(INDEX_URL) \
		uv==$(UV_VERSION)

UV_COMPILE := env -u UV_INDEX_URL -u UV_EXTRA_INDEX_URL -u UV_DEFAULT_INDEX -u UV_INDEX \
	-u UV_FIND_LINKS -u UV_NO_INDEX $(UV) pip compile --quiet --no-config --system-certs \
	--default-index $(INDEX_URL) --universal --python-version $(LOCK_PYTHON) --generate-hashes \
	--custom-compile-command 'make lock' pyproject.toml

# Pins already in the locks are kept where pyproject.toml still allows them, so adding a
# dependency changes only what it needs; `make lock UPGRADE=1` moves everything to the newest
# allowed versions. The runtime lock is constrained by the dev lock: the image runs exactly
# the versions CI tested.
lock: $(UV)  ## rewrite requirements.lock and requirements-dev.lock from pyproject.toml
	$(UV_COMPILE) $(if $(UPGRADE),--upgrade) --extra test -o $(DEV_LOCK)
	$(UV_COMPILE) $(if $(UPGRADE),--upgrade) --constraint $(DEV_LOCK) -o $(LOCK)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
