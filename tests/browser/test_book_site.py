"""The built book, as a reader's browser shows it: every page of the table of contents loads with no console
error and no request leaving the machine, has the book's title and the sidebar, every image loaded, math typeset
by the bundled MathJax (no raw ``$...$`` left), working search, and internal links that resolve.

Needs ``make book`` first; run with ``make test-browser``. Screenshots: ``jupyter_book/_build/screenshots/``.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

from .conftest import HTML, ROOT, PageWatch

SHOT_PREFIX = "book_"  # every screenshot of this module starts so (see conftest.shots)
TITLE = yaml.safe_load((ROOT / "jupyter_book" / "_config.yml").read_text())["title"]


def built_pages() -> list[str]:
    """Every page the build made, as its path in the site (``notebooks/01_absmax.html``), from Sphinx's search
    index (its ``docnames``); [] before ``make book``. tests/test_book.py checks that the toc lists every notebook."""
    index = HTML / "searchindex.js"
    if not index.is_file():
        return []
    m = re.search(r'"docnames"\s*:\s*(\[[^\]]*\])', index.read_text(encoding="utf-8"))
    return [f"{name}.html" for name in json.loads(m.group(1))] if m else []


PAGES = built_pages() or ['jupyter_book/intro.html']

# Text that MathJax leaves in the page when it did not typeset: $...$ or $$...$$ (or \( \)) outside code.
RAW_MATH = re.compile(r"\$\$?[^$\s][^$]*\$|\\\(|\\\[")

PAGE_FACTS_JS = """() => {
  const article = document.querySelector('article') || document.body;
  const clone = article.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .highlight').forEach(n => n.remove());
  const imgs = [...article.querySelectorAll('img')];
  return {
    title: document.title,
    h1: (article.querySelector('h1') || {}).textContent || '',
    sidebarLinks: [...document.querySelectorAll('nav.bd-docs-nav a')].map(a => a.getAttribute('href')),
    images: imgs.map(i => ({src: i.getAttribute('src').slice(0, 80), w: i.naturalWidth, done: i.complete})),
    mathNodes: article.querySelectorAll('.math').length,
    typeset: article.querySelectorAll('mjx-container').length,
    text: clone.innerText,
  };
}"""


def open_page(page, url: str) -> dict:
    """Load ``url``, wait for every image and for MathJax, and return the facts of :data:`PAGE_FACTS_JS`."""
    page.goto(url, wait_until="load")
    # images below the fold may be lazy: ask for all of them, then wait until each has loaded or failed
    page.evaluate("""async () => {
      const imgs = [...document.querySelectorAll('img')];
      imgs.forEach(i => i.loading = 'eager');
      await Promise.all(imgs.map(i => i.complete ? 0 : new Promise(r => { i.onload = r; i.onerror = r; })));
    }""")
    page.evaluate("async () => { if (window.MathJax && MathJax.startup) await MathJax.startup.promise; }")
    return page.evaluate(PAGE_FACTS_JS)


@dataclass
class Visit:
    """What one page of the book showed: :data:`PAGE_FACTS_JS`, the problems :class:`PageWatch` saw while it was
    open, its links (absolute URLs) and the MathJax scripts it loaded."""

    facts: dict
    problems: list[str]
    links: list[str]
    mathjax: list[str]


@pytest.fixture(scope="module")
def visits(browser, book_url, shots) -> dict[str, Visit]:
    """Every page of the book, opened once and screenshotted; the checks below read what these visits saw instead
    of opening pages again. One tab goes from page to page, as a reader's does: the theme's scripts and the MathJax
    bundle are fetched and compiled once (a fresh browser context per page took twice as long). What
    :class:`PageWatch` sees while a page is open is charged to that page."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = PageWatch(page)
    seen = {}
    try:
        for path in PAGES:
            watch.problems = problems = []
            facts = open_page(page, f"{book_url}/{path}")
            page.screenshot(path=str(shots / f"book_{path.removesuffix('.html').replace('/', '_')}.png"))
            links = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
            mathjax = page.evaluate("() => [...document.scripts].map(s => s.src).filter(s => /mathjax/i.test(s))")
            seen[path] = Visit(facts, problems, links, mathjax)
    finally:
        context.close()
    return seen


