"""Shared fixtures and markers.

* ``@pytest.mark.gpu``: the test needs a CUDA device; without one it is skipped, and the skip says why.
* ``@pytest.mark.slow``: the test loads the real base model (seconds to a minute on two CPU cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}); "
              "this test needs a GPU (run `make test-gpu` on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


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
