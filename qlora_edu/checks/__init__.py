"""The test battery: one set of checks for the package, the solutions and the learner's own code.

A *case* is a small function that takes an ``impl`` (anything with the course's functions as attributes: the
``qlora_edu`` package, a solution notebook's namespace, or the functions a learner just wrote) and raises
:class:`CheckFailure` (or any exception) when the implementation is wrong.

* ``tests/test_NN_chapter.py`` runs every case of its chapter against ``qlora_edu`` and the chapter's solution.
* ``check(absmax_quantize, absmax_dequantize)`` in an exercise notebook runs the cases that use those functions
  and prints a report as it goes: one line a case (its name, then its verdict), then the first failing case in
  full: expected vs got, or the learner's exception with the line of their code that raised it, and a hint.
* ``python -m qlora_edu.checks exercises/`` checks every exercise notebook at once.

**The chapter is the unit.** Chapter ``NN_name``'s cases live in ``qlora_edu/chNN_name/checks.py`` (the chapter's
package, named as ``notebooks/NN_name.ipynb``, ``exercises/src/NN_name.py`` and ``tests/test_NN_name.py``).
Next to each case stand the *known mistakes* it catches, declared with :func:`mistake`: a function with the real
name and signature of an exercise function that makes one plausible error. The chapter's tests prove that
``check`` fails on each mistake with that very case marked FAIL (and, with ``shows=``, that the report shows the
hint written for that mistake), so the battery is shown to catch what it claims.

Expected values come from facts outside the function under test (the seed notes' worked example, error bounds,
an independent float64 reference, bitsandbytes' bytes), never from the package itself, so a case can fail on the
package too.

**Declaring a case** (``@case(*uses, hint=..., code_hint=..., requires=..., timeout=..., stretch=...)``):

* ``uses``: the course functions the case calls (``check(f)`` runs the cases that use ``f.__name__``).
* ``hint``: the concept, shown with the case's first failure. ``code_hint``: the code-level hint (nearly the
  solution), shown by ``check()`` only once the same case has failed twice in the session. Neither is shown
  for a stub that is not written yet (``[TODO]``).
* ``requires``: what the case needs, one name or a tuple: ``"cuda"`` (a CUDA device), ``"triton"`` (the
  ``triton`` package imports), ``"bitsandbytes-cuda"`` (bitsandbytes quantizes on a CUDA device). More can be
  declared with :func:`requirement`. Where a need is missing the case is *skipped with the reason*:
  ``[SKIP] needs a CUDA device: ...`` in ``check()``'s report, ``pytest.skip(reason)`` in the chapter's tests
  (``tests/chapter_battery.py``), and the known mistakes it catches are skipped with it. A skip never counts as
  a pass: ``check()`` then returns False (without raising, so a CPU machine can run a GPU chapter's notebook).
  A chapter whose every case needs a GPU still has a battery.
* ``timeout``: seconds before the case is stopped (default :data:`DEFAULT_TIMEOUT`): a learner's endless loop is
  reported as ``took longer than N s, stopped``. On POSIX the main thread is interrupted with ``SIGALRM``,
  re-sent every second until the case is left (an alarm that lands where Python ignores exceptions, in a gc
  callback, is not the last); the exception is a ``BaseException``, which Hypothesis does not retry. Elsewhere
  (another thread, no ``SIGALRM``) the case runs in a daemon thread that is abandoned when it overruns.
* ``stretch``: a named stretch goal (bit parity with a library, say): its failure is reported, but does not make
  ``check()`` fail.

**Inputs.** ``check()`` gives every call of a learner's function its own copy of each tensor argument (tensors
that require grad excepted), so an expected value computed from the caller's tensor is computed from unmodified
input; when the function changed an argument in place the case fails and says which one, unless the function
updates it by design (declared with :func:`in_place`, as ``adamw_step`` does its parameter and states).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import re
import signal
import struct
import threading
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings

_PACKAGE = Path(__file__).resolve().parent.parent
#: A chapter's battery module: ``qlora_edu.chNN_name.checks``.
BATTERY_MODULE = re.compile(r"^qlora_edu\.ch(\d\d_[a-z0-9_]+)\.checks$")
#: Seconds a case may run before ``check()`` stops it (a case can state its own ``timeout``).
DEFAULT_TIMEOUT = 120.0


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


class CaseTimeout(BaseException):
    """A case ran past its time limit. A ``BaseException``, like ``KeyboardInterrupt``, so that neither the
    learner's ``except Exception`` nor Hypothesis (which retries on ``Exception``) can swallow it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"took longer than {seconds:g} s, stopped (an endless loop? a loop over every element "
                         "instead of one tensor operation?)")


