"""The book's one local Sphinx extension: measured tables, and widget outputs a static page can show.

1. **Generated tables.** Before Sphinx reads a page (``builder-inited``), :func:`write_generated` writes two MyST
   files into ``jupyter_book/_build/generated/``, which the landing page and the instructor guide ``{include}``:

   * ``course_map.md``: one row a lesson: title (from the notebook), what you build and what it is checked
     against (chapter 0's course map), links to its exercise and solution, and its run time;
   * ``run_times.md``: the recorded run times of every lesson and solution, with the date and the device;
   * ``agenda_half_day.md``, ``agenda_full_day.md``: the instructor guide's agendas: the planned slots of
     :data:`AGENDAS` with the recorded machine time of the notebooks each slot runs, and a warning where that
     run takes more than half of the slot.

   Every figure comes from :func:`qlora_edu.common.doctor.chapter_facts`, i.e. from the timing metadata Jupyter saved in
   the committed notebooks: nothing is typed in by hand, so a re-executed notebook updates the book. The same
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
from functools import cache
from pathlib import Path

WIDGET_VIEW = '<script type="application/vnd.jupyter.widget-view+json">'
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
BOOK = Path(__file__).resolve().parent.parent          # jupyter_book/
ROOT = BOOK.parent                                      # the repository (Sphinx's source folder)
GENERATED = BOOK / "_build" / "generated"
WIDGET_NOTE = ("Interactive widget (sliders): it needs a running Python kernel, so it works in JupyterLab (",
               "make lab", "), not on this page.")


def _cell(text: str) -> str:
    """A value safe inside a Markdown table cell."""
    return (text or "").replace("|", "\\|").replace("\n", " ").strip() or "–"


def _link(path: Path | None, label: str) -> str:
    """A link from a page in jupyter_book/ to a notebook of the course ("–" when there is none)."""
    return f"[{label}](../{path.relative_to(ROOT).as_posix()})" if path is not None else "–"


def course_map_markdown(facts) -> str:
    """The landing page's course map: one row a lesson."""
    from qlora_edu.common.doctor import format_seconds

    lines = ["| # | Chapter | You build | Checked against | Exercise | Run time, CPU | Run time, GPU |",
             "|---|---|---|---|---|---|---|"]
    for f in facts:
        cpu = format_seconds(f.lesson_seconds) if f.recorded_device == "cpu" else "not measured"
        gpu = format_seconds(f.lesson_seconds) if f.recorded_device == "cuda" else "not measured"
        notebooks = " / ".join(_link(p, label) for p, label in [(f.exercise, "exercise"), (f.solution, "solution")]
                               if p is not None) or "–"
        lines.append(f"| {f.number} | {_link(f.lesson, _cell(f.title))} | {_cell(f.builds)} | "
                     f"{_cell(f.checked_against)} | {notebooks} | {cpu} | {gpu} |")
    return "\n".join(lines) + "\n"


def run_times_markdown(facts) -> str:
    """The instructor guide's table: the recorded run of every lesson and solution."""
    from qlora_edu.common.doctor import format_seconds

    lines = ["| Chapter | Lesson run | Solution run | Recorded on | Device of the run | Path on a GPU machine |",
             "|---|---|---|---|---|---|"]
    for f in facts:
        if f.follows_machine:
            path = "GPU (`pick_compute()`)"
        elif f.path_note:  # the lesson prints "This chapter's path: the CPU in float32 on every machine"
            path = "CPU (on every machine)"
        else:
            path = "CPU"
        solution = format_seconds(f.solution_seconds) if f.solution else "no exercise"
        lines.append(f"| {f.number} {_cell(f.title)} | {format_seconds(f.lesson_seconds)} | {solution} | "
                     f"{f.recorded_on or '–'} | {f.recorded_device or 'not recorded'} | {path} |")
    return "\n".join(lines) + "\n"


