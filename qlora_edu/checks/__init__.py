"""The test battery: one set of checks for the package, the solutions and the learner's own code.

A *case* is a small function that takes an ``impl`` (anything with the course's functions as attributes: the
``qlora_edu`` package, a solution notebook's namespace, or the functions a learner just wrote) and raises
:class:`CheckFailure` (or any exception) when the implementation is wrong.

* ``tests/test_NN_chapter.py`` runs every case of its chapter against ``qlora_edu`` and the chapter's solution.
* ``check(absmax_quantize, absmax_dequantize)`` in an exercise notebook runs the cases that use those functions
  and prints a pass/fail report: the first failing case, expected vs got, and a hint.
* ``python -m qlora_edu.checks exercises/`` checks every exercise notebook at once.

**The chapter is the unit.** Chapter ``NN_name``'s cases live in ``qlora_edu/chNN_name/checks.py`` (the chapter's
package, named as ``notebooks/NN_name.ipynb``, ``exercises/src/NN_name.py`` and ``tests/test_NN_name.py``).
Next to each case stand the *known mistakes* it catches, declared with :func:`mistake`: a function with the real
name and signature of an exercise function that makes one plausible error. The chapter's tests prove that
``check`` fails on each mistake with that very case marked FAIL, so the battery is shown to catch what it claims.

Expected values come from facts outside the function under test (the seed notes' worked example, error bounds,
an independent float64 reference, bitsandbytes' bytes), never from the package itself, so a case can fail on the
package too.
"""

from __future__ import annotations

import importlib
import logging
import re
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

_PACKAGE = Path(__file__).resolve().parent.parent
#: A chapter's battery module: ``qlora_edu.chNN_name.checks``.
BATTERY_MODULE = re.compile(r"^qlora_edu\.ch(\d\d_[a-z0-9_]+)\.checks$")


def chapters() -> list[str]:
    """The chapters that have a battery (``qlora_edu/chNN_name/checks.py``), as stems (``02_nf4``), in course order."""
    return sorted(p.parent.name[2:] for p in _PACKAGE.glob("ch[0-9][0-9]_*/checks.py"))


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


@dataclass(frozen=True)
class Mistake:
    """A plausible wrong version of an exercise function, and the case that must catch it."""

    name: str
    chapter: str
    function: str
    caught_by: str
    fn: Callable = field(repr=False)


_CASES: dict[str, list[Case]] = {}
_MISTAKES: dict[str, list[Mistake]] = {}


def _chapter_of(fn: Callable) -> str:
    m = BATTERY_MODULE.match(fn.__module__)
    if not m:
        raise ValueError(f"cases and mistakes live in qlora_edu/chNN_name/checks.py, not in {fn.__module__}")
    return m.group(1)


def case(*uses: str, hint: str = "") -> Callable[[Callable[[object], None]], Callable[[object], None]]:
    """Register the decorated function as a case of the chapter module it is defined in.

    ``uses`` names the course functions the case calls (a learner's ``check(f)`` runs the cases that use ``f``).
    """

    def register(fn: Callable[[object], None]) -> Callable[[object], None]:
        chapter = _chapter_of(fn)
        _CASES.setdefault(chapter, []).append(Case(fn.__name__, chapter, tuple(uses), hint, fn))
        return fn

    return register


def mistake(function: str, *, caught_by: Callable) -> Callable[[Callable], Callable]:
    """Declare the decorated function a known mistake in writing ``function``, which the case ``caught_by`` (the
    case function defined just above it) must mark as FAIL."""

    def register(fn: Callable) -> Callable:
        chapter = _chapter_of(fn)
        known = {c.name for c in _CASES.get(chapter, [])}
        if caught_by.__name__ not in known:
            raise ValueError(f"mistake {fn.__name__}: caught_by must be a case of {chapter}, "
                             f"got {caught_by.__name__}")
        _MISTAKES.setdefault(chapter, []).append(Mistake(fn.__name__, chapter, function, caught_by.__name__, fn))
        return fn

    return register


def _load(chapter: str) -> None:
    if chapter not in chapters():
        raise ValueError(f"chapter must be one of {chapters()}, got {chapter!r}")
    importlib.import_module(f"qlora_edu.ch{chapter}.checks")


def cases(chapter: str) -> list[Case]:
    """All cases of ``chapter`` (a stem like ``"02_nf4"``), in definition order."""
    _load(chapter)
    return list(_CASES.get(chapter, []))


def mistakes(chapter: str) -> list[Mistake]:
    """The known mistakes declared in ``chapter``'s checks, in definition order."""
    _load(chapter)
    return list(_MISTAKES.get(chapter, []))


def all_cases() -> list[Case]:
    return [c for chapter in chapters() for c in cases(chapter)]


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


class _Overlay(types.SimpleNamespace):
    """Attributes given explicitly, and every other name looked up in ``qlora_edu`` when first asked for."""

    def __getattr__(self, name: str):  # called only for names not given
        import qlora_edu

        return getattr(qlora_edu, name)


