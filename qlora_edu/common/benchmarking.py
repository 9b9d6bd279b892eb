"""Timing ours against a reference, fairly, in one process: what the lessons' "how fast is it?" cells and
``benchmarks/`` use.

Each pair runs interleaved (ours, theirs, ours, theirs, ...) after a warm-up, so that a noisy neighbour on a
shared machine slows both sides alike, and the medians are compared: ratio = our time / the reference's time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from qlora_edu.common.guards import check_int

__all__ = ["interleaved_medians", "compare_timings"]


def interleaved_medians(ours: Callable[[], object], theirs: Callable[[], object], *, repeats: int = 9,
                        warmup: int = 2) -> tuple[float, float]:
    """Median seconds of ``ours()`` and ``theirs()`` over ``repeats`` interleaved runs, after ``warmup`` each."""
    check_int("repeats", repeats, low=1)
    check_int("warmup", warmup, low=0)
    for _ in range(warmup):
        ours()
        theirs()
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (theirs, t_theirs)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_theirs)


def compare_timings(pairs: dict[str, tuple[Callable[[], object], Callable[[], object]]], *, repeats: int = 9,
                    warmup: int = 2, reference: str = "bitsandbytes", verbose: bool = True
                    ) -> dict[str, tuple[float, float, float]]:
    """Time each ``name: (ours, theirs)`` pair; print a table; return ``{name: (ours_ms, theirs_ms, ratio)}``."""
    results = {}
    for name, (ours, theirs) in pairs.items():
        t_ours, t_theirs = interleaved_medians(ours, theirs, repeats=repeats, warmup=warmup)
        results[name] = (t_ours * 1e3, t_theirs * 1e3, t_ours / t_theirs)
    if verbose:
        width = max(len(n) for n in results) + 2
        print(f"median of {repeats} interleaved runs")
        print(f"{'':<{width}}{'qlora_edu ms':>14}{reference + ' ms':>18}{'ratio':>8}")
        for name, (ours_ms, theirs_ms, ratio) in results.items():
            print(f"{name:<{width}}{ours_ms:>14.1f}{theirs_ms:>18.1f}{ratio:>8.2f}")
    return results
