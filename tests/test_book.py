"""The book's sources (jupyter_book/): the table of contents lists every notebook of the course, and the
configuration keeps the book offline. Fast and without Jupyter Book installed; `make book` builds it (warnings are
errors) and `make test-browser` checks the built pages in a browser."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from conftest import ROOT

BOOK = ROOT / "jupyter_book"
TOC = BOOK / "_toc.yml"
CONFIG = BOOK / "_config.yml"
# Each notebook folder and the part of the book that holds it.
PARTS = {"notebooks": "Lessons", "exercises": "Exercises", "solutions": "Solutions"}


def expand_glob(pattern: str) -> list[str]:
    """The documents a toc ``glob:`` entry takes, as Sphinx matches it (``*`` and ``[0-9]`` stay within one folder):
    every ``.ipynb`` / ``.md`` under the repository whose path without its suffix matches, sorted."""
    found = {p.relative_to(ROOT).with_suffix("").as_posix() for suffix in (".ipynb", ".md")
             for p in ROOT.glob(pattern + suffix) if p.is_file()}
    return sorted(found)


def toc_entries(toc: dict) -> dict[str, str]:
    """``{document: part caption}`` for every chapter of a jb-book table of contents, its ``glob:`` entries
    expanded (the root maps to "")."""
    entries = {toc["root"]: ""}
    for part in toc.get("parts", []):
        for chapter in part.get("chapters", []):
            for item in [chapter, *chapter.get("sections", [])]:
                names = [item["file"]] if "file" in item else expand_glob(item["glob"])
                entries.update(dict.fromkeys(names, part.get("caption", "")))
    return entries


def missing_from_toc(toc: dict) -> list[str]:
    """Every notebook in notebooks/, exercises/, solutions/ that the toc does not list, or lists in the wrong part."""
    entries = toc_entries(toc)
    problems = []
    for folder, caption in PARTS.items():
        for nb in sorted((ROOT / folder).glob("*.ipynb")):
            name = f"{folder}/{nb.stem}"
            if name not in entries:
                problems.append(f"{name} is not in jupyter_book/_toc.yml (name it NN_name.ipynb like the others, "
                                f"or list it under the part '{caption}')")
            elif entries[name] != caption:
                problems.append(f"{name} is in the part '{entries[name]}', not '{caption}'")
    return problems


def load_toc() -> dict:
    return yaml.safe_load(TOC.read_text())


def test_every_notebook_is_in_the_table_of_contents():
    """Each part takes its folder's NN_name notebooks by a glob: a notebook named otherwise (``4_memory``,
    ``04-memory``) would be left out of the book silently; this names it."""
    assert missing_from_toc(load_toc()) == []


def test_every_exercise_and_solution_has_its_lesson():
    """An exercise links back to its lesson (../notebooks/NN_name.ipynb): without the lesson the book build fails
    with "cross-reference target not found". Commit a chapter's three notebooks together."""
    lessons = {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    orphans = [f"{folder}/{p.name}" for folder in ("exercises", "solutions")
               for p in sorted((ROOT / folder).glob("[0-9][0-9]_*.ipynb")) if p.stem not in lessons]
    assert not orphans, f"no lesson notebooks/NN_name.ipynb for {orphans}"


def test_the_globs_take_the_chapters_and_nothing_else():
    assert expand_glob("notebooks/[0-9][0-9]_*")[:2] == ["notebooks/00_tour", "notebooks/01_absmax"]
    assert all(not name.startswith("exercises/src/") for name in expand_glob("exercises/[0-9][0-9]_*"))


def test_the_check_catches_a_missing_chapter():
    toc = load_toc()
    lessons = next(p for p in toc["parts"] if p["caption"] == "Lessons")
    dropped = toc_entries({"root": "", "parts": [{"chapters": [lessons["chapters"].pop()]}]})
    assert dropped and all(any(p.startswith(f"{name} is not in") for p in missing_from_toc(toc))
                           for name in dropped if name)


def test_every_toc_entry_exists_and_has_a_title():
    """A missing file fails the build; a page without a heading gets no title in the sidebar."""
    for entry in toc_entries(load_toc()):
        matches = [p for p in (ROOT / f"{entry}.ipynb", ROOT / f"{entry}.md") if p.is_file()]
        assert matches, f"_toc.yml lists {entry}, which does not exist"
        text = matches[0].read_text(encoding="utf-8")
        assert re.search(r'^#\s+\S|"#\s+\S', text, re.M), f"{entry} has no top-level heading (# Title)"


def test_every_notebook_names_its_language():
    """The book highlights code by the notebook's kernel metadata (a notebook without it fails the build, "No
    source code lexer"), and JupyterLab asks a learner to pick a kernel for a notebook without it."""
    missing = []
    for entry in toc_entries(load_toc()):
        path = ROOT / f"{entry}.ipynb"
        if path.is_file():
            meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
            if not (meta.get("kernelspec") or meta.get("language_info")):
                missing.append(entry)
    assert not missing, f"no kernelspec/language_info metadata (run `make execute` on them): {missing}"


def test_the_configuration_keeps_the_book_offline_and_static():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["execute"]["execute_notebooks"] == "off", "the book renders the committed outputs"
    sphinx = config["sphinx"]["config"]
    assert "sphinx-mathjax-offline" in sphinx["extensions"], "math must come from the bundled MathJax"
    assert "sphinx_thebe" not in sphinx["extensions"]
    assert sphinx["nb_ipywidgets_js"] == {}, "myst-nb would load the widget manager from a CDN"
    assert config["launch_buttons"]["thebe"] is False
    assert not re.search(r"https?://", yaml.safe_dump(config)), \
        "no URL in the book's configuration: nothing may be fetched at build or read time"


def test_glossary_defines_the_course_terms():
    text = (BOOK / "glossary.md").read_text()
    block = re.search(r"```\{glossary\}\n(.*?)\n```", text, re.S)
    assert block, "the glossary is a Sphinx glossary directive"
    terms = set(re.findall(r"^(\S.*)$", block.group(1), re.M))
    needed = {"NF4", "absmax", "block", "block size", "double quantization", "LoRA", "LoRA rank", "alpha",
              "paged optimizer", "quantization constant", "bf16", "compute dtype", "gradient checkpointing"}
    assert needed <= terms, f"missing: {sorted(needed - terms)}"


def test_generated_tables_list_every_chapter(tmp_path):
    """The landing page's course map and path table, the guide's run times: one row per chapter manifest, the
    recorded runs read from the notebooks."""
    from qlora_edu.common.chapters import all_chapters, format_seconds, recorded_run

    files = {p.stem: p.read_text() for p in _course_book().write_generated(tmp_path)}
    chapters = all_chapters()
    for name in ("course_map", "paths", "run_times"):
        rows = [ln for ln in files[name].splitlines()[2:] if ln.startswith("|")]
        assert len(rows) == len(chapters) > 0, name
    for row, c in zip(files["course_map"].splitlines()[2:], chapters, strict=True):
        assert f"](../notebooks/{c.stem}.ipynb)" in row
    for row, c in zip(files["run_times"].splitlines()[2:], chapters, strict=True):
        run = recorded_run(ROOT / c.lesson)
        assert f"| {format_seconds(run.seconds if run else None)} |" in row


@pytest.mark.parametrize(("page", "table"), [("intro.md", "course_map"), ("intro.md", "paths"),
                                             ("instructor_guide.md", "run_times"),
                                             ("instructor_guide.md", "agenda_half_day"),
                                             ("instructor_guide.md", "agenda_full_day")])
def test_pages_include_the_generated_tables(page, table):
    assert f"{{include}} _build/generated/{table}.md" in (BOOK / page).read_text()


def _course_book():
    sys.path.insert(0, str(BOOK / "_ext"))
    try:
        import course_book
    finally:
        sys.path.remove(str(BOOK / "_ext"))
    return course_book


def test_widget_views_a_learner_works_become_the_note():
    """The book cannot run widgets: an interact block, a bare slider or a box holding a dropdown becomes the note
    (``make lab``); a progress bar (a box of HTML and a FloatProgress) is dropped; an unknown model is a note."""
    has_control = _course_book()._has_control
    models = {
        "interact": {"model_name": "VBoxModel", "state": {"_dom_classes": ["widget-interact"], "children": []}},
        "slider": {"model_name": "IntSliderModel", "state": {}},
        "box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_label", "IPY_MODEL_drop"]}},
        "label": {"model_name": "HTMLModel", "state": {}},
        "drop": {"model_name": "DropdownModel", "state": {}},
        "bar": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_label", "IPY_MODEL_progress"]}},
        "progress": {"model_name": "FloatProgressModel", "state": {}},
        "loop": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_loop"]}},
    }
    assert [has_control(m, models) for m in ("interact", "slider", "box", "drop")] == [True] * 4
    assert [has_control(m, models) for m in ("bar", "progress", "label", "loop")] == [False] * 4


