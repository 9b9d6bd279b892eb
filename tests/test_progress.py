"""qlora_edu.common.progress: a bar that ends as one plain line, in a terminal and in a saved notebook."""

from __future__ import annotations

import re

import pytest

import qlora_edu.common.progress as progress_module
from qlora_edu.common.progress import progress_bar

SUMMARY = re.compile(r"^(?P<desc>.+): (?P<stopped>stopped at )?(?P<n>\d+)(/(?P<total>\d+))? (?P<unit>\S+) "
                     r"in \d+\.\d s$")


def _last_line(text: str) -> str:
    return text.replace("\r", "\n").strip().splitlines()[-1].strip()


def test_iterating_yields_every_item_and_ends_with_a_summary(capsys):
    assert list(progress_bar(range(4), desc="demo", unit="items")) == [0, 1, 2, 3]
    match = SUMMARY.match(_last_line(capsys.readouterr().err))
    assert match and match["desc"] == "demo" and match["n"] == "4" and match["total"] == "4"
    assert match["unit"] == "items" and match["stopped"] is None


def test_an_iterable_without_a_length_is_counted():
    bar = progress_bar(iter("abc"), desc="letters")
    assert list(bar) == ["a", "b", "c"]
    assert SUMMARY.match(bar.summary())["n"] == "3" and SUMMARY.match(bar.summary())["total"] is None


def test_a_bar_cut_short_says_so(capsys):
    with progress_bar(desc="windows", total=5, unit="windows") as bar:
        bar.update(2)
    line = _last_line(capsys.readouterr().err)
    assert SUMMARY.match(line)["stopped"] and "2/5 windows" in line


def test_an_error_inside_the_loop_still_closes_the_bar(capsys):
    with pytest.raises(RuntimeError, match="boom"):
        for i in progress_bar(range(3), desc="failing"):
            if i == 1:
                raise RuntimeError("boom")
    assert "failing: stopped at 1/3 steps" in capsys.readouterr().err


def test_disabled_shows_nothing(capsys):
    assert list(progress_bar(range(3), desc="quiet", enabled=False)) == [0, 1, 2]
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


class _FakeHandle:
    """Records what a notebook display slot would show, in order."""

    def __init__(self) -> None:
        self.shown: list[str] = []

    def update(self, obj) -> None:
        self.shown.append(obj.data)


def test_in_a_notebook_the_slot_ends_as_the_summary_line(monkeypatch):
    handle = _FakeHandle()
    monkeypatch.setattr(progress_module, "_notebook_handle", lambda: handle)
    bar = progress_bar(range(3), desc="perplexity", unit="windows")
    list(bar)
    assert handle.shown, "the bar drew nothing"
    assert handle.shown[0].startswith("perplexity:") and "0/3" in handle.shown[0]  # tqdm's text while running
    assert handle.shown[-1] == bar.summary()
    assert "%" not in handle.shown[-1] and SUMMARY.match(handle.shown[-1])["n"] == "3"


@pytest.mark.parametrize(("kwargs", "error", "names"), [
    ({"iterable": 3, "desc": "x"}, TypeError, "iterable"),
    ({"iterable": None, "desc": "x"}, ValueError, "total"),
    ({"iterable": [1], "desc": ""}, TypeError, "desc"),
    ({"iterable": [1], "desc": 5}, TypeError, "desc"),
    ({"iterable": [1], "desc": "x", "unit": None}, TypeError, "unit"),
    ({"iterable": [1], "desc": "x", "total": -1}, ValueError, "total"),
    ({"iterable": [1], "desc": "x", "total": 1.5}, TypeError, "total"),
    ({"iterable": [1], "desc": "x", "enabled": 1}, TypeError, "enabled"),
])
def test_bad_arguments_are_rejected(kwargs, error, names):
    iterable = kwargs.pop("iterable")
    with pytest.raises(error, match=names):
        progress_bar(iterable, **kwargs)


def test_a_saved_notebook_keeps_the_summary_not_a_bar():
    """Executed as `make execute` does (nbclient): the cell's saved output is the summary line only."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import time\nfrom qlora_edu.common.progress import progress_bar\n"
        "for _ in progress_bar(range(4), desc='demo', unit='items'):\n    time.sleep(0.6)\n"))
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    texts = [out["data"]["text/plain"] for out in nb.cells[0].outputs if out["output_type"] == "display_data"]
    assert len(texts) == 1 and SUMMARY.match(texts[0]) and "demo: 4/4 items" in texts[0], nb.cells[0].outputs
    assert not any(out["output_type"] == "stream" for out in nb.cells[0].outputs)


def test_the_module_name_alias_is_the_same_function():
    from qlora_edu.common.progress import progress

    assert progress is progress_bar
    import qlora_edu

    assert qlora_edu.progress_bar is progress_bar
