"""Run-time settings read from the environment, in one place.

``QLORA_EDU_SMOKE=1`` asks the long runs (perplexity over many tokens, training) for a short version
with the same code: CI and ``make test`` set it; ``make execute`` runs the full version that the
committed notebooks show. Each notebook says what its full run gives and on what hardware.
"""

from __future__ import annotations

import os

SMOKE_ENV = "QLORA_EDU_SMOKE"


def smoke_mode() -> bool:
    """True when ``QLORA_EDU_SMOKE`` is ``1`` (unset or ``0``: full runs)."""
    value = os.environ.get(SMOKE_ENV, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"{SMOKE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def pick(full, smoke):
    """``smoke`` in smoke mode, ``full`` otherwise: ``n_tokens = pick(16_384, 2_048)``."""
    return smoke if smoke_mode() else full
