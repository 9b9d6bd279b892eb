"""Build the course's book: ``make book`` -> ``jupyter_book/_build/html``.

    .venv/bin/python scripts/build_book.py            # incremental build, warnings are errors
    .venv/bin/python scripts/build_book.py --clean    # from scratch (what CI does)

Jupyter Book 1 (Sphinx) with the repository root as the source folder and jupyter_book/_config.yml, _toc.yml;
the notebooks are rendered from their committed outputs, never executed. Any Sphinx warning fails the build
(``-W``, with ``--keep-going`` so one run lists all of them). Prints the build time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "jupyter_book"
HTML = BOOK / "_build" / "html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="remove jupyter_book/_build first")
    parser.add_argument("--toc", type=Path, default=BOOK / "_toc.yml", help="another table of contents (a test)")
    args = parser.parse_args(argv)
    jb = Path(sys.executable).parent / "jupyter-book"
    if not jb.exists():
        print("build_book: jupyter-book is not installed in this environment: run `make book` "
              "(it installs the `book` extra) or `pip install -e '.[book]'`", file=sys.stderr)
        return 2
    if args.clean:
        shutil.rmtree(BOOK / "_build", ignore_errors=True)
    start = time.perf_counter()
    cmd = [str(jb), "build", str(ROOT), "--config", str(BOOK / "_config.yml"), "--toc", str(args.toc.resolve()),
           "--path-output", str(BOOK), "--builder", "html", "--warningiserror", "--keep-going"]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    took = time.perf_counter() - start
    if rc != 0:
        print(f"build_book: FAILED after {took:.0f} s (warnings are errors; see above)", file=sys.stderr)
        return rc
    pages = len(list(HTML.rglob("*.html")))
    print(f"build_book: {pages} HTML pages in {HTML.relative_to(ROOT)}/ in {took:.0f} s "
          f"(open {HTML.relative_to(ROOT)}/index.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
