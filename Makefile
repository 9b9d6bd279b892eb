# The course's commands. The two that matter:
#   make lab    install everything into ./.venv, then open JupyterLab on the course
#   make test   install the same, then run the whole test suite (what CI runs)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qlora-edu-installed
# Short mode for the long notebook runs (perplexity, training): same code, smaller budgets.
SMOKE  ?= 1

.PHONY: lab test install lint exercises execute check-exercises bench book clean-cache

install:
	@bash scripts/install.sh

# (Jupyter refuses to run as root without --allow-root; containers and cloud machines often are root.)
lab: install
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/00_tour.ipynb

test: install lint
	$(PY) -m qlora_edu.notebook_builder check
	QLORA_EDU_SMOKE=$(SMOKE) $(PY) -m pytest -n 2 --dist loadfile \
		--nbval-lax --nbval-cell-timeout=900 tests notebooks solutions

lint: install
	$(VENV)/bin/ruff check qlora_edu tests benchmarks exercises/src notebooks solutions
	$(VENV)/bin/codespell README.md qlora_edu exercises/src jupyter_book tests --skip '*.ipynb'
	$(PY) -m qlora_edu.notebook_builder sources notebooks/*.ipynb solutions/*.ipynb | $(VENV)/bin/codespell -

# Regenerate exercises/*.ipynb and solutions/*.ipynb from exercises/src/*.py and the package.
exercises: install
	$(PY) -m qlora_edu.notebook_builder build

# Re-run notebooks top to bottom and save their outputs (full mode, SMOKE=0). Commit the result.
execute: install
	QLORA_EDU_SMOKE=0 $(PY) -m qlora_edu.notebook_builder execute notebooks/*.ipynb solutions/*.ipynb

# Check your own exercise code: every exercise notebook through the test battery.
check-exercises: install
	$(PY) -m qlora_edu.checks exercises

bench: install
	$(PY) benchmarks/bench_nf4.py
