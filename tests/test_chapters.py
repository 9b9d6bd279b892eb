"""Each chapter's facts have one source, its manifest (``CHAPTER`` in ``qlora_edu/chNN_name/__init__.py``).

1. Every manifest agrees with the tree: the files it declares exist exactly when declared, ``gpu_tests`` matches
   the ``gpu`` marks of the chapter's tests, its benchmarks exist, its expected time agrees with the lesson's
   recorded run; and no chapter file exists without a manifest.
2. Everything that lists chapters agrees with the manifests: the README's course table, the tour's tables (their
   cells render the manifests, their saved outputs are current), the book's generated tables and agendas, the
   doctor's chapter lines, the Makefile's ``test-gpu`` and ``bench`` lists.
3. The README's "For contributors" section names exactly what adding chapter ``NN_name`` adds, and a synthetic
   chapter with only those files, added to a copy of the course, appears everywhere with no edit elsewhere.

No torch here: this file runs in a copy of the course too (test 3).
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_edu.common.chapters import (
    Chapter,
    all_chapters,
    benchmark_scripts,
    course_map_markdown,
    gpu_test_files,
    paths_markdown,
    readme_with_table,
    recorded_run,
)

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = all_chapters()
#: How far a manifest's ``cpu_minutes`` may be from the lesson's recorded run (either way). The declared time is a
#: planning figure for a room of laptops; the recorded run is one run on the shared two-core test machine, whose
#: busy cores stretch a run. Beyond a factor of 2 the plan is wrong: update ``cpu_minutes`` or re-run the lesson.
TIME_FACTOR = 2.0
#: the chapter files, by folder, that must belong to a manifest (``{stem}`` is filled in)
CHAPTER_FILE_PATTERNS = {"notebooks": "[0-9][0-9]_*.ipynb", "exercises/src": "[0-9][0-9]_*.py",
                         "exercises": "[0-9][0-9]_*.ipynb", "solutions": "[0-9][0-9]_*.ipynb",
                         "tests": "test_[0-9][0-9]_*.py"}
TOUR = ROOT / "notebooks" / "00_tour.ipynb"
README = ROOT / "README.md"


def _ids(c: Chapter) -> str:
    return c.stem


def test_the_manifests_are_found_and_read_without_torch():
    """One manifest a package folder, in course order; reading them imports no torch (the Makefile asks for the
    GPU-test list on a machine where torch may be another interpreter's)."""
    code = ("import sys; from qlora_edu.common.chapters import all_chapters; "
            "print(' '.join(c.stem for c in all_chapters())); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    stems, torch_loaded = out.stdout.split("\n")[:2]
    folders = sorted(p.name[2:] for p in (ROOT / "qlora_edu").glob("ch[0-9][0-9]_*") if (p / "__init__.py").is_file())
    assert stems.split() == folders == [c.stem for c in CHAPTERS]
    assert torch_loaded == "False"
    assert len({c.number for c in CHAPTERS}) == len(CHAPTERS), "two chapters share a number"


@pytest.mark.parametrize("c", CHAPTERS, ids=_ids)
def test_declared_files_exist_exactly_when_declared(c):
    assert (ROOT / f"qlora_edu/ch{c.stem}").is_dir()
    assert (ROOT / c.lesson).is_file(), f"{c.stem}: no lesson {c.lesson}"
    pair = [f"exercises/src/{c.stem}.py", f"exercises/{c.stem}.ipynb", f"solutions/{c.stem}.ipynb"]
    if c.exercise:
        assert [c.exercise_source, c.exercise_notebook, c.solution_notebook] == pair
        missing = [p for p in pair if not (ROOT / p).is_file()]
        assert not missing, f"{c.stem} declares exercise=True, but {missing} do not exist"
    else:
        found = [p for p in pair if (ROOT / p).exists()]
        assert not found, f"{c.stem} declares exercise=False, but {found} exist"
    test_file = ROOT / f"tests/test_{c.stem}.py"
    assert test_file.is_file() == c.tests, f"{c.stem} declares tests={c.tests}, but {test_file.name} " \
        f"{'does not exist' if c.tests else 'exists'}"
    assert c.test_file == (f"tests/test_{c.stem}.py" if c.tests else None)


def test_every_chapter_file_belongs_to_a_manifest():
    """A lesson, template, notebook or test named NN_name with no ``qlora_edu/chNN_name/`` would be listed nowhere.
    (A chapter's tests may be split over ``tests/test_NN_name.py`` and ``tests/test_NN_name_<part>.py``.)"""
    stems = {c.stem for c in CHAPTERS}
    orphans = []
    for folder, pattern in CHAPTER_FILE_PATTERNS.items():
        for path in sorted((ROOT / folder).glob(pattern)):
            name = path.stem.removeprefix("test_")
            if name not in stems and not (folder == "tests" and any(name.startswith(s + "_") for s in stems)):
                orphans.append(path.relative_to(ROOT).as_posix())
    assert not orphans, f"chapter files without a manifest (qlora_edu/chNN_name/__init__.py): {orphans}"


def has_gpu_marks(path: Path) -> bool:
    """Whether the test file uses ``pytest.mark.gpu`` (as a decorator, in ``pytestmark`` or in ``pytest.param``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(node, ast.Attribute) and node.attr == "gpu" and isinstance(node.value, ast.Attribute)
               and node.value.attr == "mark" for node in ast.walk(tree))


@pytest.mark.parametrize("c", CHAPTERS, ids=_ids)
def test_gpu_tests_match_the_marks(c):
    marked = c.tests and has_gpu_marks(ROOT / c.test_file)
    assert marked == c.gpu_tests, (f"{c.stem} declares gpu_tests={c.gpu_tests}, but its tests "
                                   f"{'have' if marked else 'have no'} @pytest.mark.gpu tests")


def test_the_gpu_mark_finder_sees_each_spelling(tmp_path):
    (tmp_path / "a.py").write_text("import pytest\n@pytest.mark.gpu\ndef test_x(): pass\n")
    (tmp_path / "b.py").write_text("import pytest\npytestmark = [pytest.mark.gpu]\n")
    (tmp_path / "c.py").write_text("import pytest\nP = pytest.param(1, marks=pytest.mark.gpu)\n")
    (tmp_path / "d.py").write_text("import pytest\n@pytest.mark.slow\ndef test_gpu(): 'pytest.mark.gpu'\n")
    assert [has_gpu_marks(tmp_path / f"{n}.py") for n in "abcd"] == [True, True, True, False]


@pytest.mark.parametrize("c", CHAPTERS, ids=_ids)
def test_benchmarks_exist(c):
    for script in c.benchmarks:
        assert script.startswith("benchmarks/") and (ROOT / script).is_file(), f"{c.stem}: no {script}"


@pytest.mark.parametrize("c", CHAPTERS, ids=_ids)
def test_expected_time_agrees_with_the_recorded_run(c):
    """``cpu_minutes`` within :data:`TIME_FACTOR` of the sum of the lesson's cell times Jupyter recorded."""
    run = recorded_run(ROOT / c.lesson)
    assert run is not None, (f"{c.lesson} carries no cell timings: execute it with "
                             f"`.venv/bin/python scripts/notebook_builder.py execute {c.lesson}`")
    declared = c.cpu_minutes * 60
    assert declared > 0
    ratio = max(declared, run.seconds) / max(min(declared, run.seconds), 1.0)
    assert ratio <= TIME_FACTOR, (f"{c.stem}: cpu_minutes={c.cpu_minutes} but the recorded run ({run.date}) took "
                                  f"{run.seconds / 60:.2f} min, {ratio:.1f}x apart (allowed: {TIME_FACTOR}x)")


def test_recorded_run_sums_the_timed_cells(tmp_path):
    def cell(start, end):
        return {"cell_type": "code", "metadata": {"execution": {"iopub.execute_input": start,
                                                                "shell.execute_reply": end}}}
    nb = {"cells": [cell("2026-01-02T10:00:00.000Z", "2026-01-02T10:00:01.500Z"), {"cell_type": "code"},
                    cell("2026-01-02T10:00:02.000Z", "2026-01-02T10:00:04.500Z"), {"cell_type": "markdown"}]}
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    run = recorded_run(tmp_path / "a.ipynb")
    assert (run.seconds, run.date, run.cells) == (pytest.approx(4.0), "2026-01-02", 2)
    (tmp_path / "b.ipynb").write_text(json.dumps({"cells": [{"cell_type": "code"}]}))
    assert recorded_run(tmp_path / "b.ipynb") is None and recorded_run(tmp_path / "none.ipynb") is None


# ------------------------------------------------------------------------------------------------ the lists


def test_the_readme_course_table_is_generated():
    text = README.read_text(encoding="utf-8")
    expected = readme_with_table(text)
    diff = "\n".join(difflib.unified_diff(text.splitlines(), expected.splitlines(), lineterm="", n=0))
    assert text == expected, f"README.md's course table differs from the manifests; run `make readme`:\n{diff}"


def test_the_course_map_links_from_each_page():
    one = next(c for c in CHAPTERS if c.exercise)
    assert f"[exercise](exercises/{one.stem}.ipynb)" in course_map_markdown("")
    assert f"]({one.stem}.ipynb)" in course_map_markdown("notebooks")
    assert f"](../exercises/{one.stem}.ipynb)" in course_map_markdown("notebooks")
    assert f"](../notebooks/{one.stem}.ipynb)" in course_map_markdown("jupyter_book")
    rows = [ln for ln in course_map_markdown("").splitlines()[2:]]
    assert [r.split(" | ")[0] for r in rows] == [f"| {c.number}" for c in CHAPTERS]


def _tour_cells() -> list[dict]:
    return json.loads(TOUR.read_text(encoding="utf-8"))["cells"]


def _markdown_output(cell: dict) -> str:
    for out in cell.get("outputs", []):
        md = out.get("data", {}).get("text/markdown")
        if md is not None:
            return md if isinstance(md, str) else "".join(md)
    return ""


@pytest.mark.parametrize(("call", "expected"), [('course_map_markdown("notebooks")',
                                                 lambda: course_map_markdown("notebooks")),
                                                ("paths_markdown()", paths_markdown)])
def test_the_tour_renders_its_tables_from_the_manifests(call, expected):
    """The tour's course map and path table are cells that call the generators, and their saved outputs are
    current (re-run the tour after changing a manifest)."""
    cells = [c for c in _tour_cells() if c["cell_type"] == "code" and f"Markdown({call}" in "".join(c["source"])]
    assert len(cells) == 1, f"notebooks/00_tour.ipynb should have one cell rendering Markdown({call})"
    assert _markdown_output(cells[0]) == expected(), (
        "the tour's saved table differs from the manifests: re-run it, "
        "`.venv/bin/python scripts/notebook_builder.py execute notebooks/00_tour.ipynb`")


def test_the_tour_types_no_chapter_table():
    """No markdown cell of the tour lists chapters by hand (a row starting with a chapter number)."""
    typed = [i for i, c in enumerate(_tour_cells()) if c["cell_type"] == "markdown"
             and re.search(r"^\|\s*\d+(–\d+)?\s*\|", "".join(c["source"]), re.M)]
    assert not typed, f"tour cells {typed} hold a hand-written chapter table"


def test_the_tour_prints_no_machine_paths():
    """The saved outputs say nothing about the machine they were run on: no absolute path of the repository or
    the home folder (issue 24 item 13)."""
    machine = re.compile(r"(?:^|[\s'\"(=:])/(?:root|home|Users|work|tmp)/")
    found = []
    for i, c in enumerate(_tour_cells()):
        for out in c.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain") or ""
            text = text if isinstance(text, str) else "".join(text)
            found += [f"cell {i}: {ln.strip()}" for ln in text.splitlines()
                      if machine.search(ln) or str(ROOT) in ln or str(Path.home()) + "/" in ln]
    assert not found, found


def _course_book():
    sys.path.insert(0, str(ROOT / "jupyter_book" / "_ext"))
    try:
        import course_book
    finally:
        sys.path.remove(str(ROOT / "jupyter_book" / "_ext"))
    return course_book


def test_the_book_tables_and_agendas_come_from_the_manifests(tmp_path):
    book = _course_book()
    files = {p.name: p.read_text(encoding="utf-8") for p in book.write_generated(tmp_path)}
    assert files["course_map.md"] == course_map_markdown("jupyter_book")
    assert files["paths.md"] == paths_markdown()
    assert [ln.split(" | ")[0] for ln in files["run_times.md"].splitlines()[2:]] == [f"| {c.number}" for c in CHAPTERS]
    day = book.full_day()
    in_day = [s for s in day if s.runs]
    assert [s.runs[0].split(":")[0] for s in in_day] == [c.stem for c in CHAPTERS if c.workshop_minutes]
    assert [s.minutes for s in in_day] == [c.workshop_minutes for c in CHAPTERS if c.workshop_minutes]
    assert [c.stem for c in book.take_home()] == [c.stem for c in CHAPTERS if not c.workshop_minutes]
    for c in book.take_home():
        assert f"| take-home | Chapter {c.number}, " in files["agenda_full_day.md"]
    anchors = {after for after, _ in book.FULL_DAY_OTHER_SLOTS} - {None}
    assert anchors <= {c.number for c in CHAPTERS if c.workshop_minutes}, "a break follows a chapter not in the day"


def test_the_doctor_lists_every_chapter_from_its_manifest():
    from qlora_edu.common import doctor

    lines = doctor._chapter_checks(None, ROOT)
    assert [ln.label for ln in lines] == [c.stem for c in CHAPTERS]
    for ln, c in zip(lines, CHAPTERS, strict=True):
        assert ln.detail.startswith(c.cpu_path)


def _make_dry_run(target: str, root: Path = ROOT) -> str:
    out = subprocess.run(["make", "-n", "--no-print-directory", target, f"PY={sys.executable}",
                          f"PYTHON_GPU={sys.executable}"], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_the_makefile_lists_come_from_the_manifests():
    gpu = _make_dry_run("test-gpu")
    assert re.findall(r"tests/test_\S+\.py", gpu) == gpu_test_files() != []
    bench = _make_dry_run("bench")
    assert re.findall(r"benchmarks/\S+\.py", bench) == benchmark_scripts() != []
    assert "scripts/gpu_check.py" in _make_dry_run("gpu-check")


# ------------------------------------------------------------------------------------------------ a new chapter

#: The README's "For contributors" table, first column, written for chapter NN_name.
CONTRIBUTOR_PATHS = re.compile(r"^\| (`[^|]+`) \|", re.M)


def declared_paths(c: Chapter) -> list[str]:
    """What adding chapter ``c`` adds, as its manifest names it."""
    return [f"qlora_edu/ch{c.stem}/", c.lesson, c.exercise_source, c.exercise_notebook, c.solution_notebook,
            c.test_file]


def test_the_contributors_section_names_what_a_chapter_adds():
    """The README's table of what adding chapter NN_name adds is exactly what a manifest declares: the package,
    the lesson, the exercise template, the generated pair, the test file."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## For contributors"):]
    table = section[:section.index("\n\n", section.index("| path |"))]
    listed = [p.strip("`") for cell in CONTRIBUTOR_PATHS.findall(table) for p in cell.split("`, `")]
    generic = Chapter(number=42, name="name", title="t", builds="", checked_against="", cpu_path="c", gpu_path="g",
                      cpu_minutes=1, workshop_minutes=0)
    assert listed == [p.replace("42_name", "NN_name") for p in declared_paths(generic)]


def _synthetic_chapter(copy: Path) -> Chapter:
    """Add chapter 99 to ``copy`` with exactly the files the README lists, and nothing else."""
    package = copy / "qlora_edu" / "ch99_synthetic"
    package.mkdir()
    (package / "__init__.py").write_text(
        '"""Chapter 99: a synthetic chapter (tests/test_chapters.py)."""\n\n'
        "from qlora_edu.common.chapters import Chapter\n\n"
        "CHAPTER = Chapter(number=99, name='synthetic', title='A synthetic chapter', builds='`synthetic_fn`',\n"
        "                  checked_against='a test', cpu_path='CPU: one cell', gpu_path='GPU: one cell',\n"
        "                  cpu_minutes=0.5, workshop_minutes=25, gpu_tests=True, workshop_note='synthetic')\n")
    (package / "synthetic.py").write_text('__all__ = ["synthetic_fn"]\n\n\ndef synthetic_fn():\n    return 99\n')
    (package / "guards.py").write_text('"""No arguments, no guards."""\n')
    (package / "checks.py").write_text('"""No cases."""\n')
    timed = {"cell_type": "code", "execution_count": 1, "id": "a", "outputs": [], "source": "x = 1",
             "metadata": {"execution": {"iopub.execute_input": "2026-01-02T10:00:00Z",
                                        "shell.execute_reply": "2026-01-02T10:00:30Z"}}}
    nb = json.dumps({"cells": [{"cell_type": "markdown", "id": "t", "metadata": {}, "source": "# Chapter 99"},
                               timed], "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
    for path in ("notebooks/99_synthetic.ipynb", "exercises/99_synthetic.ipynb", "solutions/99_synthetic.ipynb"):
        (copy / path).write_text(nb)
    (copy / "exercises/src/99_synthetic.py").write_text("# %% [markdown]\n# # Exercise 99\n")
    (copy / "tests/test_99_synthetic.py").write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_on_cuda():\n    pass\n")
    return Chapter(number=99, name="synthetic", title="A synthetic chapter", builds="", checked_against="",
                   cpu_path="CPU: one cell", gpu_path="GPU: one cell", cpu_minutes=0.5, workshop_minutes=25)


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_a_new_chapter_needs_no_edit_elsewhere(tmp_path):
    """Copy the course, add chapter 99 with only its own files, and show every list of chapters takes it up:
    the manifests, the Makefile, the tour's table cells (run as saved), the book, the doctor, and this file's
    checks; the README's table after `make readme`, with exactly one new row."""
    copy = tmp_path / "course"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "_build", "results", "data")
    for folder in ("qlora_edu", "notebooks", "exercises", "solutions", "tests", "benchmarks", "jupyter_book"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=ignore)
    for name in ("README.md", "Makefile"):
        shutil.copy2(ROOT / name, copy / name)
    before = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    synthetic = _synthetic_chapter(copy)
    added = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} - before
    assert {a.split("/")[0] + "/" + a.split("/")[1] + "/" if a.startswith("qlora_edu/") else a for a in added} \
        == set(declared_paths(synthetic)), "the synthetic chapter adds what the README lists"
    env = {"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "HOME": str(Path.home()), "OMP_NUM_THREADS": "1"}

    def run(*args, cwd=copy, check=True):
        out = subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
        assert not check or out.returncode == 0, out.stdout + out.stderr
        return out

    stems = run(sys.executable, "-m", "qlora_edu.common.chapters", "stems").stdout.split()
    assert stems[-1] == "99_synthetic" and stems[:-1] == [c.stem for c in CHAPTERS]
    assert "tests/test_99_synthetic.py" in _make_dry_run("test-gpu", copy)
    # The README: its table is stale until `make readme` (`make exercises` runs it too), which adds one row.
    assert run(sys.executable, "-m", "qlora_edu.common.chapters", "readme", "--check", check=False).returncode == 1
    old = (copy / "README.md").read_text()
    run(sys.executable, "-m", "qlora_edu.common.chapters", "readme")
    new = (copy / "README.md").read_text()
    changed = [ln for ln in difflib.ndiff(old.splitlines(), new.splitlines()) if ln[:1] in "+-"]
    assert len(changed) == 1 and changed[0].startswith("+ | 99 | [A synthetic chapter](notebooks/99_synthetic")
    # The tour's table cells, run as saved, render the new chapter (re-running the tour saves them).
    sources = [("".join(c["source"])) for c in _tour_cells() if c["cell_type"] == "code"
               and "Markdown(" in "".join(c["source"]) and "_markdown(" in "".join(c["source"])]
    shown = run(sys.executable, "-c", "import IPython.display as d\nd.Markdown = lambda text: print(text)\n"
                + "\n".join(sources), cwd=copy / "notebooks").stdout
    assert shown.count("| 99 | ") == 2 and "](99_synthetic.ipynb)" in shown
    # The book, the doctor and every check of this file (but this test and the tour's saved outputs), in the copy.
    run(sys.executable, "jupyter_book/_ext/course_book.py")
    agenda = (copy / "jupyter_book/_build/generated/agenda_full_day.md").read_text()
    assert "| Chapter 99, A synthetic chapter: lesson + exercise | 25 min | 30 s lesson + 30 s solution |" in agenda
    doctor = run(sys.executable, "-c", "from qlora_edu.common import doctor\n"
                 "print([c.label for c in doctor._chapter_checks(None, doctor.COURSE_ROOT)])").stdout
    assert "'99_synthetic'" in doctor
    # This file's checks on the copy: each per-chapter check for chapter 99, and every check of the whole course
    # (not this test, and not the tour's saved tables, which a re-run of the tour brings up to date).
    ids = []
    for name, fn in globals().items():
        marks = getattr(fn, "pytestmark", [])
        if not name.startswith("test_") or name in ("test_a_new_chapter_needs_no_edit_elsewhere",
                                                    "test_the_tour_renders_its_tables_from_the_manifests"):
            continue
        per_chapter = any(m.name == "parametrize" and m.args[0] == "c" for m in marks)
        ids.append(f"tests/test_chapters.py::{name}" + ("[99_synthetic]" if per_chapter else ""))
    checks = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids, check=False)
    assert checks.returncode == 0, checks.stdout[-3000:]


def test_format_seconds_and_minutes():
    from qlora_edu.common.chapters import format_minutes, format_seconds

    assert (format_seconds(15.2), format_seconds(225.1), format_seconds(None)) == ("15 s", "3.8 min", "not recorded")
    assert (format_minutes(0.2), format_minutes(1.5), format_minutes(10.0)) == ("~12 s", "~1.5 min", "~10 min")
    with pytest.raises(TypeError, match="seconds"):
        format_seconds("15")
    with pytest.raises(ValueError, match="seconds"):
        format_seconds(-1.0)
    with pytest.raises(ValueError, match="minutes"):
        format_minutes(-1)


def test_a_wrong_manifest_field_is_named():
    good = dict(number=1, name="absmax", title="t", builds="b", checked_against="c", cpu_path="cpu", gpu_path="gpu",
                cpu_minutes=1.0, workshop_minutes=10)
    Chapter(**good)
    for field, value, error in [("number", 100, ValueError), ("name", "Absmax", ValueError),
                                ("title", " ", ValueError), ("cpu_minutes", 0, ValueError),
                                ("workshop_minutes", 1.5, ValueError), ("exercise", 1, TypeError),
                                ("benchmarks", ["benchmarks/x.py"], TypeError), ("builds", None, TypeError)]:
        with pytest.raises(error, match=field):
            Chapter(**{**good, field: value})
