"""``python -m qlora_edu doctor``: what it reads from the notebooks, what it says about GPUs (simulated by
monkeypatching torch.cuda, as tests/test_device.py does), and how it prints (colour only when asked for)."""

from __future__ import annotations

import importlib.metadata as md
import io
import json
import subprocess
import sys

# The doctor imports bitsandbytes, in some tests with torch.cuda faked or the package hidden. Were that the first
# import in this process, the failed import would leave its submodules cached, and the next `import bitsandbytes`
# would build a module without `.nn`: later test files in the same pytest worker would then fail. Imported here,
# first, the package stays whole.
import bitsandbytes  # noqa: F401
import pytest
import torch

import qlora_edu.common.doctor as doc
from conftest import ROOT
from qlora_edu.common import settings
from qlora_edu.common.doctor import (
    ChapterFacts,
    DoctorCheck,
    chapter_facts,
    doctor_checks,
    format_seconds,
    render_doctor,
)

GIB = 1024**3


def _nb(cells: list[dict]) -> str:
    return json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})


def _md(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def _code(source: str, printed: str = "", start: str | None = None, end: str | None = None) -> dict:
    meta = {"execution": {"iopub.execute_input": start, "shell.execute_reply": end}} if start else {}
    outputs = [{"output_type": "stream", "name": "stdout", "text": printed}] if printed else []
    return {"cell_type": "code", "metadata": meta, "source": source, "outputs": outputs, "execution_count": 1}


@pytest.fixture
def course(tmp_path):
    """A two-chapter course: chapter 0 with the course map, chapter 1 with timings, a path line and an exercise;
    chapter 2 follows the machine (uses compute.device) and has no recorded run."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "exercises").mkdir()
    (tmp_path / "notebooks" / "00_tour.ipynb").write_text(_nb([
        _md("# Chapter 0: A tour\n\nIntro."),
        _md("## The course map\n\n| Chapter | Notebook | You build | Checked against |\n|---|---|---|---|\n"
            "| 0 | `00_tour` | — | |\n| 1 | `01_blocks` | `quantize`, `dequantize` | a float64 reference |\n"),
    ]))
    (tmp_path / "notebooks" / "01_blocks.ipynb").write_text(_nb([
        _md("# Chapter 1: Blocks\n\ntext"),
        _code("print(...)", "Running on cpu with torch.float32: no CUDA device\n"
              "This chapter's path: the CPU in float32 on every machine; the rest\n",
              "2026-01-02T10:00:00.000000Z", "2026-01-02T10:00:01.500000Z"),
        _code("x = 1", "", "2026-01-02T10:00:02.000000Z", "2026-01-02T10:00:04.500000Z"),
        _code("y = 2"),  # no timing recorded for this cell
    ]))
    (tmp_path / "notebooks" / "02_train.ipynb").write_text(_nb([
        _md("# Chapter 2: Train\n"),
        _code("compute = pick_compute()\nmodel.to(compute.device)"),
    ]))
    (tmp_path / "notebooks" / "scratch.ipynb").write_text(_nb([]))  # not a chapter: ignored
    (tmp_path / "exercises" / "01_blocks.ipynb").write_text(_nb([_md("# Exercise 1: Blocks")]))
    return tmp_path


def test_chapter_facts_read_the_notebooks(course):
    facts = chapter_facts(course)
    assert [f.stem for f in facts] == ["00_tour", "01_blocks", "02_train"]
    one = facts[1]
    assert (one.number, one.title) == (1, "Blocks")
    assert one.lesson_seconds == pytest.approx(1.5 + 2.5)  # the two timed cells; the untimed one adds nothing
    assert one.recorded_on == "2026-01-02" and one.recorded_device == "cpu"
    assert one.path_note == "the CPU in float32 on every machine" and not one.follows_machine
    assert (one.builds, one.checked_against) == ("`quantize`, `dequantize`", "a float64 reference")
    assert one.exercise == course / "exercises" / "01_blocks.ipynb" and one.solution is None
    two = facts[2]
    assert two.follows_machine and two.lesson_seconds is None and two.recorded_device is None
    assert two.builds is None  # chapter 0's map has no row for it
    assert facts[0].checked_against is None and facts[0].builds == "—"


def test_chapter_facts_of_the_course_itself():
    facts = chapter_facts()
    lessons = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [f.stem for f in facts] == lessons
    assert all(f.title and not f.title.startswith("Chapter") for f in facts)


def test_format_seconds():
    assert format_seconds(15.2) == "15 s"
    assert format_seconds(225.1) == "3.8 min"
    assert format_seconds(None) == "not recorded"
    with pytest.raises(TypeError, match="seconds"):
        format_seconds("15")
    with pytest.raises(ValueError, match="seconds"):
        format_seconds(-1.0)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="root must be an existing folder"):
        chapter_facts(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="root"):
        doctor_checks(42)
    with pytest.raises(TypeError, match="sections"):
        render_doctor("not a list")
    with pytest.raises(TypeError, match="color"):
        render_doctor([], color="yes")
    with pytest.raises(TypeError, match="argv"):
        doc.run_doctor("doctor")


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int], total_gib: float, free_gib: float) -> None:
    """torch.cuda reports one GPU (as tests/test_device.py simulates it), with its memory."""
    props = type("Props", (), {"total_memory": int(total_gib * GIB), "name": name})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability >= (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (int(free_gib * GIB), int(total_gib * GIB)))


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch):
    for env in (settings.DEVICE_ENV, settings.DTYPE_ENV, settings.MODEL_ENV):
        monkeypatch.delenv(env, raising=False)


def _section(sections, title_start: str) -> list[DoctorCheck]:
    return next(checks for title, checks in sections if title.startswith(title_start))


def test_a100_gpu_is_reported_and_gpu_chapters_say_not_measured(monkeypatch, course):
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0), total_gib=40, free_gib=39.5)
    sections = doctor_checks(course)
    gpu = {c.label: c for c in _section(sections, "GPU")}
    assert gpu["GPU"].status == "ok" and "A100" in gpu["GPU"].detail and "8.0" in gpu["GPU"].detail
    assert "40.0 GiB" in gpu["GPU"].detail and "39.5 GiB free" in gpu["GPU"].detail
    assert gpu["bf16"].status == "ok"
    assert "cuda" in gpu["compute"].detail and "bfloat16" in gpu["compute"].detail
    chapters = {c.label: c.detail for c in _section(sections, "Chapters")}
    assert chapters["01_blocks"].startswith("CPU float32 (every machine)") and "~4 s" in chapters["01_blocks"]
    assert chapters["02_train"].startswith("GPU bfloat16 (this machine)")
    assert "run time not recorded" in chapters["02_train"]


def test_t4_gpu_warns_about_bf16(monkeypatch, course):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5), total_gib=15, free_gib=14)
    gpu = {c.label: c for c in _section(doctor_checks(course), "GPU")}
    assert gpu["bf16"].status == "warn" and "float16" in gpu["bf16"].detail
    assert "float16" in gpu["compute"].detail


def test_no_gpu_is_information_not_failure(monkeypatch, course):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sections = doctor_checks(course)
    gpu = {c.label: c for c in _section(sections, "GPU")}
    assert gpu["GPU"].status == "info" and gpu["GPU"].detail.startswith("none")
    chapters = {c.label: c.detail for c in _section(sections, "Chapters")}
    assert chapters["02_train"].startswith("CPU")


def test_missing_library_and_broken_bitsandbytes_fail(monkeypatch, course):
    real_version = md.version

    def version(name):
        if name == "peft":
            raise md.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(md, "version", version)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    libraries = {c.label: c for c in _section(doctor_checks(course), "Python")}
    assert libraries["peft"].status == "fail" and "make install" in libraries["peft"].detail
    assert libraries["import bitsandbytes"].status == "fail"
    assert "halted" in libraries["import bitsandbytes"].detail  # the import error itself, first line


def test_the_model_checks_follow_base_model_info():
    ready = doc._model_checks({"model": "SmolLM2-135M-Instruct", "source": "gguf", "override": None,
                               "gguf_path": "/x.gguf", "install_command": "pip install x", "cache_dir": "/c",
                               "cache_ready": False, "cache_problem": "no folder"})
    assert [c.status for c in ready] == ["ok", "warn"] and "no folder" in ready[1].detail
    missing = doc._model_checks({"model": "SmolLM2-135M-Instruct", "source": "gguf", "override": None,
                                 "gguf_path": None, "install_command": "pip install x", "cache_dir": "/c",
                                 "cache_ready": False, "cache_problem": "no gguf"})
    assert missing[0].status == "fail" and "pip install x" in missing[0].detail


def test_render_plain_and_coloured():
    sections = [("Section", [DoctorCheck("ok", "torch", "2.13.0"), DoctorCheck("warn", "RAM", "1.0 GiB")])]
    plain = render_doctor(sections)
    assert "\x1b[" not in plain and "✓ torch" in plain and "! RAM" in plain
    assert plain.rstrip().endswith("READY, with 1 warning(s) to read above.")
    coloured = render_doctor(sections, color=True)
    assert "\x1b[32m✓\x1b[0m" in coloured and "\x1b[33m!\x1b[0m" in coloured
    failed = render_doctor([("S", [DoctorCheck("fail", "peft", "not installed")])])
    assert "NOT READY: 1 problem(s) (peft)" in failed


def test_colour_only_on_a_terminal(monkeypatch):
    tty = io.StringIO()
    tty.isatty = lambda: True
    assert doc._wants_color("auto", tty) is True
    assert doc._wants_color("auto", io.StringIO()) is False
    assert doc._wants_color("always", io.StringIO()) is True
    assert doc._wants_color("never", tty) is False


def test_no_color_is_honoured(monkeypatch):
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setenv("NO_COLOR", "1")
    assert doc._wants_color("auto", tty) is False
    assert doc._wants_color("always", tty) is True  # an explicit --color always wins
    monkeypatch.setenv("NO_COLOR", "")
    assert doc._wants_color("auto", tty) is True  # set but empty: ignored, as no-color.org says


def test_exit_status_follows_failures(monkeypatch, capsys, course):
    monkeypatch.setattr(doc, "doctor_checks", lambda root=None: [("S", [DoctorCheck("fail", "x", "broken")])])
    assert doc.run_doctor(["--color", "never"]) == 1
    assert "NOT READY" in capsys.readouterr().out
    monkeypatch.setattr(doc, "doctor_checks", lambda root=None: [("S", [DoctorCheck("warn", "x", "meh")])])
    assert doc.run_doctor([]) == 0


def test_command_line_prints_one_screen():
    out = subprocess.run([sys.executable, "-m", "qlora_edu", "doctor"], capture_output=True, text=True, cwd=ROOT,
                         timeout=180)
    text = out.stdout
    assert out.returncode == (1 if "NOT READY" in text else 0), out.stderr
    assert "\x1b[" not in text, "colour codes although stdout is not a terminal"
    for title in ("Python and libraries", "GPU", "Memory and disk", "Base model", "Chapters"):
        assert title in text
    assert "01_absmax" in text and "bitsandbytes" in text
    assert len(text.splitlines()) <= 50, f"{len(text.splitlines())} lines: more than one screen"
    usage = subprocess.run([sys.executable, "-m", "qlora_edu"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert usage.returncode == 0 and "doctor" in usage.stdout


def test_chapter_facts_is_a_frozen_record(course):
    fact = chapter_facts(course)[1]
    assert isinstance(fact, ChapterFacts)
    with pytest.raises(AttributeError):
        fact.title = "x"  # type: ignore[misc]


def test_a_path_note_that_follows_the_machine(tmp_path):
    """Chapter 5 prints its path ("the training runs on cpu ...") and runs on compute.device: it follows the machine;
    chapter 7 uses pick_compute().device; only a note that says "on every machine" pins the CPU."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "05_opt.ipynb").write_text(_nb([
        _md("# Chapter 5: Opt"),
        _code("compute = pick_compute()\nmodel.to(compute.device)",
              "This chapter's path: the training runs on cpu with base weights in torch.bfloat16\n")]))
    (tmp_path / "notebooks" / "07_q.ipynb").write_text(_nb([
        _md("# Chapter 7: Q"), _code("device = pick_compute().device", "This chapter's path: on the CPU here\n")]))
    (tmp_path / "notebooks" / "08_pinned.ipynb").write_text(_nb([
        _md("# Chapter 8: Pinned"),
        _code("compute = pick_compute()\nx.to(compute.device)", "This chapter's path: the CPU on every machine\n")]))
    five, seven, eight = chapter_facts(tmp_path)
    assert five.follows_machine and five.path_note.startswith("the training runs on cpu")
    assert seven.follows_machine
    assert not eight.follows_machine
