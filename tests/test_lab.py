"""`make lab` opens JupyterLab at the repository root on the README, so lessons, exercises and solutions are one
click away and a lesson's "Your turn" link (../exercises/NN_name.ipynb) resolves. Started here for real, headless."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import ROOT

LAB = ROOT / "scripts" / "lab.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab_server():
    if not (ROOT / ".venv" / "bin" / "jupyter").exists():
        pytest.skip("no .venv/bin/jupyter: run `make install` first")
    port, token = _free_port(), "qlora-edu-test"
    proc = subprocess.Popen(["bash", str(LAB), "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                             f"--IdentityProvider.token={token}"], cwd="/", stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"JupyterLab did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _get(base: str, token: str, path: str):
    with urllib.request.urlopen(f"{base}{path}?token={token}", timeout=10) as r:
        return r.read().decode()


def test_the_server_root_is_the_repository(lab_server):
    names = {item["name"] for item in json.loads(_get(*lab_server, "/api/contents"))["content"]}
    assert {"notebooks", "exercises", "solutions", "README.md"} <= names


def test_your_turn_links_resolve_from_the_server_root(lab_server):
    """Every ../exercises/... link in a lesson names a file the server can open."""
    checked = 0
    for lesson in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for target in set(re.findall(r"\(\.\./((?:exercises|solutions)/[\w.]+\.ipynb)\)", lesson.read_text())):
            model = json.loads(_get(*lab_server, f"/api/contents/{target}"))
            assert model["type"] == "notebook", f"{lesson.name} links to {target}"
            checked += 1
    assert checked >= len(list((ROOT / "exercises" / "src").glob("*.py"))), "a lesson lacks its Your turn link"


def test_lab_opens_on_the_rendered_readme():
    script = LAB.read_text()
    assert "--ServerApp.root_dir=" in script and "/lab/tree/README.md" in script
    overrides = ROOT / ".venv" / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    if not overrides.exists():
        pytest.skip("no .venv: run `make install` first")
    viewers = json.loads(overrides.read_text())["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers == {"markdown": "Markdown Preview"}
