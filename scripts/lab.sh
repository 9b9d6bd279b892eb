#!/usr/bin/env bash
# Open JupyterLab on the course: `make lab` runs this after installing.
#
# The server's root is the repository itself, so the lessons (notebooks/), the exercises (exercises/) and the
# solutions (solutions/) are all in the file browser, and a lesson's "Your turn" link to ../exercises/... opens.
# The first tab is the README, rendered (the course map, with a link to every chapter): a JupyterLab setting
# that scripts/install.sh writes into .venv makes Markdown files open in the rendered preview.
# Extra arguments go to `jupyter lab` (e.g. --no-browser --port 8899).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
args=(--ServerApp.root_dir="$root" --LabApp.default_url=/lab/tree/README.md)
# Jupyter refuses to run as root without --allow-root; containers and cloud machines often are root.
[ "$(id -u)" = 0 ] && args+=(--allow-root)
exec .venv/bin/jupyter lab "${args[@]}" "$@"
