"""The book's one local Sphinx extension: tables generated from the chapter manifests, and widget outputs a
static page can show.

1. **Generated tables.** Before Sphinx reads a page (``builder-inited``), :func:`write_generated` writes MyST
   files into ``jupyter_book/_build/generated/``, which the landing page and the instructor guide ``{include}``:

   * ``course_map.md``, ``paths.md``: the course map and each chapter's path without / with a GPU, as the README
     and the tour show them (:func:`qlora_edu.common.chapters.course_map_markdown`, ``paths_markdown``);
   * ``run_times.md``: each chapter's declared full run next to the recorded runs of its lesson and solution;
   * ``agenda_half_day.md``, ``agenda_full_day.md``: the instructor guide's agendas, with the recorded machine
     time of the notebooks each slot runs, and a warning where that run takes more than half of the slot.

   The chapters' facts (titles, what they build, paths, expected times, workshop minutes) come from their
   manifests (``qlora_edu/chNN_name/__init__.py``: ``CHAPTER``); the recorded runs from the timing metadata
   Jupyter saved in the committed notebooks (:func:`qlora_edu.common.chapters.recorded_run`). Nothing about a
   chapter is typed here: a new chapter appears in every table, and in the full-day agenda, by itself. The same
   function is runnable alone (``python jupyter_book/_ext/course_book.py``), which is what a Jupyter Book 2 build
   (no Sphinx extensions) would run first.

2. **Widget outputs.** The lessons' ipywidgets need a live kernel. Rendering them in a static page needs the
   widget manager's JavaScript from a CDN (myst-nb's default), which an offline book cannot load, so
   ``nb_ipywidgets_js`` is empty in ``_config.yml`` and this extension replaces each widget view in the page: a
   widget a learner works (an ``interact`` block, any slider, dropdown, button, ...) becomes a one-line note saying
   where it runs; other widgets (progress bars, empty output areas) are dropped. The lessons follow the house
   rule that an interactive callback also runs once non-interactively, so the book shows that static figure.
   The notebooks keep their widgets; only the HTML changes.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

WIDGET_VIEW = '<script type="application/vnd.jupyter.widget-view+json">'
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BOOK = Path(__file__).resolve().parent.parent          # jupyter_book/
ROOT = BOOK.parent                                      # the repository (Sphinx's source folder)
GENERATED = BOOK / "_build" / "generated"
WIDGET_NOTE = ("Interactive widget (sliders): it needs a running Python kernel, so it works in JupyterLab (",
               "make lab", "), not on this page.")
if str(ROOT) not in sys.path:  # the package of the clone this book is built from
    sys.path.insert(0, str(ROOT))

from qlora_edu.common.chapters import (  # noqa: E402 - needs the path above
    Chapter,
    all_chapters,
    chapter,
    course_map_markdown,
    format_minutes,
    format_seconds,
    paths_markdown,
    recorded_run,
    table_cell,
)


def _seconds(notebook: str | None) -> float | None:
    run = recorded_run(ROOT / notebook) if notebook else None
    return run.seconds if run else None


def run_times_markdown(chapters: tuple[Chapter, ...] | None = None) -> str:
    """The instructor guide's table: each chapter's declared full run beside the recorded runs of its notebooks."""
    lines = ["| # | Chapter | Expected, two CPU cores | Lesson's recorded run | Solution's recorded run "
             "| Recorded on |", "|---|---|---|---|---|---|"]
    for c in all_chapters() if chapters is None else chapters:
        lesson = recorded_run(ROOT / c.lesson)
        solution = format_seconds(_seconds(c.solution_notebook)) if c.exercise else "no exercise"
        lines.append(f"| {c.number} | {table_cell(c.title)} | {format_minutes(c.cpu_minutes)} | "
                     f"{format_seconds(lesson.seconds if lesson else None)} | {solution} | "
                     f"{lesson.date if lesson else '–'} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Slot:
    """One row of an agenda: planned minutes, what happens, the notebooks it runs (``"NN_name:lesson"`` /
    ``"NN_name:solution"``), notes. The minutes are a plan (reading, explaining, the exercise); the machine time
    beside them is measured (:func:`agenda_markdown`)."""

    minutes: int
    text: str
    runs: tuple[str, ...] = ()
    notes: str = ""


def chapter_slot(c: Chapter, minutes: int | None = None, part: str | None = None, notes: str | None = None) -> Slot:
    """The slot of chapter ``c``: its manifest's title, workshop minutes and note unless given; ``part`` is
    ``"lesson"``, ``"exercise"`` or (default) the lesson and, when the chapter has one, the exercise."""
    part = part or ("lesson + exercise" if c.exercise else "lesson")
    runs = tuple(f"{c.stem}:{kind}" for kind, name in (("lesson", "lesson"), ("solution", "exercise"))
                 if name in part)
    return Slot(c.workshop_minutes if minutes is None else minutes, f"Chapter {c.number}, {c.title}: {part}", runs,
                c.workshop_note if notes is None else notes)


#: The full day's slots that are not chapters, each placed after the chapter whose number it names (None: before
#: the first). Every chapter with workshop minutes in its manifest takes its slot, in course order, between them.
FULL_DAY_OTHER_SLOTS: tuple[tuple[int | None, Slot], ...] = (
    (None, Slot(10, "Set-up check: everyone's `doctor` is green or yellow", (), "the model converted the day before")),
    (1, Slot(10, "Break")),
    (3, Slot(20, "Questions; the memory bill of a 7B model as a preview")),
    (3, Slot(60, "Lunch", (), "start chapter 8's fine-tune now on slow laptops")),
    (5, Slot(10, "Break")),
)


def full_day() -> list[Slot]:
    """The full-day agenda: the chapters' own slots (manifest minutes) with the breaks of
    :data:`FULL_DAY_OTHER_SLOTS`; chapters with no workshop minutes are the take-home (see :func:`take_home`)."""
    slots = [s for after, s in FULL_DAY_OTHER_SLOTS if after is None]
    for c in all_chapters():
        if c.workshop_minutes:
            slots.append(chapter_slot(c))
        slots += [s for after, s in FULL_DAY_OTHER_SLOTS if after == c.number]
    return slots


def half_day() -> list[Slot]:
    """The half day, chapters 0-3 (from a weight to 4.127 bits): its own minutes, the manifests' titles."""
    return [
        Slot(15, "Set-up check: everyone's `doctor` is green or yellow", (),
             "fix red lines in pairs; anyone still installing follows the book"),
        chapter_slot(chapter("00_tour"), 20, notes="converts the bundled model on first use: ask the room to run it "
                     "the day before"),
        chapter_slot(chapter("01_absmax"), 45, notes="the widget shows the outlier problem; the exercise ends with "
                     "`check(...)`"),
        Slot(10, "Break"),
        chapter_slot(chapter("02_nf4"), 40, "lesson"),
        chapter_slot(chapter("02_nf4"), 30, "exercise", "the battery compares the learners' bytes with bitsandbytes'"),
        chapter_slot(chapter("03_double_quant"), 40, notes="ends at 4.127 bits per parameter, measured"),
        Slot(10, "Wrap-up: where LoRA and training come in (the later chapters, in the book)"),
    ]


