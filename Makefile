# Two entry points (see README.md):
#   make demo   set up .venv, then run the whole workflow on the embedded synthetic atlas
#   make test   set up .venv, then run the test suite
# TORCH: the PyTorch requirement installed before the package; GPU users may pre-install their own build
# (an importable torch is kept as is).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
CORES ?= all

.PHONY: demo test setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --cores $(CORES)

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest
