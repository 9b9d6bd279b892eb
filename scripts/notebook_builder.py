"""Build exercise and solution notebooks from one source, and execute notebooks in place.

One source of truth: a function body lives once, in the package. Each chapter's exercise has a
template, ``exercises/src/NN_name.py`` (jupytext "percent" format: ``# %%`` starts a code cell,
``# %% [markdown]`` a markdown cell). From it the builder writes two notebooks:

* ``solutions/NN_name.ipynb``: every ``# @solution qlora_edu.module.function`` line becomes that
  function's source, read from the package; ``# BEGIN SOLUTION`` / ``# END SOLUTION`` marker lines are
  dropped; markdown cells tagged ``answer`` are kept.
* ``exercises/NN_name.ipynb``: the same, but each region between the markers is replaced by its
  ``# Hint:`` lines and ``raise NotImplementedError(...)``; ``answer`` cells become a prompt.

Cells that define a learner's function get the tag ``exercise``, other cells with a marked region
(a measurement to make, a plot to draw) the tag ``task``; cells tagged ``setup`` in the template hold
the imports the exercise cells need (see :mod:`qlora_edu.checks.notebooks`). A template cell whose
first line is ``# NBVAL_CHECK_OUTPUT`` (its output must reproduce exactly under nbval) loses that line
and gets the equivalent tag ``nbval-check-output`` instead, so learners do not see CI markers.

Commands (run from the repository root; ``make exercises`` and ``make execute`` call them)::

    python scripts/notebook_builder.py build     # regenerate exercises/ and solutions/ sources
    python scripts/notebook_builder.py check     # exit 1 if a committed notebook is stale
    python scripts/notebook_builder.py execute notebooks/*.ipynb solutions/*.ipynb
    python scripts/notebook_builder.py sources notebooks/*.ipynb   # cell text only, for a spell checker

This is course tooling, not part of the installed package: it needs the ``dev`` extra (jupytext, nbformat,
nbclient), which ``make`` installs.

``build`` keeps the outputs of a solution cell whose source did not change; run ``execute`` after it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent  # the repository
TEMPLATES = ROOT / "exercises" / "src"
DIRECTIVE = re.compile(r"^#\s*@solution\s+([\w.]+)\s*$")
BEGIN, END, HINT = "# BEGIN SOLUTION", "# END SOLUTION", "# Hint:"
ANSWER_PROMPT = "**Your answer:** *(write it here, then compare with the solution notebook)*"
NBVAL_MARKER, NBVAL_TAG = "# NBVAL_CHECK_OUTPUT", "nbval-check-output"  # nbval reads either


# ------------------------------------------------------------------------------ source transforms


def function_source(dotted: str) -> str:
    """Source of ``package.module.function`` exactly as it stands in the package."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"@solution {dotted}: no such function ({err})") from err
    return textwrap.dedent(inspect.getsource(obj)).rstrip() + "\n"


def solution_version(source: str) -> str:
    """Drop the marker lines; keep everything else, hints included."""
    return "".join(ln for ln in source.splitlines(keepends=True) if ln.strip() not in (BEGIN, END))


def exercise_version(source: str) -> str:
    """Replace each marked region with its hint lines and a ``NotImplementedError`` naming the function."""
    out: list[str] = []
    lines = source.splitlines(keepends=True)
    inside, func, hinted = False, "this task", False  # a region outside any function is a task cell
    cls = None  # the class whose methods we are in, if any
    for ln in lines:
        stripped = ln.strip()
        # Name the region after its top-level function or method (``Class.method``), not a helper nested in it.
        top = re.match(r"(class|def) (\w+)", ln)
        method = re.match(r" {4}def (\w+)\(", ln)
        if top:
            cls = top.group(2) if top.group(1) == "class" else None
        if not inside and top and top.group(1) == "def":
            func = top.group(2)
        elif not inside and method and cls:
            func = f"{cls}.{method.group(1)}"
        if stripped == BEGIN:
            if inside:
                raise ValueError(f"{func}: nested {BEGIN}")
            inside, hinted, indent = True, False, ln[: len(ln) - len(ln.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE\n")
        elif stripped == END:
            if not inside:
                raise ValueError(f"{func}: {END} without {BEGIN}")
            inside = False
            where = " (see the hints above)" if hinted else ""
            out.append(f'{indent}raise NotImplementedError("{func}: write this part{where}")\n')
        elif not inside or stripped.startswith(HINT):
            hinted = hinted or inside
            out.append(ln)
    if inside:
        raise ValueError(f"{func}: {BEGIN} without {END}")
    return "".join(out)


# ------------------------------------------------------------------------------ notebooks


def _cell_pair(cell: nbformat.NotebookNode) -> tuple[str, str, list[str]]:
    """(solution source, exercise source, extra tags) for one template cell."""
    tags: list[str] = []
    if cell.cell_type == "markdown":
        is_answer = "answer" in cell.metadata.get("tags", [])
        return cell.source, (ANSWER_PROMPT if is_answer else cell.source), tags
    source = cell.source
    lines = source.splitlines()
    if lines and lines[0].strip() == NBVAL_MARKER:  # a CI marker: a tag in the notebooks, not a line
        tags.append(NBVAL_TAG)
        lines = lines[1:]
        source = "\n".join(lines)
    targets = [m.group(1) for m in map(DIRECTIVE.match, lines) if m]
    if targets:
        if len(targets) != len(lines):
            raise ValueError(f"a cell with @solution lines must hold nothing else:\n{source}")
        sources = [function_source(t) for t in targets]
        sol = "\n\n".join(solution_version(s) for s in sources)
        ex = "\n\n".join(exercise_version(s) for s in sources)
        return sol.rstrip(), ex.rstrip(), tags + ["exercise"]
    if any(ln.strip() == BEGIN for ln in lines):
        # A task done inline (a measurement, a plot) rather than a function the battery can check.
        return solution_version(source).rstrip(), exercise_version(source).rstrip(), tags + ["task"]
    return source, source, tags


def build_pair(template: Path) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    """Build (solution, exercise) notebooks from a percent-format template."""
    src = jupytext.read(template, fmt="py:percent")
    rel = template.relative_to(ROOT).as_posix()
    banners = {
        "solution": f"*Solution notebook, generated from `{rel}` by `make exercises`. "
                    f"The exercise version is `exercises/{template.stem}.ipynb`.*",
        "exercise": f"*Exercise notebook, generated from `{rel}` by `make exercises`: edit the cells marked "
                    f"`YOUR CODE HERE`, then run the check cell. Solutions: `solutions/{template.stem}.ipynb`.*",
    }
    books = {}
    for kind in ("solution", "exercise"):
        nb = nbformat.v4.new_notebook()
        nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python",
                                      "name": "python3"},
                       "language_info": {"name": "python"}}
        nb.cells.append(nbformat.v4.new_markdown_cell(banners[kind], id="banner"))
        books[kind] = nb
    for i, cell in enumerate(src.cells):
        sol, ex, extra = _cell_pair(cell)
        tags = [t for t in cell.metadata.get("tags", []) if t != "answer"] + extra
        for kind, text in (("solution", sol), ("exercise", ex)):
            new = (nbformat.v4.new_code_cell if cell.cell_type == "code" else nbformat.v4.new_markdown_cell)(
                text, id=f"c{i:03d}")
            if tags:
                new.metadata["tags"] = tags
            books[kind].cells.append(new)
    return books["solution"], books["exercise"]