def overlay(functions: dict[str, Callable]) -> types.SimpleNamespace:
    """The package's functions with ``functions`` laid over them: a learner's ``quantize_4bit`` is checked with
    the package's ``nf4_code`` until they have written their own. Package names are looked up lazily, so only
    the modules a case really uses get imported."""
    return _Overlay(**functions)


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


class ChecksFailed(AssertionError):
    """Raised by :func:`check` after its report when a case failed, so that a notebook run from a script
    (``jupyter nbconvert --execute``, nbval, a grader) stops with an error instead of passing silently.

    In JupyterLab it shows as one line under the report (IPython renders ``_render_traceback_`` instead of a
    traceback), not as a wall of frames.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31m{type(self).__name__}: {self}\x1b[0m"]


def check_functions(functions: dict[str, Callable], *, verbose: bool = True, title: str | None = None
                    ) -> list[Outcome]:
    """Run every case that uses one of ``functions`` (``{name: function}``); print the report; return outcomes."""
    selected = cases_using(functions)
    if not selected:
        raise ValueError(f"functions: no case uses {sorted(functions)}; is the name spelled as in the exercise?")
    outcomes = run_cases(overlay(functions), selected)
    if verbose:
        print(format_report(outcomes, title or f"Checking {', '.join(functions)} against {len(selected)} cases"))
    return outcomes


def check(*functions: Callable, verbose: bool = True, raise_on_failure: bool = True) -> bool:
    """Run the course's test battery against the functions you wrote; print a report.

    Example (in an exercise notebook)::

        check(absmax_quantize, absmax_dequantize)

    Every case that calls one of these functions runs; functions you have not passed come from ``qlora_edu``.
    Returns True when every case passed. When one failed it raises :class:`ChecksFailed` after the report (one
    red line in JupyterLab; an error exit for a notebook run non-interactively), unless ``raise_on_failure`` is
    False, in which case it returns False.
    """
    if not functions:
        raise ValueError("functions: pass the function(s) you wrote, e.g. check(absmax_quantize)")
    for f in functions:
        if not callable(f):
            raise TypeError(f"functions: expected functions, got {type(f).__name__}")
    outcomes = check_functions({f.__name__: f for f in functions}, verbose=verbose)
    failed = [o for o in outcomes if not o.passed]
    if failed and raise_on_failure:
        todo = sum(o.not_implemented for o in failed)
        first = failed[0].case
        what = "not implemented yet" if todo == len(failed) else f"first: {first.chapter}.{first.name}"
        raise ChecksFailed(f"{len(failed)} of {len(outcomes)} cases did not pass ({what}); "
                           "see the report above, fix your function and run this cell again")
    return not failed


# ----------------------------------------------------------------------------------- shared by several chapters


def bnb_functional():
    """``bitsandbytes.functional``, imported without its warning about the optional ``kernels`` package."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    finally:
        logger.setLevel(level)
    return bnbf


def bnb_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """bitsandbytes' NF4 storage of ``x``: ``(packed, quant_state)``, the reference every NF4 case compares with."""
    return bnb_functional().quantize_4bit(x, blocksize=blocksize, quant_type="nf4",
                                          compress_statistics=double_quant)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (tells -0.0 from +0.0)."""
    return t.detach().float().contiguous().view(torch.int32)


def expect_same_bytes(what: str, got: torch.Tensor, expected: torch.Tensor, blocksize: int,
                      hint: str = "") -> None:
    """Packed bytes equal; on failure name the first differing byte, its block and both nibbles, in hex."""
    expect_true(isinstance(got, torch.Tensor), f"{what} should be a torch.Tensor", "Tensor",
                type(got).__name__)
    expect_true(got.dtype == torch.uint8, f"{what} has the wrong dtype", torch.uint8, got.dtype, hint)
    expect_true(tuple(got.shape) == tuple(expected.shape), f"{what} has the wrong shape "
                "(bitsandbytes returns (ceil(n / 2), 1))", tuple(expected.shape), tuple(got.shape), hint)
    diff = (got.flatten() != expected.flatten()).nonzero().flatten()
    if diff.numel():
        i = int(diff[0])
        e, g = int(expected.flatten()[i]), int(got.flatten()[i])
        raise CheckFailure(
            f"{what}: {diff.numel()} of {got.numel()} bytes differ; the first is byte {i} "
            f"(elements {2 * i} and {2 * i + 1}, block {2 * i // blocksize})",
            _Hex(f"0x{e:02x} (codes {e >> 4}, {e & 15})"), _Hex(f"0x{g:02x} (codes {g >> 4}, {g & 15})"), hint)


class _Hex(str):
    """A string shown as is in a report (no quotes)."""

    def __repr__(self) -> str:
        return str(self)


def _short(value: object, limit: int = 300) -> str:
    if isinstance(value, torch.Tensor):
        text = f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}) {value.flatten()[:12].tolist()}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."
