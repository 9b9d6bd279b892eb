"""Read the functions a notebook defines, without a kernel, so the battery can check them.

Exercise and solution notebooks tag their cells (the builder does it, see
:mod:`qlora_edu.notebook_builder`):

* ``setup``: imports the exercise cells need (``import torch`` ...);
* ``exercise``: the cells where the learner writes a function.

:func:`notebook_functions` executes just those cells, in order, in a fresh namespace, and returns the
functions the ``exercise`` cells define. Nothing else in the notebook runs (no plots, no model loading),
so checking every exercise notebook takes seconds.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import nbformat

SETUP_TAG = "setup"
EXERCISE_TAG = "exercise"


def tagged_cells(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and tag in c.get("metadata", {}).get("tags", [])]


def defined_functions(source: str) -> list[str]:
    """Names of the top-level functions a cell defines."""
    return [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]


def notebook_functions(path: str | Path) -> dict[str, Callable]:
    """Run the ``setup`` and ``exercise`` cells of the notebook at ``path``; return the exercise functions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no notebook at {path}")
    nb = nbformat.read(path, as_version=4)
    namespace: dict[str, object] = {"__name__": f"notebook:{path.stem}"}
    wanted: list[str] = []
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type != "code" or not ({SETUP_TAG, EXERCISE_TAG} & set(tags)):
            continue
        code = compile(cell.source, f"{path.name}:cell-{cell.get('id', '?')}", "exec")
        exec(code, namespace)  # noqa: S102 - running the learner's own notebook is the point
        if EXERCISE_TAG in tags:
            wanted += defined_functions(cell.source)
    return {name: namespace[name] for name in wanted}
