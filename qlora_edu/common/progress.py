"""Progress bars whose saved state reads correctly everywhere: in JupyterLab, in a terminal, and in a notebook
viewed without a kernel (GitHub, nbviewer, the course's Jupyter Book).

Why not plain ``tqdm.auto``: in a notebook it draws an ipywidgets bar, and a saved notebook keeps, next to the
widget, the plain-text fallback the bar had when it was *created*: ``0%|          | 0/40``. Every viewer without
the live widget shows that unfinished bar, however the run ended.

:func:`progress_bar` wraps tqdm instead:

* in a notebook kernel the bar is a text line in a display slot of its own (tqdm formats it, no widget), updated in
  place at most twice a second, and at the end replaced by one summary line, which is what the saved notebook keeps::

      perplexity of 5 weight formats: 5/5 formats in 193.2 s

* elsewhere (a terminal, pytest, a script) it is tqdm's ordinary bar on stderr, followed by the same summary line.

Usage::

    for fmt in progress_bar(formats, desc="perplexity", unit="formats"):
        ...

    with progress_bar(desc="quantizing", total=210, unit="matrices") as bar:
        for ...:
            bar.update()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from qlora_edu.common.progress_guards import check_progress_bar_args

__all__ = ["progress_bar", "ProgressBar"]

#: Seconds between two redraws of a notebook bar (tqdm's ``mininterval``).
NOTEBOOK_REFRESH_S = 0.5


class _DisplaySlot:
    """A file-like object for tqdm that shows the latest line in one notebook display slot (no widget)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.line = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.line:
            self.line = line
            self.handle.update(_plain(line))

    def flush(self) -> None:
        pass


def _plain(text: str):
    """``text`` as a text/plain display object (shown as is, without quotes)."""
    from IPython.display import Pretty

    return Pretty(text)


def _notebook_handle():
    """A display handle in the current notebook cell, or None outside a notebook kernel."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or not hasattr(shell, "kernel"):  # a terminal IPython has no kernel
        return None
    from IPython.display import display

    return display(_plain(""), display_id=True)


class ProgressBar:
    """A tqdm bar that ends as one plain summary line (see the module docstring). Made by :func:`progress_bar`."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, enabled: bool) -> None:
        from tqdm.std import tqdm

        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = 0
        self.closed = False
        self.start = time.perf_counter()
        self.handle = _notebook_handle() if enabled else None
        if not enabled:
            self.bar = None
        elif self.handle is not None:  # notebook: tqdm's text, drawn into our own display slot
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=_DisplaySlot(self.handle), ncols=100,
                                mininterval=NOTEBOOK_REFRESH_S, ascii=False, leave=False)
        else:
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was made."""
        return time.perf_counter() - self.start

    def summary(self) -> str:
        """The line the bar ends as: ``"desc: n/total unit in 12.3 s"`` (or ``"stopped at"`` when cut short)."""
        of = f"/{self.total}" if self.total is not None else ""
        stopped = self.total is not None and self.n < self.total
        verb = "stopped at " if stopped else ""
        return f"{self.desc}: {verb}{self.n}{of} {self.unit} in {self.elapsed:.1f} s"

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        """Replace the bar by its summary line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is None:
            return
        self.bar.close()
        if self.handle is not None:
            self.handle.update(_plain(self.summary()))
        else:
            print(self.summary(), file=sys.stderr)

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress bar has no iterable: call update() instead of iterating over it")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "steps",
             enabled: bool = True) -> ProgressBar:
    """A progress bar over ``iterable`` (or over ``total`` steps counted with ``update()``) that ends as one line.

    Args:
        iterable: what to iterate over; ``None`` for a bar driven by ``update()`` inside a ``with`` block.
        desc: what is being done, shown before the bar and in the summary (``"perplexity"``).
        total: the number of steps; ``None`` takes ``len(iterable)`` when it has one.
        unit: what a step is, plural (``"windows"``, ``"matrices"``).
        enabled: ``False`` shows nothing (and prints no summary).

    Returns:
        a :class:`ProgressBar`: iterate over it, or use it as a context manager and call ``update()``.
    """
    check_progress_bar_args(iterable, desc, total, unit, enabled)
    return ProgressBar(iterable, desc, total, unit, enabled)


#: The same function under the module's own name, for ``from qlora_edu.common.progress import progress``. It is not in
#: ``__all__``: there ``qlora_edu.common.progress`` would be both this module and this function (the package exposes
#: every
#: ``__all__`` name as ``qlora_edu.<name>``). New code imports :func:`progress_bar`.
progress = progress_bar
