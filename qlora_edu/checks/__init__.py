"""The test battery: one set of checks for the package, the solutions and the learner's own code.

A *case* is a small function that takes an ``impl`` (anything with the course's functions as
attributes: the ``qlora_edu`` module, a solution notebook's namespace, or the functions a learner just
wrote) and raises :class:`CheckFailure` (or any exception) when the implementation is wrong.

* ``tests/`` runs every case against ``qlora_edu`` and against each ``solutions/`` notebook.
* ``check(absmax_quantize, absmax_dequantize)`` in an exercise notebook runs the cases that use those
  functions and prints a pass/fail report: the first failing case, expected vs got, and a hint.
* ``python -m qlora_edu.checks exercises/`` checks every exercise notebook at once.

Cases live in one module per chapter (``qlora_edu/checks/absmax.py`` ...) and register themselves
with the :func:`case` decorator. The expected values come from facts outside the function under test
(the seed notes' worked example, error bounds, an independent float64 reference, bitsandbytes' bytes),
never from the package itself, so a case can fail on the package too.
"""

from __future__ import annotations

import importlib
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, settings

# Chapter modules that hold cases; imported lazily so that importing qlora_edu stays light.
CHAPTER_MODULES = {
    "absmax": "qlora_edu.checks.absmax",
    "nf4": "qlora_edu.checks.nf4",
    "double_quant": "qlora_edu.checks.double_quant",
}


def property_settings(max_examples: int = 40) -> settings:
    """Hypothesis settings for the course's property tests: deterministic (the same examples every run,
    no example database), no deadline (two slow CPU cores), ``max_examples`` examples."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class CheckFailure(AssertionError):
    """A case's verdict: what was checked, what was expected, what came back, and how to fix it."""

    def __init__(self, what: str, expected: object = None, got: object = None, hint: str = ""):
        self.what, self.expected, self.got, self.hint = what, expected, got, hint
        msg = what
        if expected is not None or got is not None:
            msg += f"\n  expected: {_short(expected)}\n  got:      {_short(got)}"
        if hint:
            msg += f"\n  hint: {hint}"
        super().__init__(msg)


@dataclass(frozen=True)
class Case:
    """One check. ``uses`` names the functions it calls; ``hint`` is shown when it fails."""

    name: str
    chapter: str
    uses: tuple[str, ...]
    hint: str
    fn: Callable[[object], None] = field(repr=False)

    def run(self, impl: object) -> None:
        self.fn(impl)


_REGISTRY: dict[str, list[Case]] = {}


def case(*uses: str, hint: str = "") -> Callable[[Callable[[object], None]], Callable[[object], None]]:
    """Register the decorated function as a case of the calling chapter module."""

    def register(fn: Callable[[object], None]) -> Callable[[object], None]:
        chapter = fn.__module__.rsplit(".", 1)[-1]
        _REGISTRY.setdefault(chapter, []).append(
            Case(name=fn.__name__, chapter=chapter, uses=tuple(uses), hint=hint, fn=fn))
        return fn

    return register


def cases(chapter: str) -> list[Case]:
    """All cases of ``chapter`` (a key of :data:`CHAPTER_MODULES`), in definition order."""
    if chapter not in CHAPTER_MODULES:
        raise ValueError(f"chapter must be one of {sorted(CHAPTER_MODULES)}, got {chapter!r}")
    importlib.import_module(CHAPTER_MODULES[chapter])
    return list(_REGISTRY.get(chapter, []))


def all_cases() -> list[Case]:
    return [c for chapter in CHAPTER_MODULES for c in cases(chapter)]


# ----------------------------------------------------------------------------------- assertions


def expect_equal(what: str, got: torch.Tensor, expected: torch.Tensor, hint: str = "") -> None:
    """Exact equality of dtype, shape and every element; on failure, report the first differing index."""
    expect_true(isinstance(got, torch.Tensor), f"{what} should be a torch.Tensor", "Tensor",
                type(got).__name__, hint)
    expect_true(got.dtype == expected.dtype, f"{what} has the wrong dtype", expected.dtype, got.dtype, hint)
    expect_true(tuple(got.shape) == tuple(expected.shape), f"{what} has the wrong shape",
                tuple(expected.shape), tuple(got.shape), hint)
    diff = got != expected
    if expected.is_floating_point():
        diff &= ~(torch.isnan(got) & torch.isnan(expected))
    if bool(diff.any()):
        first = int(diff.flatten().nonzero()[0])
        raise CheckFailure(
            f"{what} differs at {int(diff.sum())} of {diff.numel()} positions; first at flat index {first}",
            expected.flatten()[first].item(), got.flatten()[first].item(), hint)


def expect_close(what: str, got: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 hint: str = "") -> None:
    """``|got - expected| <= atol + rtol * |expected|`` element-wise, shapes equal."""
    expect_true(isinstance(got, torch.Tensor), f"{what} should be a torch.Tensor", "Tensor",
                type(got).__name__, hint)
    expect_true(tuple(got.shape) == tuple(expected.shape), f"{what} has the wrong shape",
                tuple(expected.shape), tuple(got.shape), hint)
    g, e = got.double(), expected.double()
    bad = (g - e).abs() > atol + rtol * e.abs()
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        raise CheckFailure(
            f"{what} is off at {int(bad.sum())} of {bad.numel()} positions (atol={atol}, rtol={rtol}); "
            f"first at flat index {first}", e.flatten()[first].item(), g.flatten()[first].item(), hint)


