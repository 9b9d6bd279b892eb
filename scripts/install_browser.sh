#!/usr/bin/env bash
# Set up the book build and the browser tests (`make book`, `make test-browser` call this after `make install`):
#
#   1. the `book` extra of pyproject.toml into ./.venv (jupyter-book 1, the offline MathJax, playwright), once
#      per version of that extra's list;
#   2. Debian's `chromium`, with apt-get, when /usr/bin/chromium is missing (skipped with --no-browser).
#
# Playwright drives that system browser (executable_path=/usr/bin/chromium); it never downloads one, so
# `playwright install` is not used. Needs root (or sudo) for apt-get; CI runs as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP=$VENV/.qlora-edu-book-installed
want_browser=1
[ "${1:-}" = "--no-browser" ] && want_browser=0

[ -x "$VENV/bin/python" ] || { echo "install_browser: no $VENV: run \`make install\` first" >&2; exit 1; }

# Reinstall only when the book extra itself changes (`make install` handles the course's own requirements).
want="$("$VENV/bin/python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]
  ["optional-dependencies"]["book"])' | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "install_browser: the book extra (jupyter-book<2, sphinx-mathjax-offline, playwright) into $VENV"
  start=$(date +%s)
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[book]" \
    2> >(grep -v "is neither a file nor a directory" >&2)
  echo "$want" > "$STAMP"
  echo "install_browser: book extra installed in $(( $(date +%s) - start )) s"
fi

[ "$want_browser" = 1 ] || exit 0
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: /usr/bin/chromium is missing and there is no apt-get: install Chromium yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install_browser: apt-get needs root (or sudo)" >&2; exit 1; }
  SUDO=sudo
fi
echo "install_browser: apt-get install chromium (Debian's package)"
start=$(date +%s)
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null | tail -1) installed in $(( $(date +%s) - start )) s"
