"""JupyterLab as a learner meets it, in headless Chromium.

The server starts the way ``make lab`` starts it (``scripts/lab.sh``, headless: ``--no-browser``, a port, a token),
on a temporary copy of the repository (README, lessons, exercises, solutions, scripts; ``.venv`` linked), with
autosave off, so nothing the browser does can change a committed notebook. Then, as a learner would:

1. the browser opens the server's default page: the README, rendered (the course map);
2. a click on the chapter 1 link opens ``notebooks/01_absmax.ipynb``; Run > Run All Cells; every code cell runs,
   and no output is an error;
3. the block-size slider of the widget moves one step (keyboard on the slider handle, as a learner can) and the
   plot under it changes (its image differs, in bytes and in pixels on the screenshots);
4. the lesson's "Your turn" link opens ``exercises/01_absmax.ipynb`` from the same server; its set-up and exercise
   cells run (the untouched stubs), then the ``check(...)`` cell: the output is the friendly report ("not
   implemented yet") and one red line, not a traceback.

Screenshots (``jupyter_book/_build/screenshots/``): ``lab_readme.png``, ``lab_01_absmax_ran.png``,
``lab_widget_before.png``, ``lab_widget_after.png``, ``lab_exercise_check.png``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from .conftest import ROOT, free_port

SHOT_PREFIX = "lab_"  # every screenshot of this module starts so (see conftest.shots)
TOKEN = "qlora-edu-browser-test"
LESSON, EXERCISE = "notebooks/01_absmax.ipynb", "exercises/01_absmax.ipynb"
RUN_TIMEOUT_S = 900  # the lesson loads the real model and sweeps it; minutes on two busy cores
VISIBLE = ".jp-NotebookPanel:not(.lm-mod-hidden)"
# JupyterLab user settings for the test's server only: no autosave (the copy is never written either), no news.
USER_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}


def _digest(paths) -> dict[str, str]:
    return {p: hashlib.sha256((ROOT / p).read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``scripts/lab.sh`` on a copy of the repository; yields the server's base URL."""
    if not (ROOT / ".venv" / "bin" / "jupyter").exists():
        pytest.fail("no .venv/bin/jupyter: run `make install` first")
    tmp = tmp_path_factory.mktemp("lab")
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("notebooks", "exercises", "solutions", "scripts"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copy2(ROOT / "README.md", repo / "README.md")
    (repo / ".venv").symlink_to(ROOT / ".venv")
    for rel, value in USER_SETTINGS.items():
        path = tmp / "settings" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
           "QLORA_EDU_SMOKE": "1"}
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        ["bash", str(repo / "scripts" / "lab.sh"), "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={TOKEN}", f"--LabApp.user_settings_dir={tmp / 'settings'}",
         f"--LabApp.workspaces_dir={tmp / 'workspaces'}"],
        cwd="/", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started (its own session)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def prompts(page) -> list[str]:
    """The execution prompts of the visible notebook's code cells: ``[3]:``, ``[*]:`` (running), ``[ ]:``."""
    return page.evaluate(f"""() => [...document.querySelectorAll('{VISIBLE} .jp-CodeCell .jp-InputPrompt')]
                              .map(e => e.textContent.trim())""")


def outputs(page, cell_selector: str = ".jp-CodeCell") -> list[dict]:
    """Every output of the visible notebook (or of the matching cells): its mime type and text."""
    return page.evaluate(f"""() => [...document.querySelectorAll('{VISIBLE} {cell_selector} .jp-OutputArea-output')]
                              .map(e => ({{mime: e.getAttribute('data-mime-type'), text: e.innerText}}))""")


def is_error(output: dict) -> bool:
    """A traceback or an exception line (stderr also carries harmless progress bars and warnings)."""
    return output["mime"] == "application/vnd.jupyter.stderr" and bool(
        re.search(r"Traceback|^\w*(Error|Exception)\b", output["text"], re.M))


def wait_until_run(page, n_expected: int | None = None, timeout: float = RUN_TIMEOUT_S) -> list[str]:
    """Wait until no cell is running ([*]) for two polls in a row; return the prompts."""
    start, calm = time.monotonic(), 0
    while time.monotonic() - start < timeout:
        ps = prompts(page)
        calm = calm + 1 if ps and "[*]:" not in ps else 0
        if calm >= 2 and (n_expected is None or sum(bool(re.match(r"\[\d+\]:", p)) for p in ps) >= n_expected):
            return ps
        time.sleep(1)
    pytest.fail(f"cells still running after {timeout:.0f} s: {prompts(page)}")


