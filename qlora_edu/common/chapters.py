"""The course's chapters, each declared once: the ``CHAPTER`` manifest in ``qlora_edu/chNN_name/__init__.py``.

A manifest is plain data (no torch, no imports of the chapter's modules), so reading every chapter's facts costs
a few milliseconds. Everything that lists chapters reads them here:

* the README's course table (:func:`course_map_markdown`, written by ``make readme``; ``tests/test_chapters.py``
  fails when it is stale), the tour's course map and path table (a cell of ``notebooks/00_tour.ipynb`` renders
  :func:`course_map_markdown` and :func:`paths_markdown`), the book's landing page, run times and agendas
  (``jupyter_book/_ext/course_book.py``);
* the doctor's per-chapter lines (:mod:`qlora_edu.common.doctor`);
* the Makefile's GPU-test and benchmark lists (``python -m qlora_edu.common.chapters gpu-tests|benchmarks``).

What is measured rather than declared is read from Jupyter's own records: :func:`recorded_run` sums the cell
timings that Jupyter saves in an executed notebook (``metadata.execution``). Nothing here reads a notebook's text.

Adding chapter ``NN_name`` adds exactly: ``qlora_edu/chNN_name/`` (its manifest, teaching modules, guards,
battery), ``notebooks/NN_name.ipynb``, ``exercises/src/NN_name.py`` (and the generated
``exercises/NN_name.ipynb`` and ``solutions/NN_name.ipynb``), and ``tests/test_NN_name.py``.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path, PurePosixPath

__all__ = ["Chapter", "RecordedRun", "all_chapters", "chapter", "course_map_markdown", "paths_markdown",
           "recorded_run", "format_seconds", "format_minutes"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # qlora_edu/
#: The repository the package sits in (a clone or an editable install), or None for an installed wheel.
COURSE_ROOT: Path | None = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "notebooks").is_dir() else None
#: A chapter package's folder name: ``ch`` + two digits + ``_`` + a name (``ch02_nf4``).
PACKAGE_NAME = re.compile(r"^ch(\d\d)_([a-z0-9_]+)$")
#: ``gpu_path`` of a chapter whose code runs the same on every machine.
SAME_AS_CPU = "same as the CPU"


@dataclass(frozen=True)
class Chapter:
    """One chapter's facts, declared in its package's ``__init__.py`` as ``CHAPTER = Chapter(...)``.

    Attributes:
        number, name: ``2``, ``"nf4"``; the stem ``02_nf4`` names the lesson, exercise, solution and test file.
        title: the chapter's title as the course map shows it.
        builds: what the learner builds (the course map's "You build" column).
        checked_against: what the chapter's code is checked against.
        cpu_path, gpu_path: what the chapter runs on a machine without / with a CUDA GPU (``gpu_path`` is
            ``SAME_AS_CPU`` where the chapter does not follow the machine).
        cpu_minutes: the lesson's full run (``QLORA_EDU_SMOKE=0``) on two CPU cores, in minutes; it must agree
            with the recorded run in the committed notebook (``tests/test_chapters.py`` states the factor).
        workshop_minutes: the minutes the full-day workshop agenda gives the chapter (lesson + exercise); 0 for a
            chapter left as take-home.
        workshop_note: what the instructor should know for that slot (shown in the agenda), or "".
        exercise: whether the chapter has an exercise template ``exercises/src/NN_name.py`` (and so the generated
            exercise and solution notebooks).
        tests: whether the chapter has its test file ``tests/test_NN_name.py``.
        gpu_tests: whether the chapter's tests hold ``gpu``-marked tests (``make test-gpu`` runs those files).
        benchmarks: the scripts in ``benchmarks/`` that measure the chapter's code against its reference
            (``make bench`` runs them).
    """

    number: int
    name: str
    title: str
    builds: str
    checked_against: str
    cpu_path: str
    gpu_path: str
    cpu_minutes: float
    workshop_minutes: int
    exercise: bool = True
    gpu_tests: bool = False
    benchmarks: tuple[str, ...] = field(default=())
    tests: bool = True
    workshop_note: str = ""

    def __post_init__(self) -> None:
        """A manifest with a wrong field fails where it is declared, naming the field."""
        if isinstance(self.number, bool) or not isinstance(self.number, int) or not 0 <= self.number <= 99:
            raise ValueError(f"number must be an int in [0, 99] (two digits of the stem), got {self.number!r}")
        if not (isinstance(self.name, str) and re.fullmatch(r"[a-z0-9_]+", self.name)):
            raise ValueError(f"name must be lower-case letters, digits and _ (the stem's name), got {self.name!r}")
        for key in ("title", "builds", "checked_against", "cpu_path", "gpu_path", "workshop_note"):
            if not isinstance(getattr(self, key), str):
                raise TypeError(f"{key} must be a str, got {type(getattr(self, key)).__name__}")
        for key in ("title", "cpu_path", "gpu_path"):
            if not getattr(self, key).strip():
                raise ValueError(f"{key} must not be empty")
        minutes = self.cpu_minutes
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0:
            raise ValueError(f"cpu_minutes must be a number > 0 (the lesson's full run), got {minutes!r}")
        if isinstance(self.workshop_minutes, bool) or not isinstance(self.workshop_minutes, int) \
                or self.workshop_minutes < 0:
            raise ValueError(f"workshop_minutes must be an int >= 0 (0: take-home), got {self.workshop_minutes!r}")
        for key in ("exercise", "gpu_tests", "tests"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key} must be a bool, got {getattr(self, key)!r}")
        if not (isinstance(self.benchmarks, tuple) and all(isinstance(b, str) for b in self.benchmarks)):
            raise TypeError(f"benchmarks must be a tuple of paths (str) under benchmarks/, got {self.benchmarks!r}")

    @property
    def stem(self) -> str:
        return f"{self.number:02d}_{self.name}"

    @property
    def package(self) -> str:
        return f"qlora_edu.ch{self.stem}"

    @property
    def follows_machine(self) -> bool:
        """Whether the chapter takes another path on a machine with a CUDA GPU."""
        return self.gpu_path != SAME_AS_CPU

    # The chapter's files, relative to the repository root (None where the manifest declares none).
    @property
    def lesson(self) -> str:
        return f"notebooks/{self.stem}.ipynb"

    @property
    def exercise_source(self) -> str | None:
        return f"exercises/src/{self.stem}.py" if self.exercise else None

    @property
    def exercise_notebook(self) -> str | None:
        return f"exercises/{self.stem}.ipynb" if self.exercise else None

    @property
    def solution_notebook(self) -> str | None:
        return f"solutions/{self.stem}.ipynb" if self.exercise else None

    @property
    def test_file(self) -> str | None:
        return f"tests/test_{self.stem}.py" if self.tests else None


@cache
def all_chapters() -> tuple[Chapter, ...]:
    """Every chapter's manifest, in course order (from the ``qlora_edu/chNN_name/`` folders)."""
    found = []
    for folder in sorted(PACKAGE_DIR.iterdir()):
        m = PACKAGE_NAME.match(folder.name)
        if not (m and (folder / "__init__.py").is_file()):
            continue
        manifest = getattr(importlib.import_module(f"qlora_edu.{folder.name}"), "CHAPTER", None)
        if not isinstance(manifest, Chapter):
            raise ImportError(f"qlora_edu/{folder.name}/__init__.py must declare CHAPTER = Chapter(...)")
        if (manifest.number, manifest.name) != (int(m.group(1)), m.group(2)):
            raise ImportError(f"qlora_edu/{folder.name}/__init__.py declares chapter {manifest.stem}")
        found.append(manifest)
    return tuple(found)


def chapter(stem: str) -> Chapter:
    """The manifest of chapter ``stem`` (``"02_nf4"``)."""
    by_stem = {c.stem: c for c in all_chapters()}
    if stem not in by_stem:
        raise ValueError(f"stem must be one of {sorted(by_stem)}, got {stem!r}")
    return by_stem[stem]


# ------------------------------------------------------------------------------------------------ measured


@dataclass(frozen=True)
class RecordedRun:
    """The last run of an executed notebook, as Jupyter recorded it.

    Attributes:
        seconds: the sum of the code cells' times (``iopub.execute_input`` -> ``shell.execute_reply``).
        date: the day of the first timed cell, ``YYYY-MM-DD``.
        cells: how many code cells carry a timing.
    """

    seconds: float
    date: str
    cells: int


def recorded_run(notebook: str | Path) -> RecordedRun | None:
    """The recorded run of ``notebook`` (a path), or None when it is missing or no cell carries a timing."""
    path = Path(notebook)
    if not path.is_file():
        return None
    total, first, timed = 0.0, None, 0
    for cell in json.loads(path.read_text(encoding="utf-8")).get("cells", []):
        ex = cell.get("metadata", {}).get("execution", {})
        start, end = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if not (start and end):
            continue
        t0 = datetime.fromisoformat(start.replace("Z", "+00:00"))
        t1 = datetime.fromisoformat(end.replace("Z", "+00:00"))
        total += max((t1 - t0).total_seconds(), 0.0)
        first = first or t0.date().isoformat()
        timed += 1
    return RecordedRun(total, first, timed) if timed else None


def format_seconds(seconds: float | None) -> str:
    """A run time for people: ``"15 s"`` below 90 s, else ``"3.8 min"``; ``"not recorded"`` for None."""
    if seconds is None:
        return "not recorded"
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"seconds must be a number or None, got {type(seconds).__name__}")
    if not seconds >= 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def format_minutes(minutes: float) -> str:
    """A declared run time: ``"~42 s"`` below a minute, else ``"~1.5 min"`` / ``"~10 min"``."""
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
        raise ValueError(f"minutes must be a number >= 0, got {minutes!r}")
    return f"~{minutes * 60:.0f} s" if minutes < 1 else f"~{minutes:g} min"


