# The course's commands. The two that matter:
#   make lab    install everything into ./.venv, then open JupyterLab on the course
#   make test   install the same, then run the whole test suite (what CI runs)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qlora-edu-installed
# Short mode for the long notebook runs (perplexity, training): same code, smaller budgets.
SMOKE  ?= 1

.PHONY: lab test test-gpu gpu-check install lint exercises readme execute check-exercises bench book test-browser

install:
	@bash scripts/install.sh

# JupyterLab with the repository as its root, opening on the README (the course map); see scripts/lab.sh.
lab: install
	bash scripts/lab.sh

# Two pytest workers with one torch thread each, on two cores (more threads than cores stall torch's kernels).
test: install lint
	$(PY) scripts/notebook_builder.py check
	OMP_NUM_THREADS=1 QLORA_EDU_SMOKE=$(SMOKE) $(PY) -m pytest -n 2 --dist loadfile \
		--nbval-lax --nbval-cell-timeout=900 tests notebooks solutions

lint: install
	$(VENV)/bin/ruff check qlora_edu tests benchmarks scripts exercises/src notebooks solutions
	$(VENV)/bin/codespell README.md qlora_edu exercises/src jupyter_book tests --skip '*.ipynb'
	$(PY) scripts/notebook_builder.py sources notebooks/*.ipynb solutions/*.ipynb | $(VENV)/bin/codespell -

# Regenerate exercises/*.ipynb and solutions/*.ipynb from exercises/src/*.py and the package, and the README's
# course table from the chapter manifests: everything a new chapter's files generate.
exercises: install readme
	$(PY) scripts/notebook_builder.py build

# Re-run notebooks top to bottom and save their outputs (full mode, SMOKE=0). Commit the result.
execute: install
	QLORA_EDU_SMOKE=0 $(PY) scripts/notebook_builder.py execute notebooks/*.ipynb solutions/*.ipynb

# Check your own exercise code: every exercise notebook through the test battery.
check-exercises: install
	$(PY) -m qlora_edu.checks exercises

# The CUDA tests alone (`gpu` marker), in the test files of the chapters whose manifest declares gpu_tests
# (qlora_edu/chNN_name/__init__.py). Needs only torch, bitsandbytes, pytest and hypothesis, so it also runs on a GPU
# machine without the course's environment: make test-gpu PYTHON_GPU=python3 (the list itself needs no torch).
PYTHON_GPU ?= $(PY)
test-gpu:
	$(PYTHON_GPU) -m pytest -m gpu -p no:cacheprovider $(shell $(PYTHON_GPU) -m qlora_edu.common.chapters gpu-tests)

# The course's own checks on a CUDA machine, beyond pytest: scripts/gpu_check.py (see its docstring for what it
# runs and what it writes). Same interpreter rule as test-gpu: make gpu-check PYTHON_GPU=python3
gpu-check:
	$(PYTHON_GPU) scripts/gpu_check.py

# Each chapter's benchmarks (the `benchmarks` of its manifest), once each, in course order: the course's code side by
# side with its reference (speed against bitsandbytes, torch, peft; chapter 4's memory formula against measured
# memory). Each prints its comparison.
bench: install
	@set -e; for script in $(shell $(PY) -m qlora_edu.common.chapters benchmarks); do \
		echo "== $$script"; $(PY) $$script; done

# Regenerate the README's course table from the chapter manifests (tests/test_chapters.py fails when it is stale).
readme: install
	$(PY) -m qlora_edu.common.chapters readme

# The book (Jupyter Book 1, offline, warnings are errors) -> jupyter_book/_build/html. Installs the `book` extra once.
book: install
	@bash scripts/install_browser.sh --no-browser
	$(PY) scripts/build_book.py --clean

# The built book and JupyterLab in headless Chromium (Debian's chromium, apt-get installed when missing).
# Two workers: the book's pages in one, JupyterLab running chapter 1 (mostly kernel time) in the other. These tests
# need neither tests/conftest.py (it imports torch) nor the notebook plugins: --confcutdir and -p no:... skip them
# (15 s less start-up a process on a busy machine). Screenshots: jupyter_book/_build/screenshots/.
test-browser: book
	@bash scripts/install_browser.sh
	OMP_NUM_THREADS=1 QLORA_EDU_SMOKE=$(SMOKE) $(PY) -m pytest -m browser -n 2 --dist loadfile \
		--confcutdir=tests/browser -p no:cacheprovider -p no:nbval -p no:hypothesispytest -p no:anyio tests/browser
