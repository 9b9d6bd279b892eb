"""The course's test battery (qlora_edu.checks), run against the package and every solution notebook.

The same cases are what a learner's ``check(...)`` call runs in an exercise notebook.
"""

from __future__ import annotations

import nbformat
import pytest

import qlora_edu
from conftest import SOLUTIONS
from qlora_edu.checks import all_cases, cases_using
from qlora_edu.checks.notebooks import EXERCISE_TAG, defined_functions, tagged_cells


def _solution_params():
    for nb_path in SOLUTIONS:
        nb = nbformat.read(nb_path, as_version=4)
        names = [n for c in tagged_cells(nb, EXERCISE_TAG) for n in defined_functions(c.source)]
        for c in cases_using(names):
            yield pytest.param(nb_path, c, id=f"{nb_path.stem}:{c.chapter}.{c.name}")


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: f"{c.chapter}.{c.name}")
def test_package(case):
    case.run(qlora_edu)


@pytest.mark.parametrize(("notebook", "case"), list(_solution_params()))
def test_solution_notebook(notebook, case, notebook_impl):
    case.run(notebook_impl(notebook))
