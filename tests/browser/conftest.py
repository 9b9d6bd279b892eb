"""Browser tests: the built book and JupyterLab, in headless Chromium (Debian's ``chromium``), driven by Playwright.

They run with ``make test-browser`` (``pytest -m browser tests/browser``), after ``make book``; ``make test`` collects
them and skips them with the reason. Set-up: ``scripts/install_browser.sh`` installs Debian's ``chromium`` with
apt-get when it is missing and the ``book`` extra (jupyter-book, playwright) into ``.venv``. Playwright drives the
system browser through ``executable_path``; it never downloads one (``playwright install`` is not used).

Every browser starts with a fresh profile (Playwright gives each launch a new temporary user-data-dir) and the
flags below; pages may load only from 127.0.0.1: any other request is aborted and fails the test that made it.
Screenshots go to ``jupyter_book/_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import re
import socket
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "jupyter_book" / "_build" / "html"
SHOTS = ROOT / "jupyter_book" / "_build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Mark this folder's tests ``browser``; skip them unless the run selected that marker (``-m browser``)."""
    selected = re.search(r"(?<!not )\bbrowser\b", config.getoption("markexpr") or "") is not None
    skip = pytest.mark.skip(reason="browser test: run `make test-browser` (pytest -m browser tests/browser); it "
                                   "needs the built book (`make book`) and Debian's chromium")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.browser)
            if not selected:
                item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(request) -> Path:
    """The screenshot folder. Each test module names its screenshots with its own prefix (``book_``, ``lab_``) and
    removes only its own old ones, so the two modules can run side by side (``pytest -n 2``) into one folder."""
    prefix = request.module.SHOT_PREFIX
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob(f"{prefix}*.png"):
        old.unlink()
    return SHOTS


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (the system one), shared by the session."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run scripts/install_browser.sh (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install -e '.[book]'")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass


@pytest.fixture(scope="session")
def book_url():
    """The built book served over HTTP on 127.0.0.1 (as a host would serve it; search needs no file:// quirks)."""
    if not (HTML / "index.html").is_file():
        pytest.fail(f"no built book at {HTML.relative_to(ROOT)}: run `make book` first")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()),
                                             functools.partial(_Quiet, directory=str(HTML)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class PageWatch:
    """What went wrong while a page was open: console errors, uncaught exceptions, failed or outside requests."""

    def __init__(self, page):
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught exception: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} ({r.failure})"))
        page.route("**/*", self._only_local)

    def _only_local(self, route):
        url = route.request.url
        if url.startswith(("http://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            self.problems.append(f"request outside the machine: {url}")
            route.abort()


@pytest.fixture
def page(browser):
    """A fresh browser context and page (1280 x 900), watched by :class:`PageWatch` (``page.watch``)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.watch = PageWatch(pg)
    yield pg
    context.close()
