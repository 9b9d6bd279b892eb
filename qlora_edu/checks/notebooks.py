"""Read the functions a notebook defines, without a kernel, so the battery can check them.

Exercise and solution notebooks tag their cells (``scripts/notebook_builder.py`` does it):

* ``setup``: imports the exercise cells need (``import torch`` ...);
* ``exercise``: the cells where the learner writes a function.

:func:`notebook_functions` executes just those cells, in order, in a fresh namespace, and returns the
functions the ``exercise`` cells define. Nothing else in the notebook runs (no plots, no model loading),
so checking every exercise notebook takes seconds. A notebook is JSON; it is read with :mod:`json`, so
checking needs no Jupyter package.
"""

from __future__ import annotations

import ast
import json
import linecache
from collections.abc import Callable
from pathlib import Path

SETUP_TAG = "setup"
EXERCISE_TAG = "exercise"


def code_cells(path: str | Path) -> list[dict]:
    """The code cells of the notebook at ``path``, each with ``source`` as one string, ``tags`` and ``number``
    (its 1-based position among all cells, as JupyterLab counts them from the top)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = []
    for number, cell in enumerate(nb["cells"], start=1):
        if cell["cell_type"] == "code":
            source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            cells.append({"source": source, "tags": cell.get("metadata", {}).get("tags", []), "number": number})
    return cells


def defined_functions(source: str) -> list[str]:
    """Names of the top-level functions and classes a cell defines (chapter 6's learner writes a class)."""
    return [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef | ast.ClassDef)]


def exercise_function_names(path: str | Path) -> list[str]:
    """Names of the functions the ``exercise`` cells of the notebook define (without running anything)."""
    return [n for c in code_cells(path) if EXERCISE_TAG in c["tags"] for n in defined_functions(c["source"])]


def notebook_functions(path: str | Path) -> dict[str, Callable]:
    """Run the ``setup`` and ``exercise`` cells of the notebook at ``path``; return the exercise functions.

    A syntax error is reported as ``<notebook> cell N`` (N counted from the top of the notebook, markdown cells
    included), so the learner can find it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no notebook at {path}")
    namespace: dict[str, object] = {"__name__": f"notebook:{path.stem}"}
    wanted: list[str] = []
    for cell in code_cells(path):
        if not {SETUP_TAG, EXERCISE_TAG} & set(cell["tags"]):
            continue
        filename = f"{path.name} cell {cell['number']}"
        # Registered like IPython registers a cell, so inspect.getsource works on what it defines (triton.jit
        # compiles a kernel from its source: chapter 10's solution on a GPU).
        linecache.cache[filename] = (len(cell["source"]), None, cell["source"].splitlines(keepends=True), filename)
        code = compile(cell["source"], filename, "exec")
        exec(code, namespace)  # noqa: S102 - running the learner's own notebook is the point
        if EXERCISE_TAG in cell["tags"]:
            wanted += defined_functions(cell["source"])
    return {name: namespace[name] for name in wanted}