def wait_for_kernel(page, base: str, path: str, timeout: float = 180) -> None:
    """Wait until the server has a session for the notebook ``path`` whose kernel is idle (asked over its API).

    A notebook saved without kernel metadata makes JupyterLab ask which kernel to start: accept its proposal
    (the course's Python 3 kernel), as a learner would.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        accept = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
        if accept.count():
            accept.first.click()
        with urllib.request.urlopen(f"{base}/api/sessions?token={TOKEN}", timeout=10) as r:
            sessions = json.loads(r.read())
        if any(s["path"] == path and s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        time.sleep(0.5)
    pytest.fail(f"no idle kernel for {path} after {timeout:.0f} s")


def test_learner_path_through_chapter_1(lab, browser, shots):
    before = _digest([LESSON, EXERCISE])
    laps, clock = [], [time.monotonic()]

    def lap(name: str) -> None:  # where the time goes (printed at the end; `pytest -s` shows it)
        now = time.monotonic()
        laps.append(f"{name} {now - clock[0]:.0f} s")
        clock[0] = now

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        # 1. the default page of `make lab`: the README, rendered
        page.goto(f"{lab}/?token={TOKEN}")
        link = page.locator(".jp-RenderedMarkdown a[href*='/notebooks/01_absmax.ipynb']").first
        link.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "lab_readme.png"))
        lap("readme")

        # 2. the lesson, run top to bottom
        link.click()
        page.locator(VISIBLE).wait_for(timeout=60_000)
        wait_for_kernel(page, lab, LESSON)
        lap("lesson-kernel")
        n_code = sum(c["cell_type"] == "code" for c in json.loads((ROOT / LESSON).read_text())["cells"])
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        ps = wait_until_run(page, n_expected=n_code)
        page.screenshot(path=str(shots / "lab_01_absmax_ran.png"))
        lap("run-all")
        assert all(re.match(r"\[\d+\]:", p) for p in ps), f"not every cell ran (an error stops Run All): {ps}"
        errors = [o["text"][:500] for o in outputs(page) if is_error(o)]
        assert not errors, f"error output in the lesson: {errors}"

        # 3. the widget: move the block-size slider one step, the plot changes
        interact = page.locator(f"{VISIBLE} .widget-interact").first
        interact.scroll_into_view_if_needed()
        plot = interact.locator(".widget-output img").first
        plot.wait_for(timeout=60_000)
        src_before = plot.get_attribute("src")
        shot_before = interact.screenshot(path=str(shots / "lab_widget_before.png"))
        readout = interact.locator(".widget-readout").first
        assert readout.inner_text().strip() == "64"
        handle = interact.locator(".noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")
        page.wait_for_function(
            f"""(old) => {{
                const img = document.querySelector('{VISIBLE} .widget-interact .widget-output img');
                return img && img.src !== old && img.complete && img.naturalWidth > 0;
            }}""", arg=src_before, timeout=120_000)
        assert readout.inner_text().strip() == "128"
        shot_after = interact.screenshot(path=str(shots / "lab_widget_after.png"))
        assert plot.get_attribute("src") != src_before
        assert shot_after != shot_before, "the widget's screenshot did not change after the slider moved"
        title = interact.inner_text()
        assert "blocksize" in title
        lap("slider")

        # 4. "Your turn": the exercise, opened from the lesson's link; its check on the untouched stubs
        your_turn = page.locator(f"{VISIBLE} .jp-RenderedMarkdown p:has-text('Your turn') "
                                 "a[href*='/exercises/01_absmax.ipynb']").first
        your_turn.scroll_into_view_if_needed()
        your_turn.click()
        page.locator(".lm-TabBar-tab.lm-mod-current[title*='exercises/01_absmax.ipynb']").first.wait_for(
            timeout=60_000)
        page.locator(VISIBLE).wait_for(timeout=60_000)
        wait_for_kernel(page, lab, EXERCISE)
        lap("exercise-kernel")
        cells = json.loads((ROOT / EXERCISE).read_text())["cells"]
        check_index = next(i for i, c in enumerate(cells) if "check(" in "".join(c["source"]))
        to_run = [i for i, c in enumerate(cells[:check_index])
                  if {"setup", "exercise"} & set(c.get("metadata", {}).get("tags", []))] + [check_index]
        for i in to_run:
            cell = page.locator(f"{VISIBLE} .jp-Notebook .jp-Cell").nth(i)
            cell.scroll_into_view_if_needed()
            cell.locator(".jp-InputPrompt").click()
            page.keyboard.press("Control+Enter")
            page.wait_for_function(
                f"""(i) => {{
                    const p = document.querySelectorAll('{VISIBLE} .jp-Notebook .jp-Cell')[i]
                        .querySelector('.jp-InputPrompt');
                    return p && /\\[\\d+\\]:/.test(p.textContent);
                }}""", arg=i, timeout=300_000)
        check_cell = page.locator(f"{VISIBLE} .jp-Notebook .jp-Cell").nth(check_index)
        check_cell.scroll_into_view_if_needed()
        check_cell.screenshot(path=str(shots / "lab_exercise_check.png"))
        lap("check")
        shown = check_cell.locator(".jp-OutputArea-output").all_inner_texts()
        report = "\n".join(shown)
        assert "not implemented yet" in report, report
        red = [t for t in shown if "ChecksFailed" in t]
        assert len(red) == 1, f"expected one ChecksFailed line, got outputs: {shown}"
        assert "Traceback" not in report and 'File "' not in report, f"a traceback wall: {report[-1500:]}"
        assert len(red[0].strip().splitlines()) == 1, f"the failure is more than one line: {red[0]!r}"
    finally:
        context.close()
        print("lab phases:", ", ".join(laps))
    assert _digest([LESSON, EXERCISE]) == before, "the browser test changed a committed notebook"
