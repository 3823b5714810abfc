# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs nonn with all extras, runs the whole pipeline on digits
#   make test   same environment, runs the test suite
# Two more check the version ranges setup.cfg states, each in its own environment:
#   make test-floors   every dependency at its floor (constraints/floors.txt), then the suite
#   make test-newest   every dependency at its newest release, then the suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch; override with TORCH_SPEC="torch==X.Y" for another build.
TORCH_SPEC ?= torch==2.13.0

FLOORS_VENV ?= .venv-floors
NEWEST_VENV ?= .venv-newest
# The floors run takes PyTorch's floor from constraints/floors.txt (from PyPI, a CUDA build of
# several GB); FLOORS_TORCH_SPEC="torch==2.13.0" runs the other floors with a local CPU build.
FLOORS_TORCH_SPEC ?= $(shell grep '^torch==' constraints/floors.txt)

.PHONY: env demo test test-floors test-newest clean

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

$(FLOORS_VENV)/.installed: setup.cfg pyproject.toml constraints/floors.txt
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install --quiet --upgrade pip
	grep -v '^torch==' constraints/floors.txt > $(FLOORS_VENV)/constraints.txt
	$(FLOORS_VENV)/bin/pip install --quiet -c $(FLOORS_VENV)/constraints.txt "$(FLOORS_TORCH_SPEC)" -e '.[all]'
	touch $@

$(NEWEST_VENV)/.installed: setup.cfg pyproject.toml constraints/newest.txt
	rm -rf $(NEWEST_VENV)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/pip install --quiet --upgrade --upgrade-strategy eager -c constraints/newest.txt "$(TORCH_SPEC)" -e '.[all]'
	touch $@

test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_VENV)/bin/pip freeze --exclude-editable
	$(FLOORS_VENV)/bin/python -m pytest

test-newest: $(NEWEST_VENV)/.installed
	$(NEWEST_VENV)/bin/pip freeze --exclude-editable
	$(NEWEST_VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) $(FLOORS_VENV) $(NEWEST_VENV) nonn-demo build *.egg-info
