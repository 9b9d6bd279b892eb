"""The course's chapters, each declared once: the ``CHAPTER`` manifest in ``qlora_edu/chNN_name/__init__.py``.

A manifest is plain data (no torch, no imports of the chapter's modules), so reading every chapter's facts costs
a few milliseconds. Everything that lists chapters reads them here: the README's course table and the tour's
course map (checked by ``tests/test_chapters.py``), the book's landing page and agendas, the doctor's per-chapter
lines, and the Makefile's GPU-test and benchmark lists (``python -m qlora_edu.common.chapters gpu-tests``).

Adding chapter ``NN_name`` adds exactly: ``qlora_edu/chNN_name/`` (its manifest, teaching modules, guards,
battery), ``notebooks/NN_name.ipynb``, ``exercises/src/NN_name.py`` (and the generated
``exercises/NN_name.ipynb`` and ``solutions/NN_name.ipynb``), and ``tests/test_NN_name.py``.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

__all__ = ["Chapter", "all_chapters", "chapter"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # qlora_edu/
#: A chapter package's folder name: ``ch`` + two digits + ``_`` + a name (``ch02_nf4``).
PACKAGE_NAME = re.compile(r"^ch(\d\d)_([a-z0-9_]+)$")


@dataclass(frozen=True)
class Chapter:
    """One chapter's facts, declared in its package's ``__init__.py`` as ``CHAPTER = Chapter(...)``.

    Attributes:
        number, name: ``2``, ``"nf4"``; the stem ``02_nf4`` names the lesson, exercise, solution and test file.
        title: the chapter's title as the course map shows it.
        builds: what the learner builds (the course map's "You build" column).
        checked_against: what the chapter's code is checked against.
        cpu_path, gpu_path: what the chapter runs on a machine without / with a CUDA GPU (``gpu_path`` is
            ``"same as the CPU"`` where the chapter does not follow the machine).
        cpu_minutes: the lesson's full run on two CPU cores, in minutes (checked against the recorded run in the
            committed notebook by ``tests/test_chapters.py``).
        workshop_minutes: the minutes a full-day workshop gives the chapter (lesson + exercise).
        exercise: whether the chapter has an exercise and a solution notebook.
        gpu_tests: whether ``tests/test_NN_name.py`` holds ``gpu`` tests (``make test-gpu`` runs those files).
        benchmarks: the scripts in ``benchmarks/`` that time the chapter's code against its reference.
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


#: ``gpu_path`` of a chapter whose code runs the same on every machine.
SAME_AS_CPU = "same as the CPU"


@cache
def all_chapters() -> tuple[Chapter, ...]:
    """Every chapter's manifest, in course order (from the ``qlora_edu/chNN_name/`` folders)."""
    found = []
    for folder in sorted(PACKAGE_DIR.iterdir()):
        m = PACKAGE_NAME.match(folder.name)
        if not (m and (folder / "__init__.py").is_file()):
            continue
        manifest = importlib.import_module(f"qlora_edu.{folder.name}").CHAPTER
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


def _main(argv: list[str]) -> int:
    """``python -m qlora_edu.common.chapters gpu-tests|benchmarks|stems``: lists for the Makefile."""
    what = argv[0] if argv else ""
    if what == "gpu-tests":
        print(" ".join(f"tests/test_{c.stem}.py" for c in all_chapters() if c.gpu_tests))
    elif what == "benchmarks":
        print(" ".join(dict.fromkeys(b for c in all_chapters() for b in c.benchmarks)))
    elif what == "stems":
        print(" ".join(c.stem for c in all_chapters()))
    else:
        print("usage: python -m qlora_edu.common.chapters gpu-tests|benchmarks|stems", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
