# Two commands set up a fresh machine: `make demo` and `make test`.
# Each builds .venv on first use: the CPU torch wheel first (otherwise pip pulls a multi-GB
# CUDA build), then forgenb with its dev tools.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS := 1
export PYTHONHASHSEED := 0

.PHONY: demo test sync nbtest pytest env browser clean

$(VENV)/.ok: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

env: $(VENV)/.ok

# The browser tests drive Debian's Chromium through the playwright package (never its own browser download).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v chromium >/dev/null || { echo "chromium is needed for the browser tests: apt-get install -y chromium"; exit 1; }

# The main job on the embedded default: built-in sample data, a tiny model built from a config, CPU.
demo: env
	FORGENB_HOME=$${FORGENB_HOME:-$(CURDIR)/demo_workspace} $(BIN)/forgenb demo

# The sync check, the notebooks' own tests, then pytest (whose summary line closes the run).
test: env browser sync nbtest pytest

sync: env
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-export
	git diff --exit-code
	@test -z "$$(git status --porcelain)" || { git status --porcelain; echo "untracked or changed files after the sync check"; exit 1; }

nbtest: env
	$(BIN)/nbdev-test --n-workers 2

pytest: env
	$(BIN)/pytest -n 2 --dist loadgroup tests

clean:
	rm -rf $(VENV) demo_workspace
