"""The battery framework itself (qlora_edu/checks): what a case needs and its skip, the time limit, the copies of
a learner's inputs, functions without a ``__name__``, how an exception (also one found by Hypothesis) is shown,
bit patterns shown as floats, tiered hints and the report's format. Each chapter's own cases are tested in
tests/test_NN_name.py; the exercise mechanism in tests/test_exercises.py."""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch
from chapter_battery import battery_tests
from hypothesis import given
from hypothesis import strategies as st

import qlora_edu.checks as checks
from qlora_edu.checks import (
    Case,
    CaseTimeout,
    CheckFailure,
    Mistake,
    bits,
    check,
    expect_equal,
    format_report,
    function_name,
    overlay,
    property_settings,
    requirement,
    run_case,
)


@requirement("absent-in-tests")
def _absent() -> str:
    return "needs a flux capacitor: none is fitted to this machine"


def _case(fn, *uses, name=None, **kw) -> Case:
    """A case outside any chapter (not registered), named after ``fn`` unless told."""
    return Case(name or fn.__name__, "99_test", uses or ("f",), kw.pop("hint", ""), fn, **kw)


@pytest.fixture
def only(monkeypatch):
    """``check()`` runs exactly the given cases (instead of every chapter's cases that use the function)."""
    def use(*selected: Case) -> None:
        monkeypatch.setattr(checks, "cases_using", lambda names: list(selected))

    return use


# ----------------------------------------------------------------------------------- requires / skip


def test_a_case_with_a_missing_need_is_skipped_with_the_reason_and_never_passes():
    ran = []
    c = _case(lambda impl: ran.append(1), name="needs_it", requires=("absent-in-tests",))
    outcome = run_case(c, overlay({}))
    assert ran == [], "a case whose need is missing must not run"
    assert outcome.skipped == "needs a flux capacitor: none is fitted to this machine"
    assert not outcome.passed and not outcome.failed
    report = format_report([outcome], "T")
    assert "99_test.needs_it  (f) ... [SKIP] needs a flux capacitor: none is fitted" in report
    assert "0 passed, 0 failed, 1 skipped" in report


def test_check_returns_false_without_raising_when_a_case_was_skipped(only, capsys):
    def f(x):
        return x

    only(_case(lambda impl: None, name="runs"), _case(lambda impl: None, name="gpu_only", requires="absent-in-tests"))
    assert check(f) is False  # no ChecksFailed: a CPU machine can run a GPU chapter's notebook
    out = capsys.readouterr().out
    assert "99_test.runs  (f) ... [PASS]" in out and "[SKIP] needs a flux capacitor" in out
    assert "1 passed, 0 failed, 1 skipped" in out


def test_an_unknown_need_is_an_error_naming_requires():
    with pytest.raises(ValueError, match="requires: unknown need"):
        checks.case("f", requires="a-gpu-please")


def test_the_cuda_need_matches_torch():
    reason = checks.unmet(["cuda"])
    if torch.cuda.is_available():
        assert reason is None
    else:
        assert reason.startswith("needs a CUDA device: torch.cuda.is_available() is False")


def test_pytest_skips_a_case_and_its_mistakes_with_the_reason(monkeypatch):
    import chapter_battery

    on_package, on_solution, mistake_is_caught = battery_tests("01_absmax")
    gpu_case = _case(lambda impl: pytest.fail("must not run"), name="gpu_case", requires="absent-in-tests")
    with pytest.raises(pytest.skip.Exception, match="gpu_case needs a flux capacitor"):
        on_package(gpu_case)
    with pytest.raises(pytest.skip.Exception, match="needs a flux capacitor"):
        on_solution(gpu_case, lambda path: pytest.fail("must not load the solution"))
    monkeypatch.setattr(chapter_battery, "case_of", lambda m: gpu_case)
    wrong = Mistake("wrong", "99_test", "f", "gpu_case", lambda x: x)
    with pytest.raises(pytest.skip.Exception, match="needs a flux capacitor"):
        mistake_is_caught(wrong, None)


# ----------------------------------------------------------------------------------- time limit


def test_an_endless_loop_is_stopped_and_reported():
    def loops(impl):
        while True:
            pass

    start = time.perf_counter()
    outcome = run_case(_case(loops, timeout=0.5), overlay({}))
    assert time.perf_counter() - start < 5
    assert outcome.timed_out and outcome.failed
    assert outcome.verdict == ("[FAIL] took longer than 0.5 s, stopped (an endless loop? a loop over every element "
                               "instead of one tensor operation?)")
    assert "took longer than 0.5 s, stopped" in format_report([outcome])


