# relaypipe — two commands on a fresh machine:
#   make run    set up .venv if needed, then `dvc repro` the default (micro) preset, with one
#               local Prefect server for all its stages (python -m flows repro; see
#               docs/orchestration.md). Extra dvc repro arguments: make run ARGS="-f grpo"
#               Another preset: make run PRESET=smollm2-cpu (sets `preset:` in params.yaml,
#               which dvc exp show records; PRESET=micro goes back to the default)
#   make test   set up .venv if needed, then the test suite
#   make lock   refresh constraints.txt (the exact versions setup installs and CI tests) from a
#               fresh, unconstrained install of pyproject.toml's ranges
#
# TORCH_SPEC picks the torch build installed before everything else. The default is the
# CPU build; on a GPU machine override it, e.g. `make run TORCH_SPEC="torch==2.13.0"` with
# PIP_EXTRA_INDEX_URL pointing at the CUDA wheels you want.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PRESET ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.relaypipe-installed

.PHONY: run test lint setup lock clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m flows.plots --if-missing || echo "warning: no offline plots template; dvc plots show needs internet"
	touch $(STAMP)

# torch is left out of the lock: TORCH_SPEC chooses its build (CPU here, CUDA on a GPU machine).
LOCK_VENV := $(shell mktemp -u /tmp/relaypipe-lock.XXXXXX)
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[test]"
	{ sed -n '1,3p' constraints.txt; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+-cu[0-9]+)=='; \
	} > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)

run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" python -m flows repro $(if $(PRESET),--preset $(PRESET)) $(ARGS)

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