# ------------------------------------------------------------------------------------------------ tables


def table_cell(text: str) -> str:
    """A value safe inside a Markdown table cell ("–" for an empty one)."""
    return (text or "").replace("|", "\\|").replace("\n", " ").strip() or "–"


def _link(target: str, page_dir: str, label: str) -> str:
    """A Markdown link from a page in ``page_dir`` (relative to the repository root) to ``target``."""
    depth = len(PurePosixPath(page_dir).parts) if page_dir else 0
    target_path = PurePosixPath(target)
    if page_dir and target_path.parts[:depth] == PurePosixPath(page_dir).parts:
        rel = PurePosixPath(*target_path.parts[depth:])
    else:
        rel = PurePosixPath(*([".."] * depth), target_path)
    return f"[{label}]({rel.as_posix()})"


def course_map_markdown(page_dir: str = "", chapters: tuple[Chapter, ...] | None = None) -> str:
    """The course map: one row a chapter, with links from a page in ``page_dir``.

    Args:
        page_dir: the folder of the page showing the table, relative to the repository root: ``""`` for the
            README, ``"notebooks"`` for the tour, ``"jupyter_book"`` for the book's landing page.
        chapters: the manifests to list (default: :func:`all_chapters`).

    Returns:
        A Markdown table ``| # | Chapter | You build | Checked against | Exercise | Package |``, newline-terminated.
    """
    if not isinstance(page_dir, str):
        raise TypeError(f"page_dir must be a folder relative to the repository root (str), got {page_dir!r}")
    lines = ["| # | Chapter | You build | Checked against | Exercise | Package |",
             "|---|---|---|---|---|---|"]
    for c in all_chapters() if chapters is None else chapters:
        exercise = (f"{_link(c.exercise_notebook, page_dir, 'exercise')}, "
                    f"{_link(c.solution_notebook, page_dir, 'solution')}" if c.exercise else "–")
        lines.append(f"| {c.number} | {_link(c.lesson, page_dir, table_cell(c.title))} | {table_cell(c.builds)} | "
                     f"{table_cell(c.checked_against)} | {exercise} | `{c.package}` |")
    return "\n".join(lines) + "\n"


