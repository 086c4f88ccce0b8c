# Two commands do everything on a fresh machine:  make train   |   make test
# (each first runs `setup`: Debian's bible-kjv corpus, a virtualenv, torch, ds_accel with its dev extra).
# On a CUDA machine (with a CUDA torch in .venv): make gpu-check  (~10 minutes; writes docs/benchmark/gpu/).

VENV  ?= .venv
PY    := $(VENV)/bin/python
# CPU machines take PyTorch's CPU build; on a GPU box install your CUDA torch first (or set TORCH=).
TORCH ?= torch==2.13.0
SUDO  := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.ds_accel-installed

.PHONY: setup train test bench gpu-check
setup: $(STAMP)

$(STAMP): pyproject.toml
	command -v bible >/dev/null || $(SUDO) apt-get install -y -q bible-kjv || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q bible-kjv)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(VENV)/bin/ds-accel train --config default

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(VENV)/bin/ds-accel bench --out runs/bench

gpu-check: setup
	$(VENV)/bin/ds-accel gpu-check --out docs/benchmark/gpu
