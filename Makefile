# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The CPU build of torch goes in first: an unpinned torch would pull gigabytes of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mdlens-installed
DEMO_OUT ?= results

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

# One intra-op thread: the analyses are many small tensor ops, which two threads slow down
# (they spin-wait on each other; 10-100x on a busy 2-core machine). ~2 min on 2 cores.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/mdlens reproduce estimators --out $(DEMO_OUT)/estimators

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/mdlens bench

clean-venv:
	rm -rf $(VENV)