def paths_markdown(chapters: tuple[Chapter, ...] | None = None) -> str:
    """Which path each chapter takes without and with a CUDA GPU, and its full run on two CPU cores.

    Returns:
        A Markdown table ``| # | Chapter | Without a GPU | With a CUDA GPU | Full run, two CPU cores |``.
    """
    lines = ["| # | Chapter | Without a GPU | With a CUDA GPU | Full run, two CPU cores |", "|---|---|---|---|---|"]
    for c in all_chapters() if chapters is None else chapters:
        gpu = c.gpu_path if c.follows_machine else "same"
        lines.append(f"| {c.number} | {table_cell(c.title)} | {table_cell(c.cpu_path)} | {table_cell(gpu)} | "
                     f"{format_minutes(c.cpu_minutes)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the README

README_BEGIN = ("<!-- The course table is generated from the chapter manifests (qlora_edu/chNN_name/__init__.py) by "
                "`make readme`; edit the manifests, not this table. -->")
README_END = "<!-- end of the generated course table -->"


def readme_with_table(text: str) -> str:
    """``text`` (the README) with the course table between its two marker lines regenerated."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"text: the README must hold the marker lines {README_BEGIN!r} and {README_END!r}, "
                         "in that order, around its course table")
    return text[:begin] + README_BEGIN + "\n\n" + course_map_markdown("") + "\n" + text[end:]


def _readme(argv: list[str]) -> int:
    """``readme [--check]``: rewrite the README's course table, or (``--check``) exit 1 when it is stale."""
    if COURSE_ROOT is None:
        print("readme: no README.md next to the package (run this from a clone of the course)", file=sys.stderr)
        return 2
    path = COURSE_ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    new = readme_with_table(text)
    if "--check" in argv:
        if new != text:
            print("README.md: the course table differs from the chapter manifests; run `make readme`",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
        print("README.md: course table regenerated from the chapter manifests")
    return 0


# ------------------------------------------------------------------------------------------------ command line


def gpu_test_files() -> list[str]:
    """The test files ``make test-gpu`` runs: those of the chapters that declare ``gpu_tests``."""
    return [c.test_file for c in all_chapters() if c.gpu_tests and c.test_file]


def benchmark_scripts() -> list[str]:
    """The scripts ``make bench`` runs, each once, in course order."""
    return list(dict.fromkeys(b for c in all_chapters() for b in c.benchmarks))


USAGE = "usage: python -m qlora_edu.common.chapters gpu-tests|benchmarks|stems|readme [--check]"


def _main(argv: list[str]) -> int:
    """The lists the Makefile needs, and ``readme`` (see :func:`_readme`)."""
    what = argv[0] if argv else ""
    if what == "gpu-tests":
        print(" ".join(gpu_test_files()))
    elif what == "benchmarks":
        print(" ".join(benchmark_scripts()))
    elif what == "stems":
        print(" ".join(c.stem for c in all_chapters()))
    elif what == "readme":
        return _readme(argv[1:])
    else:
        print(USAGE, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run as a script this file is ``__main__``; the manifests were built with the class of
    # ``qlora_edu.common.chapters``, so answer from that module.
    from qlora_edu.common import chapters

    sys.exit(chapters._main(sys.argv[1:]))