# The alarm may land inside one of Hypothesis's gc callbacks, where Python ignores it; the next one, a second
# later, stops the case (what the test shows). pytest reports the ignored one as a warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_endless_loop_inside_hypothesis_is_stopped():
    """Hypothesis retries a failing example; the time-out is a BaseException it does not catch."""
    def loops_in_property(impl):
        @property_settings(5)
        @given(st.integers(0, 3))
        def prop(n):
            while True:
                pass

        prop()

    start = time.perf_counter()
    outcome = run_case(_case(loops_in_property, timeout=0.5), overlay({}))
    assert time.perf_counter() - start < 5
    assert outcome.timed_out


def test_the_time_limit_works_off_the_main_thread_too():
    results = []

    def worker():
        def loops():
            while True:
                time.sleep(0.01)

        try:
            checks._run_with_time_limit(loops, 0.3)
        except CaseTimeout as err:
            results.append(err.seconds)

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert results == [0.3]


def test_the_live_report_prints_the_name_before_the_case_runs(only, capsys):
    def slow(impl):
        print("<inside the case>")

    only(_case(slow, name="prints"))

    def f(x):
        return x

    check(f)
    out = capsys.readouterr().out
    assert "99_test.prints  (f) ... <inside the case>\n[PASS]" in out


# ----------------------------------------------------------------------------------- copies of the inputs


def _doubles_in_place(x):
    x.mul_(2)
    return x.clone()


def test_a_function_that_changes_its_input_fails_and_is_named(only, capsys):
    def expects_double(impl):
        x = torch.arange(4.0)
        got = impl.f(x)
        # computed from the caller's x after the call: right only because f got a copy
        expect_equal("f(x)", got, 2 * x)

    only(_case(expects_double))
    _doubles_in_place.__name__ = "f"
    assert check(_doubles_in_place, raise_on_failure=False) is False
    out = capsys.readouterr().out
    assert "your f changed its argument 'x' in place" in out
    assert "differs" not in out, "the expected value must come from the unmodified input"


def test_declared_in_place_arguments_are_not_copied(only, capsys, monkeypatch):
    def sees_the_update(impl):
        x = torch.ones(3)
        impl.f(x)
        if not torch.equal(x, torch.full((3,), 2.0)):
            raise CheckFailure("x should be doubled in place", 2.0, x.tolist())

    monkeypatch.setitem(checks._IN_PLACE, "f", frozenset({"x"}))
    only(_case(sees_the_update))
    _doubles_in_place.__name__ = "f"
    assert check(_doubles_in_place) is True


def test_tensors_that_require_grad_are_passed_as_they_are():
    seen = []
    x = torch.ones(2, requires_grad=True)
    wrapped = overlay({"f": lambda t: seen.append(t)}).f
    wrapped(x)
    wrapped(torch.ones(2))
    assert seen[0] is x
    assert seen[1] is not None and not seen[1].requires_grad


# ----------------------------------------------------------------------------------- names


def test_a_partial_is_checked_under_the_wrapped_functions_name(only, capsys):
    def f(x, scale):
        return x * scale

    def doubles(impl):
        expect_equal("f(x)", impl.f(torch.arange(3.0)), torch.arange(3.0) * 2)

    only(_case(doubles))
    assert function_name(functools.partial(f, scale=2)) == "f"
    assert function_name(functools.partial(functools.partial(f), scale=2)) == "f"
    assert check(functools.partial(f, scale=2)) is True
    assert "Checking f against 1 cases" in capsys.readouterr().out


def test_a_callable_without_a_name_is_a_clear_error():
    class Scaler:
        def __call__(self, x):
            return x

    with pytest.raises(TypeError, match="functions: check\\(\\) picks its cases by the function's name"):
        check(Scaler())


# ----------------------------------------------------------------------------------- what a failure shows


def _raises_value_error(x):
    return x.view(-1, 7)  # the learner's line: a shape error for most sizes


def test_an_exception_found_by_hypothesis_shows_the_learners_line_not_hypothesis(only, capsys):
    def property_case(impl):
        @property_settings(20)
        @given(st.integers(1, 30))
        def prop(n):
            impl.f(torch.zeros(n))

        prop()

    only(_case(property_case))
    _raises_value_error.__name__ = "f"
    assert check(_raises_value_error, raise_on_failure=False) is False
    out = capsys.readouterr().out
    detail = out.split("First failing case: 99_test.property_case")[1]
    assert "your code raised RuntimeError: shape '[-1, 7]' is invalid" in detail
    assert "in _raises_value_error, test_checks.py line" in detail
    assert "return x.view(-1, 7)" in detail
    assert "on the example Hypothesis found:" in detail
    for noise in ("Explanation", "Traceback", "hypothesis/core.py", "Falsifying", "Failing test case"):
        assert noise not in detail, noise