# ----------------------------------------------------------------------------------- requirements

_REQUIREMENTS: dict[str, Callable[[], str | None]] = {}


def requirement(name: str) -> Callable[[Callable[[], str | None]], Callable[[], str | None]]:
    """Declare a need a case can state with ``requires=name``. The decorated probe returns ``None`` when the need
    is met here, else the reason it is not, worded to follow "[SKIP] " (``"needs a CUDA device: ..."``)."""

    def register(probe: Callable[[], str | None]) -> Callable[[], str | None]:
        _REQUIREMENTS[name] = probe
        return probe

    return register


@requirement("cuda")
def _needs_cuda() -> str | None:
    if torch.cuda.is_available():
        return None
    built = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return (f"needs a CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {built}); "
            "run it on a machine with a GPU")


@requirement("triton")
@functools.cache
def _needs_triton() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure to import is the reason
        return f"needs Triton: `import triton` failed ({type(err).__name__}: {err})"
    return None


@requirement("bitsandbytes-cuda")
@functools.cache
def _needs_bitsandbytes_cuda() -> str | None:
    reason = _needs_cuda()
    if reason:
        return reason
    try:
        bnb_nf4(torch.ones(64, device="cuda"))
    except Exception as err:  # noqa: BLE001 - any failure is the reason
        return f"needs bitsandbytes on CUDA: quantize_4bit on the GPU failed ({type(err).__name__}: {err})"
    return None


def unmet(requires: Iterable[str]) -> str | None:
    """The reason the first unmet need in ``requires`` is missing here, or None when all are met."""
    for name in requires:
        reason = _REQUIREMENTS[name]()
        if reason:
            return reason
    return None


# ----------------------------------------------------------------------------------- cases and mistakes


@dataclass(frozen=True)
class Case:
    """One check. ``uses`` names the functions it calls; ``hint`` (the concept) and ``code_hint`` (code level)
    are shown when it fails; ``requires`` names what it needs; ``timeout`` stops it; ``stretch`` marks a goal
    beyond the exercise."""

    name: str
    chapter: str
    uses: tuple[str, ...]
    hint: str
    fn: Callable[[object], None] = field(repr=False)
    code_hint: str = ""
    requires: tuple[str, ...] = ()
    timeout: float | None = DEFAULT_TIMEOUT
    stretch: bool = False

    def __post_init__(self):
        if isinstance(self.requires, str):  # one need, named on its own
            object.__setattr__(self, "requires", (self.requires,))

    def unmet(self) -> str | None:
        """Why this case cannot run here (``"needs a CUDA device: ..."``), or None."""
        return unmet(self.requires)

    def run(self, impl: object) -> None:
        self.fn(impl)


@dataclass(frozen=True)
class Mistake:
    """A plausible wrong version of an exercise function, the case that must catch it, and (``shows``) a piece
    of text the report must show for it: the hint written for this mistake."""

    name: str
    chapter: str
    function: str
    caught_by: str
    fn: Callable = field(repr=False)
    shows: str = ""


_CASES: dict[str, list[Case]] = {}
_MISTAKES: dict[str, list[Mistake]] = {}
#: Arguments a course function updates by design (``adamw_step``'s param and states): not copied by check().
_IN_PLACE: dict[str, frozenset[str]] = {}


def _chapter_of(fn: Callable) -> str:
    m = BATTERY_MODULE.match(fn.__module__)
    if not m:
        raise ValueError(f"cases and mistakes live in qlora_edu/chNN_name/checks.py, not in {fn.__module__}")
    return m.group(1)


def case(*uses: str, hint: str = "", code_hint: str = "", requires: str | Iterable[str] = (),
         timeout: float | None = DEFAULT_TIMEOUT, stretch: bool = False
         ) -> Callable[[Callable[[object], None]], Callable[[object], None]]:
    """Register the decorated function as a case of the chapter module it is defined in (see the module's
    docstring for the arguments)."""
    needs = (requires,) if isinstance(requires, str) else tuple(requires)
    unknown = [n for n in needs if n not in _REQUIREMENTS]
    if unknown:
        raise ValueError(f"requires: unknown need(s) {unknown}; known: {sorted(_REQUIREMENTS)} "
                         "(declare another with @requirement(name))")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")

    def register(fn: Callable[[object], None]) -> Callable[[object], None]:
        chapter = _chapter_of(fn)
        _CASES.setdefault(chapter, []).append(Case(fn.__name__, chapter, tuple(uses), hint, fn, code_hint, needs,
                                                   timeout, stretch))
        return fn

    return register


