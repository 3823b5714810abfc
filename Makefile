# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs nonn with all extras, runs the whole pipeline on digits
#   make test   same environment, runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch; override with TORCH_SPEC="torch==X.Y" for another build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: env demo test clean

env: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[all]'
	touch $@

demo: env
	$(BIN)/nonn demo --out nonn-demo

test: env
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) nonn-demo build *.egg-info