@pytest.mark.parametrize("path", PAGES)
def test_page_loads_clean(visits, path):
    visit = visits[path]
    facts = visit.facts
    assert visit.problems == [], f"{path}: {visit.problems}"
    assert TITLE in facts["title"], f"{path}: page title {facts['title']!r} lacks the book's title"
    assert facts["h1"].strip(), f"{path}: no heading"
    lessons = {p for p in PAGES if p.startswith("notebooks/")}
    linked = {urllib.parse.urljoin(f"/{path}", href).lstrip("/") for href in facts["sidebarLinks"] if href}
    assert lessons <= linked, f"{path}: the sidebar lacks {sorted(lessons - linked)}"
    broken = [img for img in facts["images"] if not (img["done"] and img["w"] > 0)]
    assert not broken, f"{path}: images that did not load: {broken}"
    assert facts["typeset"] >= facts["mathNodes"], \
        f"{path}: {facts['mathNodes']} math elements but only {facts['typeset']} typeset by MathJax"
    raw = RAW_MATH.findall(facts["text"])
    assert not raw, f"{path}: math left untypeset: {raw[:5]}"


def test_math_is_typeset_offline(visits, book_url):
    """At least one page has math, and the bundled MathJax (not a CDN) typeset all of it."""
    with_math = {path: v for path, v in visits.items() if v.facts["mathNodes"]}
    assert with_math, "no page has math: the check of the MathJax bundle would prove nothing"
    counts = {path: (v.facts["mathNodes"], v.facts["typeset"]) for path, v in with_math.items()}
    assert all(typeset >= n for n, typeset in counts.values()), counts
    scripts = {s for v in with_math.values() for s in v.mathjax}
    assert scripts and all(s.startswith(book_url) for s in scripts), scripts


def test_chapter_figures(page, book_url, shots):
    """A chapter with figures: each figure is a loaded image with a real size; screenshot the first one. Its widget
    (sliders need a kernel) is a note saying so, not an empty box waiting for a widget manager from a CDN."""
    facts = open_page(page, f"{book_url}/notebooks/01_absmax.html")
    assert len(facts["images"]) >= 2 and all(img["w"] > 100 for img in facts["images"]), facts["images"]
    assert page.locator("article .widget-note").count() >= 1
    assert page.locator("script[type='application/vnd.jupyter.widget-view+json']").count() == 0
    figure = page.locator("article img").first
    figure.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "book_figure_01_absmax.png"))
    assert page.watch.problems == []


@pytest.mark.parametrize("path", ["jupyter_book/intro.html", "notebooks/00_tour.html"])
def test_the_course_map_is_a_table_of_every_chapter(page, book_url, path):
    """The landing page's course map (generated at build time) and the tour's (a Markdown output of a cell that
    renders the chapter manifests) are HTML tables, one row a chapter, each chapter's title a link to its lesson's
    page (not raw pipes, not a link to an .ipynb file)."""
    from qlora_edu.common.chapters import all_chapters

    page.goto(f"{book_url}/{path}", wait_until="load")
    table = page.locator("table", has=page.locator("th", has_text="Checked against")).first
    rows = table.locator("tbody tr")
    chapters = all_chapters()
    assert rows.count() == len(chapters), f"{path}: {rows.count()} rows for {len(chapters)} chapters"
    for i, c in enumerate(chapters):
        link = rows.nth(i).locator("td").nth(1).locator("a").first
        href = urllib.parse.urljoin(f"{book_url}/{path}", link.get_attribute("href"))
        assert href.split("#")[0] == f"{book_url}/notebooks/{c.stem}.html", (path, c.stem, href)
    assert page.watch.problems == []


def test_search_finds_normalfloat(page, book_url, shots):
    page.goto(f"{book_url}/search.html?q=NormalFloat", wait_until="load")
    results = page.locator("#search-results ul.search li")
    results.first.wait_for(timeout=15_000)
    hrefs = [a.get_attribute("href") for a in page.locator("#search-results ul.search li a").all()]
    page.screenshot(path=str(shots / "book_search_NormalFloat.png"))
    assert any("notebooks/02_nf4" in (h or "") for h in hrefs), hrefs
    assert any("glossary" in (h or "") for h in hrefs), hrefs
    assert page.watch.problems == []


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode("utf-8", errors="replace")


def test_internal_links_resolve(visits, book_url):
    """Every link from a book page to the book (and its #anchor) reaches a page that exists and has that id."""
    cache: dict[str, str] = {}
    bad, checked = [], 0
    for path, visit in visits.items():
        for href in visit.links:
            if not href.startswith(book_url):
                continue
            target, _, anchor = href.partition("#")
            target = target.split("?")[0]
            checked += 1
            if target not in cache:
                try:
                    cache[target] = _fetch(target)
                except urllib.error.URLError as err:
                    cache[target] = ""
                    bad.append(f"{path} -> {href}: {err}")
                    continue
            if anchor and cache[target] and f'id="{urllib.parse.unquote(anchor)}"' not in cache[target]:
                bad.append(f"{path} -> {href}: no element with id {anchor!r}")
    assert checked > len(visits) * 5, f"only {checked} internal links found"
    assert not bad, "\n".join(sorted(set(bad)))