def expect_true(condition: bool, what: str, expected: object = None, got: object = None, hint: str = "") -> None:
    if not condition:
        raise CheckFailure(what, expected, got, hint)


def expect_raises(what: str, exc_types: type[BaseException] | tuple[type[BaseException], ...],
                  fn: Callable[[], object], mentions: str, hint: str = "") -> None:
    """``fn()`` must raise one of ``exc_types`` whose message mentions ``mentions`` (the argument's name)."""
    try:
        fn()
    except NotImplementedError:
        raise
    except exc_types as err:
        expect_true(mentions in str(err), f"{what}: the error message should name {mentions!r}",
                    f"a message containing {mentions!r}", str(err), hint)
        return
    except Exception as err:  # noqa: BLE001 - we report what came instead
        names = exc_types.__name__ if isinstance(exc_types, type) else "/".join(t.__name__ for t in exc_types)
        raise CheckFailure(f"{what}: raised the wrong kind of error", names,
                           f"{type(err).__name__}: {err}", hint) from err
    raise CheckFailure(f"{what}: no error was raised", f"an error naming {mentions!r}", "no error", hint)


# ----------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    case: Case
    error: BaseException | None

    @property
    def passed(self) -> bool:
        return self.error is None

    @property
    def not_implemented(self) -> bool:
        return isinstance(self.error, NotImplementedError)


def run_cases(impl: object, selected: Iterable[Case]) -> list[Outcome]:
    """Run every case against ``impl``; never raises, returns one :class:`Outcome` a case."""
    outcomes = []
    for c in selected:
        try:
            c.run(impl)
            outcomes.append(Outcome(c, None))
        except Exception as err:  # noqa: BLE001 - a learner's code may raise anything
            outcomes.append(Outcome(c, err))
    return outcomes


def overlay(functions: dict[str, Callable]) -> types.SimpleNamespace:
    """The package's functions with ``functions`` laid over them: a learner's ``quantize_4bit`` is
    checked with the package's ``nf4_code`` until they have written their own."""
    import qlora_edu

    names = {n: getattr(qlora_edu, n) for n in dir(qlora_edu) if not n.startswith("_")}
    names.update(functions)
    return types.SimpleNamespace(**names)


def cases_using(names: Iterable[str]) -> list[Case]:
    """The cases that call at least one of ``names``."""
    wanted = set(names)
    return [c for c in all_cases() if wanted & set(c.uses)]


def format_report(outcomes: list[Outcome], title: str = "") -> str:
    """A short report: one line a case, then the first failure in full with its hint."""
    lines = [title] if title else []
    for o in outcomes:
        mark = "PASS" if o.passed else ("TODO" if o.not_implemented else "FAIL")
        lines.append(f"  [{mark}] {o.case.chapter}.{o.case.name}  ({', '.join(o.case.uses)})")
    failed = [o for o in outcomes if not o.passed]
    n_pass = len(outcomes) - len(failed)
    if failed:
        first = failed[0]
        lines.append("")
        lines.append(f"First failing case: {first.case.chapter}.{first.case.name}")
        if first.not_implemented:
            lines.append(f"  not implemented yet: {first.error}")
        elif isinstance(first.error, CheckFailure):
            lines.extend("  " + ln for ln in str(first.error).splitlines())
        else:
            tb = traceback.format_exception(type(first.error), first.error, first.error.__traceback__)
            lines.append("  your code raised an exception:")
            lines.extend("    " + ln for ln in "".join(tb[-3:]).rstrip().splitlines())
        if first.case.hint and not (isinstance(first.error, CheckFailure) and first.error.hint):
            lines.append(f"  hint: {first.case.hint}")
    lines.append("")
    lines.append(f"{n_pass} passed, {len(failed)} failed")
    return "\n".join(lines)


def check(*functions: Callable, verbose: bool = True) -> bool:
    """Run the course's test battery against the functions you wrote; print a report.

    Example (in an exercise notebook)::

        check(absmax_quantize, absmax_dequantize)

    Every case that calls one of these functions runs; functions you have not passed come from
    ``qlora_edu``. Returns True when every case passed.
    """
    if not functions:
        raise ValueError("functions: pass the function(s) you wrote, e.g. check(absmax_quantize)")
    for f in functions:
        if not callable(f):
            raise TypeError(f"functions: expected functions, got {type(f).__name__}")
    given = {f.__name__: f for f in functions}
    selected = cases_using(given)
    if not selected:
        raise ValueError(f"functions: no case uses {sorted(given)}; is the name spelled as in the exercise?")
    outcomes = run_cases(overlay(given), selected)
    if verbose:
        print(format_report(outcomes, f"Checking {', '.join(given)} against {len(selected)} cases"))
    return all(o.passed for o in outcomes)


def _short(value: object, limit: int = 300) -> str:
    if isinstance(value, torch.Tensor):
        text = f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}) {value.flatten()[:12].tolist()}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."