def take_home() -> list[Chapter]:
    """The chapters the full day leaves as take-home (no workshop minutes in their manifest)."""
    return [c for c in all_chapters() if not c.workshop_minutes]


def _slot_runs(runs: tuple[str, ...], by_stem: dict[str, Chapter]) -> list[tuple[str, float | None]]:
    """``[(what, recorded seconds or None), ...]`` for a slot's notebooks."""
    found = []
    for run in runs:
        stem, kind = run.split(":")
        c = by_stem[stem]
        found.append((kind, _seconds(c.lesson if kind == "lesson" else c.solution_notebook)))
    return found


def agenda_markdown(slots: list[Slot], take_home_chapters: list[Chapter] = ()) -> str:
    """An agenda as a table: start (h:mm from the start of the day), the slot and its planned minutes, the
    recorded CPU machine time of the notebooks it runs, notes (a warning where that time exceeds half the slot);
    then the take-home chapters, if any."""
    by_stem = {c.stem: c for c in all_chapters()}
    lines = ["| Start | Slot | Planned | Machine time, CPU (recorded runs) | Notes |", "|---|---|---|---|---|"]
    minute = 0
    for slot in slots:
        notes = slot.notes
        if not slot.runs:
            machine = "–"
        else:
            found = _slot_runs(slot.runs, by_stem)
            machine = " + ".join(f"{format_seconds(sec)} {kind}" if sec is not None else f"{kind} not recorded"
                                 for kind, sec in found)
            if sum(sec or 0.0 for _, sec in found) > slot.minutes * 60 / 2:
                notes = (notes + "; " if notes else "") + ("**the runs take over half the slot**: start Run All "
                                                           "at its beginning, or `QLORA_EDU_SMOKE=1 make lab`")
        lines.append(f"| {minute // 60}:{minute % 60:02d} | {table_cell(slot.text)} | {slot.minutes} min | {machine} | "
                     f"{table_cell(notes)} |")
        minute += slot.minutes
    lines.append(f"| {minute // 60}:{minute % 60:02d} | End | | | |")
    for c in take_home_chapters:
        lesson = _seconds(c.lesson)
        lines.append(f"| take-home | Chapter {c.number}, {table_cell(c.title)} | | "
                     f"{format_seconds(lesson)} lesson | {table_cell(c.workshop_note)} |")
    return "\n".join(lines) + "\n"


