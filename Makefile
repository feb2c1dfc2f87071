# Two commands set up and use a fresh machine: `make demo` and `make test`.
# Both create the virtual environment in .venv when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAB_PORT ?= 8888

.PHONY: demo test lint typecheck unit chromium lab bench clean-env

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/workbench run params/demo.yaml

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check workbench tests notebooks
	$(BIN)/ruff format --check workbench tests notebooks

typecheck: $(STAMP)
	$(BIN)/mypy workbench

# the browser tests (pytest -m browser) drive Debian's chromium; installed here when missing
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the browser tests will be skipped"

unit: $(STAMP) chromium
	$(BIN)/pytest

# RUN=reports/<experiment>/<run-id> opens the notebooks on that run; the token comes from JUPYTER_TOKEN or is
# generated, and travels in the environment (never on the command line).
lab: $(STAMP)
	$(BIN)/workbench lab $(RUN) --port $(LAB_PORT)

bench: $(STAMP)
	$(BIN)/workbench bench all

clean-env:
	rm -rf $(VENV)
