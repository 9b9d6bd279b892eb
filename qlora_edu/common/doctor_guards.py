"""Guards of the workshop pre-flight check (:mod:`qlora_edu.common.doctor`)."""

from __future__ import annotations

import os
from pathlib import Path

from qlora_edu.common.guards import check_bool


def check_root(name: str, value: object) -> Path | None:
    """``value``: ``None`` (find the course next to the package) or an existing folder."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path to the course's folder (str or PathLike) or None, "
                        f"got {type(value).__name__}")
    if not Path(value).is_dir():
        raise ValueError(f"{name} must be an existing folder (the course repository), got {str(value)!r}")
    return Path(value)


def check_chapter_facts_args(root: object) -> None:
    """``root``: None or the course repository's folder."""
    check_root("root", root)


def check_format_seconds_args(seconds: object) -> None:
    """``seconds``: None or a real number >= 0."""
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"seconds must be a number or None, got {type(seconds).__name__}")
    if not seconds >= 0:
        raise ValueError(f"seconds must be >= 0, got {seconds!r}")


def check_doctor_checks_args(root: object) -> None:
    """``root``: None or the course repository's folder."""
    check_root("root", root)


def check_render_doctor_args(sections: object, color: object) -> None:
    """``sections``: a list of ``(title, [DoctorCheck, ...])`` pairs; ``color``: a bool."""
    from qlora_edu.common.doctor import DoctorCheck

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
