"""Check every exercise notebook at once: ``python -m qlora_edu.checks exercises/``.

For each notebook, the functions written in its exercise cells run through the same battery as the
package's tests; one report a notebook (each case as it runs), then a summary. Exit status 0 only when no case
failed (a skipped case, e.g. one that needs a GPU, is counted apart; an unmet stretch goal is not a failure).
Give notebook paths or folders (default: ``exercises/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora_edu.checks import case_heading, cases_using, format_report, overlay, run_cases
from qlora_edu.checks.notebooks import notebook_functions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_edu.checks", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["exercises"], help="notebooks or folders of notebooks")
    args = parser.parse_args(argv)

    notebooks: list[Path] = []
    for p in map(Path, args.paths):
        if p.is_dir():
            notebooks += sorted(p.glob("*.ipynb"))
        elif p.suffix == ".ipynb" and p.is_file():
            notebooks.append(p)
        else:
            parser.error(f"paths: {p} is neither a notebook nor a folder")
    if not notebooks:
        parser.error(f"paths: no notebooks found in {args.paths}")

    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for nb in notebooks:
        try:
            functions = notebook_functions(nb)
        except Exception as err:  # noqa: BLE001 - a syntax error in a learner's cell is a result, not a crash
            print(f"== {nb}: could not run its setup/exercise cells: {type(err).__name__}: {err}\n")
            totals["failed"] += 1
            continue
        print(f"== {nb} ({', '.join(functions)})", flush=True)
        outcomes = run_cases(overlay(functions), cases_using(functions),
                             on_start=lambda c: print(case_heading(c), end=" ", flush=True),
                             on_done=lambda o: print(o.verdict, flush=True))
        print(format_report(outcomes, header=False, functions=functions.values()) + "\n", flush=True)
        totals["passed"] += sum(o.passed for o in outcomes)
        totals["failed"] += sum(o.failed and not o.case.stretch for o in outcomes)
        totals["skipped"] += sum(o.skipped is not None for o in outcomes)
    print(f"battery: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 0 if totals["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