def test_agenda_times_come_from_the_recorded_runs():
    """Start times add up the planned slots; the machine time is the recorded lesson + solution run; a slot whose
    runs take over half of it warns; a take-home chapter is listed after the end."""
    from qlora_edu.common.chapters import chapter, format_seconds, recorded_run

    book = _course_book()
    tour, absmax = chapter("00_tour"), chapter("01_absmax")
    lesson = recorded_run(ROOT / tour.lesson).seconds
    slots = [book.Slot(15, "Setup"), book.chapter_slot(tour, 20, notes="note"),
             book.chapter_slot(tour, 0, part="lesson"), book.Slot(30, "Later")]  # 0 minutes: any run is over half
    text = book.agenda_markdown(slots, [absmax])
    rows = [ln.split(" | ") for ln in text.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| 0:00", "| 0:15", "| 0:35", "| 0:35", "| 1:05", "| take-home"]
    assert rows[1][1] == f"Chapter 0, {tour.title}: lesson" and rows[1][3] == f"{format_seconds(lesson)} lesson"
    assert rows[1][4] == "note |" and "over half the slot" not in rows[1][4]
    assert "over half the slot" in rows[2][4]  # the tour's recorded run does not fit half of no time
    assert rows[5][1] == f"Chapter 1, {absmax.title}"


def test_the_slot_of_a_chapter_follows_its_manifest():
    from qlora_edu.common.chapters import chapter

    book = _course_book()
    nf4 = chapter("02_nf4")
    slot = book.chapter_slot(nf4)
    assert (slot.minutes, slot.runs, slot.notes) == (nf4.workshop_minutes, ("02_nf4:lesson", "02_nf4:solution"),
                                                     nf4.workshop_note)
    assert book.chapter_slot(nf4, 30, "exercise").runs == ("02_nf4:solution",)
    assert book.chapter_slot(chapter("00_tour")).text.endswith(": lesson")
