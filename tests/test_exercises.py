"""The exercise mechanism, for every chapter at once: generated notebooks are fresh, the battery fails on untouched
stubs and passes on solutions, and the chapter stems agree everywhere. (Each chapter's own cases and known
mistakes are tested in tests/test_NN_chapter.py.)"""

from __future__ import annotations

import subprocess
import sys

import notebook_builder
import pytest

from conftest import EXERCISES, ROOT, SOLUTIONS
from qlora_edu.checks import CheckFailure, cases, cases_using, chapters, format_report, overlay, run_cases
from qlora_edu.checks.notebooks import notebook_functions


def test_generated_notebooks_are_up_to_date():
    assert notebook_builder.check(sorted(notebook_builder.TEMPLATES.glob("*.py"))) == 0


def test_every_template_has_both_notebooks():
    stems = {p.stem for p in notebook_builder.TEMPLATES.glob("*.py")}
    assert stems, "no exercise templates found"
    assert stems == {p.stem for p in EXERCISES} == {p.stem for p in SOLUTIONS}


@pytest.mark.parametrize("notebook", EXERCISES, ids=lambda p: p.stem)
def test_battery_fails_on_untouched_stubs(notebook):
    """Every stub function raises NotImplementedError in at least one case, so an untouched exercise
    can never pass: the battery can fail."""
    functions = notebook_functions(notebook)
    assert functions, f"{notebook.name} defines no exercise functions"
    for name, fn in functions.items():
        outcomes = run_cases(overlay({name: fn}), cases_using([name]))
        assert outcomes, f"no case uses {name}"
        assert any(o.not_implemented for o in outcomes), f"{name}: no case reached the stub"
        assert not all(o.passed for o in outcomes), f"{name}: the untouched stub passes the battery"
        # The report on a stub prints no hint: the hints, the code-level ones above all, are nearly the solution.
        report = format_report(outcomes, functions=[fn])
        hints = [h for o in outcomes for h in (o.case.hint, o.case.code_hint) if h]
        assert "[TODO]" in report and "not implemented yet" in report
        assert not [h for h in hints if h in report], report


def test_check_command_fails_on_exercises_and_passes_on_solutions():
    cmd = [sys.executable, "-m", "qlora_edu.checks"]
    ex = subprocess.run(cmd + ["exercises"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ex.returncode == 1, ex.stdout + ex.stderr
    assert "TODO" in ex.stdout and "not implemented yet" in ex.stdout
    assert "hint:" not in ex.stdout, "a report on untouched stubs must not print hints (nearly the solution lines)"
    sol = subprocess.run(cmd + ["solutions"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert sol.returncode == 0, sol.stdout + sol.stderr


def test_exercise_version_replaces_only_the_marked_region():
    src = (
        "def f(x):\n"
        "    check(x)\n"
        "    # BEGIN SOLUTION\n"
        "    # Hint: double it\n"
        "    y = 2 * x\n"
        "    # END SOLUTION\n"
        "    return y\n"
    )
    ex = notebook_builder.exercise_version(src)
    assert "check(x)" in ex and "return y" in ex and "# Hint: double it" in ex
    assert "2 * x" not in ex and 'raise NotImplementedError("f: ' in ex
    sol = notebook_builder.solution_version(src)
    assert "BEGIN SOLUTION" not in sol and "y = 2 * x" in sol


def test_unbalanced_markers_are_an_error():
    with pytest.raises(ValueError, match="without"):
        notebook_builder.exercise_version("def f():\n    # BEGIN SOLUTION\n    return 1\n")


def test_case_failure_message_names_what_was_checked():
    err = CheckFailure("codes differ", expected=1, got=2, hint="round, do not floor")
    assert "expected: 1" in str(err) and "got:      2" in str(err) and "round, do not floor" in str(err)


def test_one_stem_per_chapter_everywhere():
    """A chapter NN_name has the lesson notebooks/NN_name.ipynb, and, when it has an exercise, the template
    exercises/src/NN_name.py, both generated notebooks, qlora_edu/chNN_name/checks.py and tests/test_NN_name.py."""
    lessons = {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    templates = {p.stem for p in (ROOT / "exercises" / "src").glob("*.py")}
    tests = {p.stem.removeprefix("test_") for p in (ROOT / "tests").glob("test_[0-9][0-9]_*.py")}
    assert set(chapters()) == templates, "every exercise has checks and every checks module an exercise"
    assert templates <= lessons, f"exercises without a lesson: {templates - lessons}"
    assert set(chapters()) <= tests, f"checks without a test file: {set(chapters()) - tests}"
    for stem in chapters():
        assert cases(stem), f"qlora_edu/ch{stem}/checks.py declares no case"


def test_a_syntax_error_names_the_cell_a_learner_sees(tmp_path):
    import json

    from qlora_edu.checks.notebooks import notebook_functions

    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "# title"},
                    {"cell_type": "code", "metadata": {"tags": ["exercise"]}, "source": "def f(:\n    pass",
                     "outputs": [], "execution_count": None}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "broken.ipynb"
    path.write_text(json.dumps(nb))
    with pytest.raises(SyntaxError) as err:
        notebook_functions(path)
    assert err.value.filename == "broken.ipynb cell 2"


def test_no_exercise_imports_the_module_it_asks_the_learner_to_write():
    """An exercise takes its helpers from the chapter's guards, tools or other modules, never from the module that
    holds the function(s) its `check(...)` grades: that module's solution would sit one import away (issue 17)."""
    import inspect
    import re

    import qlora_edu

    for template in sorted((ROOT / "exercises" / "src").glob("[0-9][0-9]_*.py")):
        source = template.read_text(encoding="utf-8")
        checked = {name.strip() for m in re.finditer(r"^check\(([^)]*)\)", source, re.M)
                   for name in m.group(1).split(",") if name.strip() and "=" not in name}
        written = {inspect.getmodule(getattr(qlora_edu, name)).__name__ for name in checked}
        imported = set(re.findall(r"^\s*from (qlora_edu[\w.]*) import", source, re.M))
        assert checked, f"{template.name} grades nothing with check(...)"
        assert not imported & written, f"{template.name} imports {sorted(imported & written)}, the module it grades"
