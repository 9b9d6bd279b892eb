"""The battery layer every chapter's test file shares, in one call:

    test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("02_nf4")

* every case of ``qlora_edu/ch02_nf4/checks.py`` passes on the package,
* and on the functions of ``solutions/02_nf4.ipynb`` (the notebook generated from the same source),
* and every known mistake declared there makes ``check`` fail, with the case it names marked FAIL (and, where the
  mistake declares ``shows=``, the report shows that text: the hint written for that mistake).

A case whose need is missing here (``@case(..., requires="cuda")`` on a machine without a GPU) is skipped with
the reason, and so is every mistake it catches: a skip, never a pass.
"""

from __future__ import annotations

import pytest

from conftest import ROOT
from qlora_edu.checks import case_of, cases, check_functions, mistakes, overlay
from qlora_edu.checks.notebooks import exercise_function_names


def _skip_if_unmet(case) -> None:
    reason = case.unmet()
    if reason:
        pytest.skip(f"{case.chapter}.{case.name} {reason}")


def battery_tests(chapter: str):
    solution = ROOT / "solutions" / f"{chapter}.ipynb"
    chapter_cases = cases(chapter)
    assert chapter_cases, f"qlora_edu/ch{chapter}/checks.py declares no case"

    @pytest.mark.parametrize("case", chapter_cases, ids=lambda c: c.name)
    def test_battery_on_package(case):
        import qlora_edu

        _skip_if_unmet(case)
        case.run(qlora_edu)

    # The cases that use a function the solution notebook writes (the others test package-only functions).
    written = set(exercise_function_names(solution)) if solution.exists() else set()
    solution_cases = [c for c in chapter_cases if written & set(c.uses)]

    @pytest.mark.parametrize("case", solution_cases, ids=lambda c: c.name)
    def test_battery_on_solution(case, notebook_impl):
        _skip_if_unmet(case)
        case.run(notebook_impl(solution))

    @pytest.mark.parametrize("mistake", mistakes(chapter), ids=lambda m: f"{m.function}:{m.name}")
    def test_known_mistake_is_caught(mistake, capsys):
        _skip_if_unmet(case_of(mistake))
        outcomes = check_functions({mistake.function: mistake.fn}, verbose=True)
        report = capsys.readouterr().out
        assert not all(o.passed for o in outcomes), f"{mistake.name} passes the battery"
        caught = next(o for o in outcomes if o.case.name == mistake.caught_by)
        assert caught.failed and not caught.not_implemented, f"{mistake.caught_by} did not fail:\n{report}"
        line = next(ln for ln in report.splitlines() if ln.startswith(f"  {chapter}.{mistake.caught_by}  ("))
        assert "[FAIL]" in line, report
        detail = report.partition("\nFirst failing case: ")[2] or report.partition("\nStretch goal not met yet: ")[2]
        assert detail, report
        if mistake.shows:
            assert mistake.shows in detail, f"the report should show {mistake.shows!r}:\n{report}"

    return test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught


def control_passes(name: str, fn) -> bool:
    """A chapter's mistakes are re-implementations with one switch on; with every switch off (``fn``) the
    battery must pass, so a mistake's failure is its own."""
    fn.__name__ = name
    return all(o.passed for o in check_functions({name: fn}, verbose=False))


__all__ = ["battery_tests", "control_passes", "overlay"]
