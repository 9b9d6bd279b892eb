"""The reference facts shipped in ``qlora_edu/reference/`` (:mod:`qlora_edu.common.reference`).

* each copy is a provenance header plus its source byte for byte (diffed against the source where the project's
  shared folder sits beside the repository; skipped with the reason in a clone that does not have it);
* every reference file the package, the tests, the notebooks, the exercises or the benchmarks cite exists;
* nothing there names a path into the shared folder (a clone could not audit its own expected values);
* the reader's errors name the argument.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qlora_edu.common.reference import HEADER_END, REFERENCE_DIR, reference_body, reference_names, reference_path

ROOT = Path(__file__).resolve().parents[1]
#: Where the copies came from: the project's shared notes beside the repository (absent in a public clone).
SOURCE_DIR = ROOT.parent / "shared" / "reference"
EXPECTED = ("bitsandbytes-0.50.2-facts.md", "environment-facts.md", "gpu-facts.md", "gpu-runs.md", "gpu_probe.py")
#: The folders whose text may cite a reference file.
CITING = ("qlora_edu", "tests", "notebooks", "exercises", "solutions", "benchmarks", "scripts")


def _citing_files():
    for folder in CITING:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".ipynb", ".md") and path.is_file() and REFERENCE_DIR not in path.parents:
                yield path


def test_the_reference_files_are_there():
    assert reference_names() == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_each_copy_has_a_provenance_header(name):
    text = reference_path(name).read_text(encoding="utf-8")
    head = text[: text.index(HEADER_END)]
    assert "Provenance" in head and "copied on 20" in head and "Figures:" in head, head
    assert reference_body(name) == text[len(text) - len(reference_body(name)):]
    assert reference_body(name).strip(), "the header swallowed the body"


@pytest.mark.parametrize("name", EXPECTED)
def test_each_copy_equals_its_source(name):
    source = SOURCE_DIR / name
    if not source.is_file():
        pytest.skip(f"the source {source} is not here (a clone without the project's shared folder): nothing to "
                    "diff against")
    assert reference_body(name).encode("utf-8") == source.read_bytes()


def test_every_cited_reference_file_exists():
    """A name ``<something>-facts.md``, ``gpu-runs.md`` or ``gpu_probe.py`` in the text of the package, the tests,
    the notebooks, the exercises or the benchmarks is a reference file."""
    cited: dict[str, list[str]] = {}
    pattern = re.compile(r"\b([\w.-]+-facts\.md|gpu-runs\.md|gpu_probe\.py)\b")
    for path in _citing_files():
        for name in pattern.findall(path.read_text(encoding="utf-8")):
            cited.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert "gpu-facts.md" in cited, "the memory chapter cites gpu-facts.md: the search found nothing"
    missing = {name: sorted(set(paths)) for name, paths in cited.items() if name not in EXPECTED}
    assert not missing, f"cited but not in {REFERENCE_DIR}: {missing}"


def test_nothing_names_a_path_into_the_shared_folder():
    """Expected values are read from the repository's copies, never from ``../shared`` or ``/work/shared``."""
    pattern = re.compile(r"(\.\./|/work/)shared\b|[\"']shared[\"']\s*[,/]\s*[\"']reference")
    offenders = sorted(str(p.relative_to(ROOT)) for p in _citing_files()
                       if p.name != Path(__file__).name and pattern.search(p.read_text(encoding="utf-8")))
    assert not offenders, f"these files name the shared folder instead of qlora_edu/reference/: {offenders}"


def test_reference_path_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"name='gpu_facts\.md'.*gpu-facts\.md"):
        reference_path("gpu_facts.md")
    with pytest.raises(ValueError, match="name='../reference/gpu-facts.md'"):
        reference_path("../reference/gpu-facts.md")
    with pytest.raises(TypeError, match="name must be"):
        reference_path(Path("gpu-facts.md"))
