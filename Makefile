# Two commands on a fresh clone: `make demo` (the main job) and `make test` (the suite).
# Both create/refresh .venv and install what they need, system packages included.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-packages
APT_PACKAGES := mosquitto mosquitto-clients mbpoll prometheus-alertmanager socat

.PHONY: demo test test-fast bench venv system clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

$(SYSTEM_STAMP): | $(BIN)/python
	@bash scripts/install-system-packages.sh $(APT_PACKAGES)
	@touch $(SYSTEM_STAMP)

system: $(SYSTEM_STAMP)

demo: venv system
	$(BIN)/podwatch demo $(ARGS)

test: venv system
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv system
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) data .pytest_cache
