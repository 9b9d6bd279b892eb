# The course's commands. The two that matter:
#   make lab    install everything into ./.venv, then open JupyterLab on the course
#   make test   install the same, then run the whole test suite (what CI runs)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qlora-edu-installed
# Short mode for the long notebook runs (perplexity, training): same code, smaller budgets.
SMOKE  ?= 1

.PHONY: lab test test-gpu install lint exercises execute check-exercises bench book test-browser

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

# Regenerate exercises/*.ipynb and solutions/*.ipynb from exercises/src/*.py and the package.
exercises: install
	$(PY) scripts/notebook_builder.py build

# Re-run notebooks top to bottom and save their outputs (full mode, SMOKE=0). Commit the result.
execute: install
	QLORA_EDU_SMOKE=0 $(PY) scripts/notebook_builder.py execute notebooks/*.ipynb solutions/*.ipynb

# Check your own exercise code: every exercise notebook through the test battery.
check-exercises: install
	$(PY) -m qlora_edu.checks exercises

# The CUDA tests alone (`gpu` marker). Needs only torch, bitsandbytes, pytest and hypothesis, so it also runs on a
# GPU machine without the course's environment: make test-gpu PYTHON_GPU=python3
PYTHON_GPU ?= $(PY)
test-gpu:
	$(PYTHON_GPU) -m pytest -m gpu -p no:cacheprovider tests/test_01_absmax.py tests/test_02_nf4.py \
		tests/test_03_double_quant.py tests/test_07_qlora.py tests/test_08_finetune.py

# Speed side by side with the reference libraries (each prints its ratio): NF4 (de)quantization vs bitsandbytes,
# the optimizers vs torch / bitsandbytes, a QLoRA training step vs peft + bitsandbytes.
bench: install
	$(PY) benchmarks/bench_nf4.py
	$(PY) benchmarks/bench_optimizers.py
	$(PY) benchmarks/bench_qlora.py

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