def _signature(nb: nbformat.NotebookNode) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(c.cell_type, c.source, tuple(c.get("metadata", {}).get("tags", []))) for c in nb.cells]


def _keep_outputs(new: nbformat.NotebookNode, old_path: Path) -> None:
    """Carry over outputs of unchanged code cells so a rebuild does not wipe an executed notebook."""
    if not old_path.exists():
        return
    old = {(c.get("id"), c.source): c for c in nbformat.read(old_path, as_version=4).cells if c.cell_type == "code"}
    for c in new.cells:
        prev = old.get((c.get("id"), c.source))
        if c.cell_type == "code" and prev is not None:
            c.outputs, c.execution_count = prev.outputs, prev.execution_count
            if "execution" in prev.get("metadata", {}):  # the recorded run time (the book's agendas read it)
                c.metadata["execution"] = prev.metadata["execution"]
    new.metadata = {**nbformat.read(old_path, as_version=4).metadata, **new.metadata}


def targets_for(template: Path) -> tuple[Path, Path]:
    return ROOT / "solutions" / f"{template.stem}.ipynb", ROOT / "exercises" / f"{template.stem}.ipynb"


def build(templates: list[Path]) -> None:
    for t in templates:
        sol, ex = build_pair(t)
        sol_path, ex_path = targets_for(t)
        _keep_outputs(sol, sol_path)
        nbformat.write(sol, sol_path)
        nbformat.write(ex, ex_path)
        print(f"built {sol_path.relative_to(ROOT)} and {ex_path.relative_to(ROOT)}")


def check(templates: list[Path]) -> int:
    """0 when every committed exercise/solution notebook matches what its template builds now."""
    stale = []
    for t in templates:
        for built, path in zip(build_pair(t), targets_for(t), strict=True):
            if not path.exists() or _signature(nbformat.read(path, as_version=4)) != _signature(built):
                stale.append(path.relative_to(ROOT).as_posix())
    if stale:
        print("stale notebooks (run `make exercises`, then `make execute`, and commit):\n  " + "\n  ".join(stale))
        return 1
    print(f"exercise and solution notebooks are up to date ({len(templates)} templates)")
    return 0


def execute(paths: list[Path], timeout: int = 1200) -> None:
    """Run each notebook top to bottom in its own folder and save it with its outputs."""
    from nbclient import NotebookClient

    for p in paths:
        nb = nbformat.read(p, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(p.parent)}}).execute()
        merge_streams(nb)
        nbformat.write(nb, p)
        print(f"executed {p}")


def merge_streams(nb: nbformat.NotebookNode) -> None:
    """Join consecutive outputs of one stream in each cell: a report that flushes line by line (``check()`` prints
    each case as it runs) is saved as one block, as a learner sees it, not as hundreds of fragments."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        cell.outputs = merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/notebook_builder.py",
                                     description="build/check exercise+solution notebooks; execute notebooks")
    parser.add_argument("command", choices=["build", "check", "execute", "sources"])
    parser.add_argument("paths", nargs="*", type=Path,
                        help="templates for build/check (default: all in exercises/src); notebooks for execute")
    args = parser.parse_args(argv)
    if args.command in ("execute", "sources"):
        if not args.paths:
            parser.error(f"{args.command}: name the notebooks")
        if args.command == "execute":
            execute(args.paths)
        else:
            for p in args.paths:
                for cell in nbformat.read(p, as_version=4).cells:
                    print(cell.source)
        return 0
    templates = [p.resolve() for p in args.paths] or sorted(TEMPLATES.glob("*.py"))
    if not templates:
        parser.error(f"no templates in {TEMPLATES}")
    if args.command == "build":
        build(templates)
        return 0
    return check(templates)


if __name__ == "__main__":
    sys.exit(main())
