"""``python -m qlora_edu doctor``: what it says about GPUs (simulated by monkeypatching torch.cuda, as
tests/test_device.py does), that a missing or broken library is a line of its report and never a crash (run in a
subprocess where the library cannot be imported), its chapter lines (from the manifests), and how it prints
(colour only when asked for)."""

from __future__ import annotations

import importlib.metadata as md
import io
import re
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
from qlora_edu.common.chapters import all_chapters, format_minutes
from qlora_edu.common.doctor import DoctorCheck, doctor_checks, render_doctor

GIB = 1024**3
#: the libraries whose absence the doctor must report (issue 17 item 3, issue 20 item 12); packaging is not a
#: declared dependency of the course, the others are
MUST_REPORT = ("torch", "bitsandbytes", "transformers", "safetensors", "packaging")


def test_bad_arguments_are_named():
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


def test_a100_gpu_is_reported_and_gpu_chapters_say_not_measured(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0), total_gib=40, free_gib=39.5)
    sections = doctor_checks()
    gpu = {c.label: c for c in _section(sections, "GPU")}
    assert gpu["GPU"].status == "ok" and "A100" in gpu["GPU"].detail and "8.0" in gpu["GPU"].detail
    assert "40.0 GiB" in gpu["GPU"].detail and "39.5 GiB free" in gpu["GPU"].detail
    assert gpu["bf16"].status == "ok"
    assert "cuda" in gpu["compute"].detail and "bfloat16" in gpu["compute"].detail
    chapters = {c.label: c.detail for c in _section(sections, "Chapters")}
    assert list(chapters) == [c.stem for c in all_chapters()]
    for c in all_chapters():  # a chapter that follows the machine takes its GPU path, whose time is not measured
        if c.follows_machine:
            assert chapters[c.stem].startswith(c.gpu_path) and "not measured on a GPU" in chapters[c.stem]
        else:
            assert chapters[c.stem].startswith(c.cpu_path) and f"{format_minutes(c.cpu_minutes)} on two CPU cores" \
                in chapters[c.stem]
    assert any(c.follows_machine for c in all_chapters()) and not all(c.follows_machine for c in all_chapters())


def test_t4_gpu_warns_about_bf16(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5), total_gib=15, free_gib=14)
    gpu = {c.label: c for c in _section(doctor_checks(), "GPU")}
    assert gpu["bf16"].status == "warn" and "float16" in gpu["bf16"].detail
    assert "float16" in gpu["compute"].detail


def test_no_gpu_is_information_not_failure(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sections = doctor_checks()
    gpu = {c.label: c for c in _section(sections, "GPU")}
    assert gpu["GPU"].status == "info" and gpu["GPU"].detail.startswith("none")
    chapters = {c.label: c.detail for c in _section(sections, "Chapters")}
    for c in all_chapters():
        assert chapters[c.stem].startswith(c.cpu_path)
    recorded = doc.recorded_run(ROOT / all_chapters()[0].lesson)
    assert f"last run {doc.format_seconds(recorded.seconds)}, {recorded.date}" in chapters[all_chapters()[0].stem]


def test_missing_library_and_broken_bitsandbytes_fail(monkeypatch):
    real_version = md.version

    def version(name):
        if name == "peft":
            raise md.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(md, "version", version)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    libraries = {c.label: c for c in _section(doctor_checks(), "Python")}
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


def test_exit_status_follows_failures(monkeypatch, capsys):
    monkeypatch.setattr(doc, "doctor_checks", lambda: [("S", [DoctorCheck("fail", "x", "broken")])])
    assert doc.run_doctor(["--color", "never"]) == 1
    assert "NOT READY" in capsys.readouterr().out
    monkeypatch.setattr(doc, "doctor_checks", lambda: [("S", [DoctorCheck("warn", "x", "meh")])])
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


def _doctor_without(*modules: str) -> subprocess.CompletedProcess:
    """``python -m qlora_edu doctor`` in a fresh interpreter where ``modules`` cannot be imported (each set to
    None in ``sys.modules``, which makes ``import`` raise ModuleNotFoundError, as for a library not installed)."""
    code = ("import runpy, sys\n"
            f"for name in {modules!r}:\n    sys.modules[name] = None\n"
            "sys.argv = ['python -m qlora_edu', 'doctor', '--color', 'never']\n"
            "runpy.run_module('qlora_edu', run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("module", MUST_REPORT)
def test_a_missing_library_is_a_finding_not_a_crash(module):
    """The report is complete (every section, every chapter), says NOT READY with exit status 1, and names the
    missing library in a red or yellow line; nothing is printed to stderr (no traceback)."""
    out = _doctor_without(module)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1, out.stdout + out.stderr
    for title in ("Python and libraries", "GPU", "Memory and disk", "Base model", "Chapters"):
        assert title in out.stdout
    assert all(f"· {c.stem} " in out.stdout for c in all_chapters())
    named = [ln for ln in out.stdout.splitlines() if ln.lstrip().startswith(("✗", "!")) and module in ln]
    assert named, f"no red or yellow line names {module}:\n{out.stdout}"
    assert out.stdout.rstrip().splitlines()[-1].startswith("NOT READY")
    if module == "packaging":  # not a declared dependency: the versions are still listed, just not compared
        assert "not compared with the course's pins" in named[0]
        assert re.search(r"✓ torch\s+\d", out.stdout)


def test_the_doctor_module_imports_no_torch():
    """It must load where torch is missing or broken: only torch-free code at module level."""
    code = "import sys, qlora_edu.common.doctor; print(sorted(m for m in ('torch', 'transformers', " \
           "'bitsandbytes', 'safetensors', 'packaging') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
