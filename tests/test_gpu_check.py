"""scripts/gpu_check.py: the one command for a GPU machine. On this CPU-only machine it runs end to end with every
part skipped and says why; its part runner records a timeout or a failure and goes on with the next part."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402  (a script, not a package module)

STATUSES = {"passed", "failed", "timeout", "skipped"}
PART_KEYS = {"name", "status", "reason", "wall_s", "timeout_s", "command", "returncode", "figures", "output_tail"}


def test_runs_end_to_end_without_cuda_and_reports_every_part(tmp_path):
    """CUDA hidden from torch (also on a GPU machine), so every part is skipped with the reason; exit status 0."""
    out = tmp_path / "results" / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"format_version", "started", "budget_s", "wall_s", "versions", "device", "no_device_reason", "counts",
            "parts"} <= set(report)
    assert report["device"] is None and "torch.cuda.is_available() is False" in report["no_device_reason"]
    for name in ("torch", "transformers", "bitsandbytes", "peft", "gguf", "python"):
        assert report["versions"][name], name
    assert [p["name"] for p in report["parts"]] == [p.name for p in gpu_check.PARTS]
    for part in report["parts"]:
        assert set(part) == PART_KEYS and part["status"] in STATUSES
        assert part["status"] == "skipped" and part["reason"] == report["no_device_reason"]
    assert report["counts"] == {"passed": 0, "failed": 0, "timeout": 0, "skipped": len(gpu_check.PARTS)}
    assert "skipped" in done.stdout


def test_the_registry_covers_the_issue_and_fits_the_budget():
    names = [p.name for p in gpu_check.PARTS]
    assert len(set(names)) == len(names)
    assert {"gpu-tests", "finetune-peft", "finetune-scratch", "bench-qlora-gpu", "bench-nf4-cuda"} <= set(names)
    assert gpu_check.DEFAULT_BUDGET_S < 8 * 60
    assert all(0 < p.timeout_s <= gpu_check.DEFAULT_BUDGET_S for p in gpu_check.PARTS)


def _python(code: str):
    return lambda ctx: [ctx.python, "-c", code]


@pytest.fixture
def ctx(tmp_path):
    return gpu_check.Context(python=sys.executable, workdir=tmp_path)


def test_a_timeout_and_a_failure_are_recorded_and_the_next_part_runs(ctx):
    parts = [
        gpu_check.Part("sleeps", 1, _python("import time; time.sleep(30)"), needs_cuda=False),
        gpu_check.Part("fails", 30, _python("import sys; print('boom'); sys.exit(3)"), needs_cuda=False),
        gpu_check.Part("unreadable", 30, _python("print('not json')"), gpu_check._last_json_line, needs_cuda=False),
        gpu_check.Part("unbuildable", 30, lambda ctx: 1 / 0, needs_cuda=False),
        gpu_check.Part("works", 30, _python("print('{\"after\": 0.99}')"), gpu_check._last_json_line,
                       needs_cuda=False),
    ]
    lines = []
    results = gpu_check.run_parts(parts, ctx, cuda=None, budget_s=120, log=lines.append)
    by_name = {r["name"]: r for r in results}
    assert by_name["sleeps"]["status"] == "timeout" and "time limit of 1 s" in by_name["sleeps"]["reason"]
    assert by_name["sleeps"]["wall_s"] < 20
    assert by_name["fails"]["status"] == "failed" and by_name["fails"]["reason"] == "exit status 3"
    assert by_name["fails"]["returncode"] == 3 and "boom" in by_name["fails"]["output_tail"]
    assert by_name["unreadable"]["status"] == "failed" and "figures are unreadable" in by_name["unreadable"]["reason"]
    assert by_name["unbuildable"]["status"] == "failed" and "ZeroDivisionError" in by_name["unbuildable"]["reason"]
    assert by_name["works"]["status"] == "passed" and by_name["works"]["figures"] == {"after": 0.99}
    assert len(lines) == len(parts)


def test_cuda_parts_are_skipped_with_the_reason_and_others_still_run(ctx):
    parts = [gpu_check.Part("needs-gpu", 30, _python("print(1)")),
             gpu_check.Part("cpu-fine", 30, _python("print(1)"), needs_cuda=False)]
    results = gpu_check.run_parts(parts, ctx, cuda="no CUDA device: test", budget_s=60, log=lambda line: None)
    assert [(r["status"], r["reason"]) for r in results] == [("skipped", "no CUDA device: test"),
                                                             ("passed", "exit status 0")]


def test_the_total_budget_caps_each_part_and_skips_the_rest(ctx):
    parts = [gpu_check.Part("long", 60, _python("import time; time.sleep(30)"), needs_cuda=False),
             gpu_check.Part("after", 60, _python("print(1)"), needs_cuda=False)]
    results = gpu_check.run_parts(parts, ctx, cuda=None, budget_s=2, log=lambda line: None)
    assert results[0]["status"] == "timeout" and results[0]["timeout_s"] <= 2
    assert results[1]["status"] == "skipped" and "budget" in results[1]["reason"]


def test_figures_of_the_gpu_tests_and_the_benchmarks(ctx):
    (ctx.workdir / "gpu_tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_01_absmax" name="test_a"/>'
        '<testcase classname="tests.test_01_absmax" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_02_nf4" name="test_c"><skipped message="y"/></testcase>'
        '</testsuite></testsuites>')
    assert gpu_check._gpu_tests_figures(ctx, "") == {"passed": 1, "failed_tests": ["tests.test_01_absmax::test_b"],
                                                     "skipped_tests": ["tests.test_02_nf4::test_c"]}
    text = ("median step: ours 537 ms, peft + bitsandbytes 376 ms, ratio 1.43\n"
            "peak allocated: ours 7,320 MiB, peft + bitsandbytes 7,319 MiB (x)\n")
    figures = gpu_check._bench_qlora_figures(ctx, text)
    assert figures["step_ms_ours"] == 537 and figures["peak_mib_ours"] == 7320
    assert figures["step_ratio"] == pytest.approx(537 / 376)
    with pytest.raises(ValueError, match="median step"):
        gpu_check._bench_qlora_figures(ctx, "nothing")


def test_unknown_part_is_named(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "nope"])
    assert "unknown part(s) nope" in capsys.readouterr().err
