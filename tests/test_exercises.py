"""The exercise mechanism: generated notebooks are fresh, the battery fails on untouched stubs and
passes on solutions, and it catches plausible mistakes a learner makes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import EXERCISES, ROOT, SOLUTIONS
from qlora_edu import notebook_builder
from qlora_edu.checks import CheckFailure, cases, cases_using, check, overlay, run_cases
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


def test_check_command_fails_on_exercises_and_passes_on_solutions():
    cmd = [sys.executable, "-m", "qlora_edu.checks"]
    ex = subprocess.run(cmd + ["exercises"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ex.returncode == 1, ex.stdout + ex.stderr
    assert "TODO" in ex.stdout and "not implemented yet" in ex.stdout
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


# --- the battery catches plausible mistakes (mutation tests) -------------------------------------


def _buggy_floor(x, bits=4, blocksize=64):
    codes, scales = qlora_edu_absmax(x, bits, blocksize)
    flat = x.flatten().float()
    per = scales.repeat_interleave(blocksize)[: flat.numel()]
    safe = torch.where(per == 0, torch.ones_like(per), per)
    return torch.floor(flat / safe).clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1).to(torch.int8).view(
        x.shape), scales


def _buggy_scale8(x, bits=4, blocksize=64):
    codes, scales = qlora_edu_absmax(x, bits, blocksize)
    return codes, scales * 7 / 8


def _buggy_rows(x, bits=4, blocksize=64):
    """Blocks per row instead of over the flattened tensor (wrong when rows are not multiples)."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    out = [qlora_edu_absmax(r.contiguous(), bits, blocksize) for r in rows]
    return torch.cat([c.flatten() for c, _ in out]).view(x.shape), torch.cat([s for _, s in out])


def _buggy_nan_on_zero(x, bits=4, blocksize=64):
    codes, scales = qlora_edu_absmax(x, bits, blocksize)
    if bool((scales == 0).any()):
        raise ZeroDivisionError("0/0")
    return codes, scales


def qlora_edu_absmax(x, bits, blocksize):
    import qlora_edu

    return qlora_edu.absmax_quantize(x, bits=bits, blocksize=blocksize)


@pytest.mark.parametrize("buggy", [_buggy_floor, _buggy_scale8, _buggy_rows, _buggy_nan_on_zero],
                         ids=lambda f: f.__name__)
def test_battery_catches_a_wrong_absmax_quantize(buggy, capsys):
    buggy.__name__ = "absmax_quantize"
    assert check(buggy) is False
    report = capsys.readouterr().out
    assert "First failing case" in report and "FAIL" in report


def test_report_shows_expected_got_and_hint(capsys):
    def absmax_quantize(x, bits=4, blocksize=64):
        return _buggy_scale8(x, bits, blocksize)

    check(absmax_quantize)
    out = capsys.readouterr().out
    assert "expected:" in out and "got:" in out and "hint:" in out


def test_check_rejects_bad_arguments():
    with pytest.raises(ValueError, match="functions"):
        check()
    with pytest.raises(TypeError, match="functions"):
        check(3)


def test_case_failure_message_names_what_was_checked():
    err = CheckFailure("codes differ", expected=1, got=2, hint="round, do not floor")
    assert "expected: 1" in str(err) and "got:      2" in str(err) and "round, do not floor" in str(err)
    assert len(cases("absmax")) >= 8
