# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The CPU build of torch goes in first: an unpinned torch would pull gigabytes of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mdlens-installed
DEMO_OUT ?= results

.PHONY: demo test bench notebooks clean-venv

# pip installs without byte-compiling every file it unpacks (half the install's time: torch and
# transformers are thousands of modules, most never imported); Python writes the bytecode of what
# is imported on first use instead, which an environment with PYTHONDONTWRITEBYTECODE set would
# forbid (every later import would then recompile: TransformerLens takes 30 s instead of 13).
export PYTHONDONTWRITEBYTECODE :=
PIP_INSTALL := $(PY) -m pip install --no-compile
# The set-up ends by importing the analyses once: that writes the bytecode of what they import
# (TransformerLens, transformers, torch, matplotlib), which the first command would otherwise compile,
# once in each of the demo's processes (about 10 s).
WARM_IMPORTS := import mdlens.analyses.alignment, mdlens.analyses.mechanisms, mdlens.analyses.causal_two_step, \
	mdlens.analyses.trained, mdlens.analyses.step_sizes, mdlens.analyses.estimator_comparison, mdlens.analyses.report

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[dev]"
	$(PY) -c "$(WARM_IMPORTS)"
	touch $(STAMP)

# glibc's malloc hands large freed blocks back to the kernel, so each big tensor of a forward pass
# lands on fresh pages that are faulted in and zeroed (mdlens.analyses.bench.models measures it:
# a 5-layer disentangled forward at batch 512, T = 192 runs 2.6x faster with freed memory kept).
# The demo and the tests keep it for reuse (a higher resident memory, the same numbers).
KEEP_FREED_MEMORY := GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184

# The whole reproduction (every analysis, its figures, REPORT.md) on both cores: the analyses in two
# processes (`--jobs 2`: the stages that share batches stay together; the numbers are those of one
# process), the four notebooks beside them. The README gives the time measured from a fresh clone.
# `make demo DEMO_FLAGS=--quick` is the smoke version (small, noisy sizes, no notebooks).
# One intra-op thread per process: the analyses are many small tensor ops, which two threads slow
# down (they spin-wait on each other; 10-100x on a busy 2-core machine).
# The full demo executes the four notebooks into $(DEMO_OUT)/notebooks/*.html (every output and
# figure, for readers of the repository, whose notebooks carry none); REPORT.md links them.
DEMO_FLAGS ?=
DEMO_JOBS ?= 2
NOTEBOOK_HTML := $(DEMO_OUT)/notebooks
NOTEBOOKS_TO_HTML := OMP_NUM_THREADS=1 $(KEEP_FREED_MEMORY) $(VENV)/bin/jupyter nbconvert --to html --execute --output-dir $(NOTEBOOK_HTML) notebooks/*.ipynb
REPRODUCE_ALL := OMP_NUM_THREADS=1 $(KEEP_FREED_MEMORY) $(VENV)/bin/mdlens reproduce all $(DEMO_FLAGS) --jobs $(DEMO_JOBS) --out $(DEMO_OUT)
# The report links the notebooks' HTML it finds, so it is written again once they are done (seconds).
REPORT_AGAIN := $(VENV)/bin/mdlens reproduce report --out $(DEMO_OUT)
demo: $(STAMP)
	$(if $(findstring --quick,$(DEMO_FLAGS)),$(REPRODUCE_ALL),$(NOTEBOOKS_TO_HTML) & notebooks=$$!; $(REPRODUCE_ALL) && wait $$notebooks && $(REPORT_AGAIN))
	@echo "[mdlens] report: $(DEMO_OUT)/REPORT.md"

# lint-imports checks the one-way flow (.importlinter) on a tree of links with the installed layout,
# mdlens/ with hooks/ and analyses/ inside it (why: the comment at the top of .importlinter).
IMPORT_TREE := $(VENV)/import-tree
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(IMPORT_TREE) && mkdir -p $(IMPORT_TREE)/mdlens
	ln -s $(CURDIR)/mdlens/* $(IMPORT_TREE)/mdlens/
	ln -s $(CURDIR)/hooks $(CURDIR)/analyses $(IMPORT_TREE)/mdlens/
	cd $(IMPORT_TREE) && $(CURDIR)/$(VENV)/bin/lint-imports --no-cache $(CURDIR)/.importlinter
	$(KEEP_FREED_MEMORY) $(PY) -m pytest

# JupyterLab on notebooks/ with the project's environment (the optional `notebooks` extra).
notebooks: $(STAMP)
	$(PIP_INSTALL) -e ".[dev,notebooks]"
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(VENV)/bin/mdlens bench

clean-venv:
	rm -rf $(VENV)
