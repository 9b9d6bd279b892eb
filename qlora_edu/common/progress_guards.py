"""Guard of :func:`qlora_edu.common.progress.progress_bar`."""

from __future__ import annotations

from collections.abc import Iterable

from qlora_edu.common.guards import check_bool, check_int


def check_progress_bar_args(iterable: object, desc: object, total: object, unit: object, enabled: object) -> None:
    """``iterable``: an iterable or None (then ``total`` is required); ``desc``, ``unit``: non-empty str;
    ``total``: an int >= 0 or None; ``enabled``: a bool."""
    if iterable is not None and not isinstance(iterable, Iterable):
        raise TypeError(f"iterable must be iterable or None, got {type(iterable).__name__}")
    for name, value in (("desc", desc), ("unit", unit)):
        if not isinstance(value, str) or not value.strip():
            raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    if total is not None:
        check_int("total", total, low=0)
    elif iterable is None:
        raise ValueError("total is required when there is no iterable (a bar driven by update())")
    check_bool("enabled", enabled)