def mistake(function: str, *, caught_by: Callable, shows: str = "") -> Callable[[Callable], Callable]:
    """Declare the decorated function a known mistake in writing ``function``, which the case ``caught_by`` (the
    case function defined just above it) must mark as FAIL; ``shows``: text the report must then show (the hint
    this mistake deserves, not another mistake's)."""

    def register(fn: Callable) -> Callable:
        chapter = _chapter_of(fn)
        known = {c.name for c in _CASES.get(chapter, [])}
        if caught_by.__name__ not in known:
            raise ValueError(f"mistake {fn.__name__}: caught_by must be a case of {chapter}, "
                             f"got {caught_by.__name__}")
        _MISTAKES.setdefault(chapter, []).append(Mistake(fn.__name__, chapter, function, caught_by.__name__, fn,
                                                         shows))
        return fn

    return register


def in_place(function: str, *arguments: str) -> None:
    """Declare that ``function`` updates ``arguments`` in place by design: ``check()`` passes the caller's own
    tensors for them (no copy) and does not report their change."""
    _IN_PLACE[function] = _IN_PLACE.get(function, frozenset()) | frozenset(arguments)


def case_of(mistake_: Mistake) -> Case:
    """The case a mistake is declared to be caught by."""
    return next(c for c in cases(mistake_.chapter) if c.name == mistake_.caught_by)


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
            _element(expected, first), _element(got, first), hint)


def _element(t: torch.Tensor, i: int) -> object:
    """Element ``i`` of flat ``t`` for a report; a float32 bit pattern (from :func:`bits`) as its float value
    and its bits."""
    value = t.flatten()[i].item()
    if getattr(t, "float_bits", False):
        as_float = struct.unpack("<f", struct.pack("<i", value))[0]
        return _Hex(f"{as_float:.9g} (float32 bits 0x{value & 0xFFFFFFFF:08x})")
    return value


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
    """What running one case gave: an error (None when it passed), or the reason it was skipped."""

    case: Case
    error: BaseException | None
    skipped: str | None = None
    seconds: float = 0.0
    #: the learner's functions that changed an argument in place (``"mask_prompt_labels(input_ids)"``)
    modified: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """Ran and passed. A skipped case has not passed."""
        return self.error is None and self.skipped is None

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def not_implemented(self) -> bool:
        return isinstance(self.error, NotImplementedError)

    @property
    def timed_out(self) -> bool:
        return isinstance(self.error, CaseTimeout)

    @property
    def verdict(self) -> str:
        """``[PASS]``, ``[FAIL]``, ``[TODO]`` or ``[SKIP]``, with the reason for a skip or a time-out."""
        if self.skipped is not None:
            return f"[SKIP] {self.skipped}"
        if self.error is None:
            return "[PASS]"
        if self.not_implemented:
            return "[TODO]"
        mark = "[FAIL] (stretch goal)" if self.case.stretch else "[FAIL]"
        return f"{mark} {self.error}" if self.timed_out else mark