#: The workshop agendas: (planned minutes, slot, notebooks the slot runs as "NN_name:lesson" / "NN_name:solution",
#: notes). The minutes are a plan (reading, explaining, the exercise); the machine time beside them is measured
#: (:func:`agenda_markdown`). A chapter whose notebooks are not in the course yet says so in its row.
AGENDAS = {
    "half_day": [
        (15, "Set-up check: everyone's `doctor` is green or yellow", [],
         "fix red lines in pairs; anyone still installing follows the book"),
        (20, "Chapter 0, tour: the model; are weights normal?", ["00_tour:lesson"],
         "converts the bundled model on first use: ask the room to run it the day before"),
        (45, "Chapter 1, absmax blocks: lesson + exercise", ["01_absmax:lesson", "01_absmax:solution"],
         "the widget shows the outlier problem; the exercise ends with `check(...)`"),
        (10, "Break", [], ""),
        (40, "Chapter 2, NF4: lesson", ["02_nf4:lesson"],
         "start Run All first: the perplexity section is the morning's longest run"),
        (30, "Chapter 2: exercise", ["02_nf4:solution"], "the battery compares the learners' bytes with bitsandbytes'"),
        (40, "Chapter 3, double quantization: lesson + exercise", ["03_double_quant:lesson",
                                                                  "03_double_quant:solution"],
         "ends at 4.127 bits per parameter, measured"),
        (10, "Wrap-up: where LoRA and training come in (chapters 4-9 in the book)", [], ""),
    ],
    "full_day": [
        (10, "Set-up check: everyone's `doctor` is green or yellow", [], "the model converted the day before"),
        (15, "Chapter 0, tour", ["00_tour:lesson"], ""),
        (35, "Chapter 1, absmax blocks: lesson + exercise", ["01_absmax:lesson", "01_absmax:solution"], ""),
        (10, "Break", [], ""),
        (50, "Chapter 2, NF4: lesson + exercise", ["02_nf4:lesson", "02_nf4:solution"],
         "start Run All first (perplexity)"),
        (40, "Chapter 3, double quantization: lesson + exercise", ["03_double_quant:lesson",
                                                                  "03_double_quant:solution"], ""),
        (20, "Questions; the memory bill of a 7B model as a preview", [], ""),
        (60, "Lunch", [], "start chapter 8's fine-tune now on slow laptops"),
        (35, "Chapter 4, the memory formula: lesson + exercise", ["04_memory:lesson", "04_memory:solution"],
         "predicted against measured memory"),
        (45, "Chapter 5, optimizers and paging: lesson + exercise", ["05_optimizers:lesson",
                                                                    "05_optimizers:solution"],
         "paging needs a GPU: on a CPU bitsandbytes runs the paged optimizers unpaged"),
        (10, "Break", [], ""),
        (40, "Chapter 6, LoRA: lesson + exercise", ["06_lora:lesson", "06_lora:solution"], "checked against peft"),
        (40, "Chapter 7, QLoRA from scratch: lesson + exercise", ["07_qlora:lesson", "07_qlora:solution"], ""),
        (40, "Chapter 8, the fine-tune: start it, explain while it runs", ["08_finetune:lesson",
                                                                          "08_finetune:solution"],
         "chapter 9's labs are the take-home"),
    ],
}


def _slot_runs(runs: list[str], by_stem: dict) -> tuple[list[tuple[str, float | None]], list[str]]:
    """``[(what, recorded seconds or None), ...]`` for a slot's notebooks, and the chapters not written yet."""
    found, missing = [], []
    for run in runs:
        stem, kind = run.split(":")
        f = by_stem.get(stem)
        if f is None or (kind == "solution" and f.solution is None):
            missing.append(stem)
        else:
            found.append((kind, f.lesson_seconds if kind == "lesson" else f.solution_seconds))
    return found, missing


def agenda_markdown(facts, slots) -> str:
    """An agenda as a table: start (h:mm from the start of the day), the slot and its planned minutes, the
    recorded CPU machine time of the notebooks it runs, notes (a warning where that time exceeds half the slot)."""
    from qlora_edu.common.doctor import format_seconds

    by_stem = {f.stem: f for f in facts}
    lines = ["| Start | Slot | Planned | Machine time, CPU (recorded runs) | Notes |", "|---|---|---|---|---|"]
    minute = 0
    for planned, slot, runs, notes in slots:
        found, missing = _slot_runs(runs, by_stem)
        if not runs:
            machine = "–"
        elif missing:
            machine = f"chapter not in the course yet ({', '.join(sorted(set(missing)))})"
        else:
            machine = " + ".join(f"{format_seconds(sec)} {kind}" if sec is not None else f"{kind} not recorded"
                                 for kind, sec in found)
            if sum(sec or 0.0 for _, sec in found) > planned * 60 / 2:
                notes = (notes + "; " if notes else "") + ("**the runs take over half the slot**: start Run All "
                                                           "at its beginning, or `QLORA_EDU_SMOKE=1 make lab`")
        lines.append(f"| {minute // 60}:{minute % 60:02d} | {_cell(slot)} | {planned} min | {machine} | "
                     f"{_cell(notes)} |")
        minute += planned
    lines.append(f"| {minute // 60}:{minute % 60:02d} | End | | | |")
    return "\n".join(lines) + "\n"


def write_generated(out: Path = GENERATED) -> list[Path]:
    """Write ``course_map.md``, ``run_times.md`` and the agendas into ``out``; rewrite a file only when its text
    changed (Sphinx then re-reads only the pages whose included tables changed)."""
    from qlora_edu.common.doctor import chapter_facts

    facts = chapter_facts(ROOT)
    out.mkdir(parents=True, exist_ok=True)
    texts = [("course_map.md", course_map_markdown(facts)), ("run_times.md", run_times_markdown(facts))]
    texts += [(f"agenda_{name}.md", agenda_markdown(facts, slots)) for name, slots in AGENDAS.items()]
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