def write_generated(out: Path = GENERATED) -> list[Path]:
    """Write the course map, the paths, the run times and the agendas into ``out``; rewrite a file only when its
    text changed (Sphinx then re-reads only the pages whose included tables changed)."""
    out.mkdir(parents=True, exist_ok=True)
    texts = [("course_map.md", course_map_markdown("jupyter_book")), ("paths.md", paths_markdown()),
             ("run_times.md", run_times_markdown()), ("agenda_half_day.md", agenda_markdown(half_day())),
             ("agenda_full_day.md", agenda_markdown(full_day(), take_home()))]
    written = []
    for name, text in texts:
        path = out / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


@cache
def _widget_models(notebook: str) -> dict[str, dict]:
    """``{model_id: model}`` from the notebook's saved widget state (empty when it has none)."""
    meta = json.loads(Path(notebook).read_text(encoding="utf-8")).get("metadata", {})
    return meta.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})


#: widget models a learner moves or clicks (``ipywidgets`` model names); a view holding one of them becomes the note
CONTROL_MODELS = re.compile(r"(Slider|RangeSlider|Dropdown|Select|SelectMultiple|ToggleButtons?|RadioButtons|"
                            r"Checkbox|Button|Text|Textarea|BoundedIntText|BoundedFloatText|IntText|FloatText|"
                            r"Combobox|Play|ColorPicker|DatePicker)Model$")


def _has_control(model_id: str, models: dict[str, dict], seen: frozenset = frozenset()) -> bool:
    """True when the widget ``model_id`` is, or contains (through ``children``), a control a learner works."""
    if model_id in seen:  # a malformed state with a cycle
        return False
    model = models.get(model_id, {})
    if CONTROL_MODELS.search(model.get("model_name", "")):
        return True
    state = model.get("state", {})
    if "widget-interact" in state.get("_dom_classes", []):
        return True
    children = [c.removeprefix("IPY_MODEL_") for c in state.get("children", []) if isinstance(c, str)]
    return any(_has_control(c, models, seen | {model_id}) for c in children)


def _replace_widget_views(app, doctree) -> None:
    """``doctree-read``: a widget a learner works (an ``interact`` block, a slider, a dropdown, ...) becomes a note;
    any other widget view (a progress bar, an empty output area) is removed. A view whose model the notebook did
    not save (widget state not stored) counts as a control: the note is the safe side."""
    from docutils import nodes

    source = Path(app.env.doc2path(app.env.docname))
    if source.suffix != ".ipynb":
        return
    models = _widget_models(str(source))
    for raw in list(doctree.findall(nodes.raw)):
        if not raw.astext().startswith(WIDGET_VIEW):
            continue
        view = json.loads(raw.astext()[len(WIDGET_VIEW):].removesuffix("</script>"))
        model_id = view.get("model_id", "")
        if model_id not in models or _has_control(model_id, models):
            before, command, after = WIDGET_NOTE
            note = nodes.paragraph(classes=["widget-note"])
            note += nodes.emphasis("", before, nodes.literal(text=command), nodes.Text(after))
            raw.replace_self(note)
        else:
            parent = raw.parent
            parent.remove(raw)
            # an output container left empty would draw an empty box
            while parent is not None and not parent.children and parent.parent is not None:
                grand = parent.parent
                grand.remove(parent)
                parent = grand


def setup(app):
    app.connect("builder-inited", lambda app: write_generated())
    app.connect("doctree-read", _replace_widget_views)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    for p in write_generated():
        print(p)
    sys.exit(0)