def _run_with_time_limit(fn: Callable[[], None], seconds: float | None) -> None:
    """Run ``fn()``; raise :class:`CaseTimeout` if it is still running after ``seconds``."""
    if seconds is None:
        fn()
        return
    use_signal = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
                  and signal.getitimer(signal.ITIMER_REAL)[0] == 0)  # no one else's alarm pending
    if use_signal:
        def on_alarm(signum, frame):
            raise CaseTimeout(seconds)

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # then every second, until the case is left
        try:
            fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        return
    # Fallback (another thread, no SIGALRM): run in a daemon thread; an overrunning one is abandoned.
    errors: list[BaseException] = []

    def target():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller's thread
            errors.append(err)

    worker = threading.Thread(target=target, name="qlora_edu-check-case", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise CaseTimeout(seconds)
    if errors:
        raise errors[0]


#: While a case runs: the in-place changes the copying wrappers saw (see :func:`overlay`).
_SEEN_MODIFIED: list[str] | None = None


def run_case(c: Case, impl: object, *, timeout: float | None | bool = True) -> Outcome:
    """Run one case against ``impl``; never raises (a time-out, the learner's exception, a failure are the
    outcome). ``timeout``: True for the case's own limit, a number of seconds, or None/False for none."""
    global _SEEN_MODIFIED
    reason = c.unmet()
    if reason:
        return Outcome(c, None, skipped=reason)
    limit = c.timeout if timeout is True else (timeout or None)
    _SEEN_MODIFIED, seen = [], []
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        _run_with_time_limit(lambda: c.run(impl), limit)
    except (Exception, CaseTimeout) as err:  # noqa: BLE001 - a learner's code may raise anything
        error = err
    finally:
        seen, _SEEN_MODIFIED = _SEEN_MODIFIED, None
    modified = tuple(dict.fromkeys(seen))
    if error is None and modified:
        error = CheckFailure(
            f"your {modified[0].split('(')[0]} changed its argument {modified[0].split('(')[1][:-1]!r} in place "
            "(the check gave it a copy, so the expected values were computed from the unmodified input)",
            _Hex("the argument left as it was"), _Hex("its values changed"),
            "work out of place: x * s or x.masked_fill(...) make a new tensor; x.mul_(s), x.masked_fill_(...) "
            "and x[...] = ... write into the caller's tensor")
    return Outcome(c, error, seconds=time.perf_counter() - start, modified=modified)


def run_cases(impl: object, selected: Iterable[Case], *, timeout: float | None | bool = True,
              on_start: Callable[[Case], None] | None = None,
              on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every case against ``impl``; never raises, returns one :class:`Outcome` a case. ``on_start`` and
    ``on_done`` are called around each case (the live report)."""
    outcomes = []
    for c in selected:
        if on_start:
            on_start(c)
        outcome = run_case(c, impl, timeout=timeout)
        if on_done:
            on_done(outcome)
        outcomes.append(outcome)
    return outcomes


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    equal = a == b
    if a.is_floating_point() or a.is_complex():
        equal |= a.isnan() & b.isnan()
    return bool(equal.all())


def _copying(name: str, fn: Callable) -> Callable:
    """``fn`` called with its own copy of every tensor argument (those it updates by design and those that
    require grad excepted); a copy that comes back changed is recorded for the running case's report."""
    if inspect.isclass(fn):  # a learner's class (chapter 6's LoRALinear): its methods are called on modules
        return fn
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)  # the wrong arguments: let the function say so itself
        keep = _IN_PLACE.get(name, frozenset())
        originals = {}
        for arg, value in bound.arguments.items():
            if arg not in keep and isinstance(value, torch.Tensor) and not value.requires_grad:
                copy = value.clone()
                originals[arg] = (value, copy, copy._version)
                bound.arguments[arg] = copy
        result = fn(*bound.args, **bound.kwargs)
        for arg, (value, copy, version) in originals.items():
            if copy._version != version and not _same(copy, value) and _SEEN_MODIFIED is not None:
                _SEEN_MODIFIED.append(f"{name}({arg})")
        return result

    return call


class _Overlay(types.SimpleNamespace):
    """Attributes given explicitly, and every other name looked up in ``qlora_edu`` when first asked for."""

    def __getattr__(self, name: str):  # called only for names not given
        import qlora_edu

        return getattr(qlora_edu, name)


def overlay(functions: dict[str, Callable]) -> types.SimpleNamespace:
    """The package's functions with ``functions`` laid over them: a learner's ``quantize_4bit`` is checked with
    the package's ``nf4_code`` until they have written their own. Package names are looked up lazily, so only
    the modules a case really uses get imported. Each given function gets its own copy of its tensor arguments
    on every call (see the module's docstring, "Inputs")."""
    return _Overlay(**{name: _copying(name, fn) for name, fn in functions.items()})


def cases_using(names: Iterable[str]) -> list[Case]:
    """The cases that call at least one of ``names``."""
    wanted = set(names)
    return [c for c in all_cases() if wanted & set(c.uses)]


def case_heading(c: Case) -> str:
    """A case's line in a report, up to its verdict: ``  02_nf4.pack_known_example  (pack_4bit, unpack_4bit) ...``"""
    return f"  {c.chapter}.{c.name}  ({', '.join(c.uses)}) ..."


def case_line(o: Outcome) -> str:
    return f"{case_heading(o.case)} {o.verdict}"


#: How many times each case has failed in this session (``check()`` shows the code-level hint from the second).
_FAILURES: Counter[tuple[str, str]] = Counter()


def _learner_frames(tb: types.TracebackType | None, code: set[types.CodeType]) -> list[traceback.FrameSummary]:
    """The frames of ``tb`` from the first one running the learner's code (``code``: the code objects of the
    functions under test) on, in the learner's files; else the last frame."""
    frames = list(traceback.walk_tb(tb))
    start = next((i for i, (frame, _) in enumerate(frames) if frame.f_code in code), None)
    summary = traceback.StackSummary.extract(iter(frames))
    if start is None:
        return list(summary[-1:])
    files = {frames[start][0].f_code.co_filename}
    return [s for s in summary[start:] if s.filename in files][:4]


def _code_objects(functions: Iterable[Callable]) -> set[types.CodeType]:
    codes = set()
    for f in functions:
        while isinstance(f, functools.partial):
            f = f.func
        f = inspect.unwrap(f)
        members = list(vars(f).values()) if inspect.isclass(f) else [f]
        for m in members:
            m = getattr(m, "__func__", m)  # static and class methods
            if hasattr(m, "__code__"):
                codes.add(m.__code__)
    return codes


def _hypothesis_example(err: BaseException) -> list[str]:
    """The example Hypothesis found: its arguments (``n=1``) and ``Draw`` lines, without its comments and its
    "Explanation" block."""
    lines = []
    for note in getattr(err, "__notes__", []):
        if note.startswith("Explanation:"):
            break
        body = note.splitlines()[1:] if note.startswith("Failing test case") else note.splitlines()
        for ln in body:
            ln = ln.split("  #")[0].strip().rstrip(",")
            if ln and not ln.startswith("#") and ln != ")" and "data(...)" not in ln:
                lines.append(ln)
    return lines[:8]


def describe_exception(err: BaseException, functions: Iterable[Callable] = ()) -> list[str]:
    """The learner's exception as a report shows it: its type and message, the line of their code that raised
    it (the first frame in the functions under test, and the frames below it in the same file), and the example
    Hypothesis found; never Hypothesis's "Explanation" block or the battery's own frames."""
    if isinstance(err, BaseExceptionGroup):  # Hypothesis found several distinct failures: the first
        err = err.exceptions[0]
    lines = [f"  your code raised {type(err).__name__}: {err}"]
    for s in _learner_frames(err.__traceback__, _code_objects(functions)):
        lines.append(f"    in {s.name}, {Path(s.filename).name} line {s.lineno}:  {(s.line or '').strip()}")
    example = _hypothesis_example(err)
    if example:
        lines.append("  on the example Hypothesis found:")
        lines += ["    " + ln.strip() for ln in example]
    return lines


def format_report(outcomes: list[Outcome], title: str = "", *, header: bool = True,
                  functions: Iterable[Callable] = (), reveal: Callable[[Case], bool] = lambda c: False) -> str:
    """A short report: one line a case (unless ``header`` is False: the live report printed them already), then
    the first failure in full with its hint; the code-level hint only where ``reveal(case)`` says so; no hint at
    all for a stub not written yet."""
    lines = [title] if title and header else []
    if header:
        lines += [case_line(o) for o in outcomes]
    failed = [o for o in outcomes if o.failed]
    required = [o for o in failed if not o.case.stretch]
    skipped = [o for o in outcomes if o.skipped is not None]
    first = (required or failed or [None])[0]
    if first is not None:
        c = first.case
        lines.append("")
        lines.append(f"{'Stretch goal not met yet' if c.stretch else 'First failing case'}: {c.chapter}.{c.name}")
        if first.not_implemented:
            lines.append(f"  not implemented yet: {first.error}")
        elif isinstance(first.error, CheckFailure | CaseTimeout):
            lines.extend("  " + ln for ln in str(first.error).splitlines())
        else:
            lines.extend(describe_exception(first.error, functions))
        extra = [m for m in first.modified if not isinstance(first.error, CheckFailure)
                 or "in place" not in first.error.what]
        if extra:
            lines.append(f"  note: your function also changed its input in place: {', '.join(extra)}")
        if not first.not_implemented:  # a stub: no hint, which would be nearly the solution
            own = isinstance(first.error, CheckFailure) and first.error.hint
            if c.hint and not own:
                lines.append(f"  hint: {c.hint}")
            if c.code_hint and reveal(c):
                lines.append(f"  code-level hint: {c.code_hint}")
            elif c.code_hint:
                lines.append("  (a code-level hint appears if check() fails on this case again)")
    lines.append("")
    n_pass = sum(o.passed for o in outcomes)
    summary = f"{n_pass} passed, {len(required)} failed"
    if skipped:
        summary += f", {len(skipped)} skipped ({skipped[0].skipped.split(':')[0]})"
    stretch = [o for o in outcomes if o.case.stretch and o.skipped is None]
    if stretch:
        summary += f"; stretch goals met: {sum(o.passed for o in stretch)} of {len(stretch)}"
    lines.append(summary)
    return "\n".join(lines)


class ChecksFailed(AssertionError):
    """Raised by :func:`check` after its report when a case failed, so that a notebook run from a script
    (``jupyter nbconvert --execute``, nbval, a grader) stops with an error instead of passing silently.

    In JupyterLab it shows as one line under the report (IPython renders ``_render_traceback_`` instead of a
    traceback), not as a wall of frames.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31m{type(self).__name__}: {self}\x1b[0m"]


def check_functions(functions: dict[str, Callable], *, verbose: bool = True, title: str | None = None,
                    timeout: float | None | bool = True) -> list[Outcome]:
    """Run every case that uses one of ``functions`` (``{name: function}``); print the report as the cases run
    (each case's name, then its verdict, flushed); return the outcomes."""
    selected = cases_using(functions)
    if not selected:
        raise ValueError(f"functions: no case uses {sorted(functions)}; is the name spelled as in the exercise?")
    title = title or f"Checking {', '.join(functions)} against {len(selected)} cases"
    if verbose:
        print(title, flush=True)

    def start(c: Case) -> None:
        print(case_heading(c), end=" ", flush=True)

    def done(o: Outcome) -> None:
        print(o.verdict, flush=True)

    outcomes = run_cases(overlay(functions), selected, timeout=timeout, on_start=start if verbose else None,
                         on_done=done if verbose else None)
    for o in outcomes:
        if o.failed and not o.not_implemented:
            _FAILURES[o.case.chapter, o.case.name] += 1
    if verbose:
        print(format_report(outcomes, header=False, functions=functions.values(),
                            reveal=lambda c: _FAILURES[c.chapter, c.name] >= 2), flush=True)
    return outcomes


def function_name(f: Callable) -> str:
    """The course name ``check()`` picks cases by: ``f.__name__``, or the wrapped function's for a
    ``functools.partial``."""
    name = getattr(f, "__name__", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(f, functools.partial):
        return function_name(f.func)
    raise TypeError(f"functions: check() picks its cases by the function's name, and {f!r} has none; pass the "
                    "function itself, e.g. check(mask_prompt_labels)")


def check(*functions: Callable, verbose: bool = True, raise_on_failure: bool = True,
          timeout: float | None | bool = True) -> bool:
    """Run the course's test battery against the functions you wrote; print a report as it goes.

    Example (in an exercise notebook)::

        check(absmax_quantize, absmax_dequantize)

    Every case that calls one of these functions runs; functions you have not passed come from ``qlora_edu``.
    Each case is stopped after its time limit (``timeout``: True for each case's own, or seconds). Returns True
    when every case passed. When one failed it raises :class:`ChecksFailed` after the report (one red line in
    JupyterLab; an error exit for a notebook run non-interactively), unless ``raise_on_failure`` is False, in
    which case it returns False. Skipped cases (a need missing here, say a GPU) and unmet stretch goals do not
    raise; a skip makes it return False (it is not a pass).
    """
    if not functions:
        raise ValueError("functions: pass the function(s) you wrote, e.g. check(absmax_quantize)")
    for f in functions:
        if not callable(f):
            raise TypeError(f"functions: expected functions, got {type(f).__name__}")
    outcomes = check_functions({function_name(f): f for f in functions}, verbose=verbose, timeout=timeout)
    failed = [o for o in outcomes if o.failed and not o.case.stretch]
    if failed and raise_on_failure:
        todo = sum(o.not_implemented for o in failed)
        first = failed[0].case
        what = "not implemented yet" if todo == len(failed) else f"first: {first.chapter}.{first.name}"
        raise ChecksFailed(f"{len(failed)} of {len(outcomes)} cases did not pass ({what}); "
                           "see the report above, fix your function and run this cell again")
    return not failed and not any(o.skipped for o in outcomes)


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
    """The float32 bit patterns (tells -0.0 from +0.0), marked so that :func:`expect_equal` reports a difference
    as the float values with their bits."""
    pattern = t.detach().float().contiguous().view(torch.int32)
    pattern.float_bits = True
    return pattern


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