def test_hypothesis_explanation_notes_are_dropped():
    err = ValueError("boom")
    err.add_note("Failing test case: prop(\n    # The test always failed when commented parts were varied together.\n"
                 "    data=data(...),\n)")
    err.add_note("Draw 1 (T): 1  # or any other generated value")
    err.add_note("Draw 2 (mask dtype): torch.bool")
    err.add_note("Explanation:")
    err.add_note("    These lines were always and only run by failing test cases:")
    assert checks._hypothesis_example(err) == ["Draw 1 (T): 1", "Draw 2 (mask dtype): torch.bool"]


def test_bit_patterns_are_reported_with_their_float_values():
    with pytest.raises(CheckFailure) as err:
        expect_equal("values bits", bits(torch.tensor([1.0, -0.0])), bits(torch.tensor([1.0, 1.5])))
    text = str(err.value)
    assert "expected: 1.5 (float32 bits 0x3fc00000)" in text
    assert "got:      -0 (float32 bits 0x80000000)" in text


def test_integers_are_still_reported_as_integers():
    with pytest.raises(CheckFailure, match="expected: 3\n  got:      4"):
        expect_equal("codes", torch.tensor([4]), torch.tensor([3]))


# ----------------------------------------------------------------------------------- hints


def test_a_stub_gets_no_hint(only, capsys):
    def stub(x):
        raise NotImplementedError("f: write this part")

    def uses_f(impl):
        impl.f(torch.ones(1))

    only(_case(uses_f, name="stub_case", hint="THE CONCEPT", code_hint="THE CODE LINE"))
    stub.__name__ = "f"
    for _ in range(3):  # not even after repeated runs
        with pytest.raises(checks.ChecksFailed, match="not implemented yet"):
            check(stub)
    out = capsys.readouterr().out
    assert "[TODO]" in out and "not implemented yet: f: write this part" in out
    assert "THE CONCEPT" not in out and "THE CODE LINE" not in out


def test_the_code_level_hint_comes_after_a_second_failure(only, capsys):
    def wrong(x):
        return x + 1

    def expects_x(impl):
        expect_equal("f(x)", impl.f(torch.zeros(2)), torch.zeros(2))

    only(_case(expects_x, name="tiered_hint_case", hint="THE CONCEPT", code_hint="THE CODE LINE"))
    wrong.__name__ = "f"
    check(wrong, raise_on_failure=False)
    first = capsys.readouterr().out
    assert "hint: THE CONCEPT" in first and "THE CODE LINE" not in first
    assert "a code-level hint appears if check() fails on this case again" in first
    check(wrong, raise_on_failure=False)
    second = capsys.readouterr().out
    assert "hint: THE CONCEPT" in second and "code-level hint: THE CODE LINE" in second


def test_a_stretch_goal_is_reported_but_does_not_fail_check(only, capsys):
    def fails(impl):
        raise CheckFailure("not bit for bit", 1, 2)

    only(_case(lambda impl: None, name="the_maths"), _case(fails, name="bit_parity", stretch=True))

    def f(x):
        return x

    assert check(f) is True
    out = capsys.readouterr().out
    assert "99_test.bit_parity  (f) ... [FAIL] (stretch goal)" in out
    assert "Stretch goal not met yet: 99_test.bit_parity" in out
    assert "1 passed, 0 failed; stretch goals met: 0 of 1" in out


def test_report_format_one_line_a_case_then_the_first_failure():
    def wrong(impl):
        raise CheckFailure("wrong", 1, 2, "h")

    ok = run_case(_case(lambda impl: None, name="ok"), overlay({}))
    bad = run_case(_case(wrong, name="bad", hint="the case's hint, not shown: the failure has its own"), overlay({}))
    assert format_report([ok, bad], "Title").splitlines() == [
        "Title",
        "  99_test.ok  (f) ... [PASS]",
        "  99_test.bad  (f) ... [FAIL]",
        "",
        "First failing case: 99_test.bad",
        "  wrong",
        "    expected: 1",
        "    got:      2",
        "    hint: h",
        "",
        "1 passed, 1 failed",
    ]
