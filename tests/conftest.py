"""Shared fixtures: which implementations the battery runs against."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


@pytest.fixture(scope="session")
def notebook_impl():
    """Namespace of a notebook's exercise functions laid over the package, executed once per notebook."""
    from qlora_edu.checks import overlay
    from qlora_edu.checks.notebooks import notebook_functions

    cache: dict[Path, object] = {}

    def load(path: Path):
        if path not in cache:
            cache[path] = overlay(notebook_functions(path))
        return cache[path]

    return load
