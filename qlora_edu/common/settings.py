"""Run-time settings read from the environment, all in this one module.

| variable | read by | meaning |
|---|---|---|
| ``QLORA_EDU_SMOKE`` | :func:`smoke_mode` | ``1``: short runs (CI, quick checks); unset or ``0``: full runs |
| ``QLORA_EDU_DEVICE`` | :func:`device_override` | force ``cpu`` or ``cuda`` |
| ``QLORA_EDU_DTYPE`` | :func:`dtype_override` | force ``float32``, ``bfloat16`` or ``float16`` |
| ``QLORA_EDU_MODEL`` | :func:`model_override` | a hub id or local folder instead of the bundled model |
| ``QLORA_EDU_CACHE`` | :func:`cache_override` | the folder of the converted bundled model |
| ``QLORA_EDU_HUB_KERNELS`` | :func:`hub_kernels_allowed` | ``1``: bitsandbytes may fetch a CPU kernel at import |
| ``NO_COLOR`` | :func:`no_color` | any non-empty value: no ANSI colours in terminal reports (https://no-color.org) |
| ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` | :func:`torchrun_ranks` | set by ``torchrun`` for each process it starts |

The long runs (perplexity over many tokens, training) ask :func:`pick` for their budget: ``make test`` and CI
set ``QLORA_EDU_SMOKE=1``; ``make execute`` runs the full version the committed notebooks show, and each notebook
says what its full run gives and on what hardware. Nothing else in the package reads ``os.environ``.
"""

from __future__ import annotations

import os

__all__ = ["smoke_mode", "pick"]

SMOKE_ENV = "QLORA_EDU_SMOKE"
DEVICE_ENV = "QLORA_EDU_DEVICE"
DTYPE_ENV = "QLORA_EDU_DTYPE"
MODEL_ENV = "QLORA_EDU_MODEL"
CACHE_ENV = "QLORA_EDU_CACHE"
HUB_KERNELS_ENV = "QLORA_EDU_HUB_KERNELS"
NO_COLOR_ENV = "NO_COLOR"


def _read(name: str) -> str | None:
    """The variable's value with surrounding spaces removed; ``None`` when unset or empty."""
    return os.environ.get(name, "").strip() or None


def smoke_mode() -> bool:
    """True when ``QLORA_EDU_SMOKE`` is ``1`` (unset or ``0``: full runs)."""
    value = _read(SMOKE_ENV) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{SMOKE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def pick(full, smoke):
    """``smoke`` in smoke mode, ``full`` otherwise: ``n_tokens = pick(16_384, 2_048)``."""
    return smoke if smoke_mode() else full


def device_override() -> str | None:
    """``QLORA_EDU_DEVICE`` as given (checked by :func:`qlora_edu.common.device.pick_compute`), or None."""
    return _read(DEVICE_ENV)


def dtype_override() -> str | None:
    """``QLORA_EDU_DTYPE`` as given (checked by :func:`qlora_edu.common.device.pick_compute`), or None."""
    return _read(DTYPE_ENV)


def model_override() -> str | None:
    """``QLORA_EDU_MODEL``: a hub id or local folder to load instead of the bundled model, or None."""
    return _read(MODEL_ENV)


def cache_override() -> str | None:
    """``QLORA_EDU_CACHE``: where the converted bundled model is kept, or None for the default."""
    return _read(CACHE_ENV)


def hub_kernels_allowed() -> bool:
    """``QLORA_EDU_HUB_KERNELS=1``: bitsandbytes may ask the Hugging Face Hub for its CPU kernel at import."""
    return _read(HUB_KERNELS_ENV) == "1"


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment with ``overrides`` laid over it: the ``env=`` of a subprocess the course starts."""
    return os.environ | overrides


def torchrun_ranks() -> tuple[int, int, int] | None:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as ``torchrun`` sets them for each process it starts, or None when the
    process was not started by torchrun (chapter 11's sharded run then starts its own processes)."""
    rank, world = _read("RANK"), _read("WORLD_SIZE")
    if rank is None or world is None:
        return None
    return int(rank), int(world), int(_read("LOCAL_RANK") or 0)


def no_color() -> bool:
    """True when ``NO_COLOR`` is set to a non-empty value (the no-color.org convention): reports such as
    ``python -m qlora_edu doctor`` then print no ANSI colour codes, even on a terminal."""
    return bool(os.environ.get(NO_COLOR_ENV, ""))
