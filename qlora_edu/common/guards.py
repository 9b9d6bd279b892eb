"""Argument checks: the primitives here, one guard per function in the modules beside this file.

Every public function of the course starts with one call to its guard, ``check_<function>_args(...)``, kept in
``qlora_edu/validation/<module>.py`` (``validation/absmax.py`` guards ``qlora_edu/ch01_absmax/absmax.py``, and so on).
A guard
raises a ``TypeError`` or ``ValueError`` that names the argument and says what was expected, so a wrong call fails
loudly instead of returning a silently wrong tensor. Learners are given the guards (an exercise imports them from
here, never from the module they are writing): the lesson is the quantization, not the bookkeeping.

This module holds the small checks the guards are built from.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    """``value`` must be a ``torch.Tensor``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of the float tensor ``t`` is finite (no NaN, no inf).

    A NaN makes the min and the max NaN, an inf makes one of them infinite, so two reductions answer it;
    ``torch.isfinite(t).all()`` builds a bool tensor first and was ~10x slower on 262,144 constants.
    """
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_float_tensor(name: str, value: object, *, finite: bool = True) -> torch.Tensor:
    """``value`` must be a non-empty floating-point tensor (fp32/fp16/bf16/fp64), finite by default."""
    check_tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got dtype {value.dtype}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty (shape {tuple(value.shape)})")
    if finite and not all_finite(value):
        n_bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} must be finite: it holds {n_bad} NaN or inf value(s)")
    return value


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` must be a Python int (not bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_power_of_two(name: str, value: object, *, low: int, high: int) -> int:
    """``value`` must be a power of two in ``[low, high]`` (block sizes of the 4-bit kernels)."""
    check_int(name, value, low=low, high=high)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")
    return value


def check_dtype(name: str, value: torch.Tensor, expected: torch.dtype) -> torch.Tensor:
    """``value`` must be a tensor of exactly ``expected`` dtype."""
    check_tensor(name, value)
    if value.dtype != expected:
        raise TypeError(f"{name} must have dtype {expected}, got {value.dtype}")
    return value


def n_blocks(numel: int, blocksize: int) -> int:
    """Number of blocks of ``blocksize`` consecutive elements covering ``numel`` (the last may be partial)."""
    return -(-numel // blocksize)


def check_bool(name: str, value: object) -> bool:
    """``value`` must be a Python bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value: object, choices: tuple) -> object:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All the tensors must live on one device; returns it (``check_same_device(packed=p, absmax=a)``)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{' and '.join(devices)} must be on the same device, got {where}")
    return next(iter(devices.values()))


def check_shape(name: str, value: object) -> torch.Size:
    """``value`` must be a tuple (or torch.Size) of non-negative ints describing at least one element."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (torch.Size, tuple, list)):
        raise TypeError(f"{name} must be a tuple of ints (e.g. x.shape), got {type(value).__name__}")
    dims = tuple(value)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {dims}")
    if math.prod(dims) == 0:
        raise ValueError(f"{name} must describe at least one element, got {dims}")
    return torch.Size(dims)


def check_length(name: str, value: torch.Tensor, expected: int, why: str) -> torch.Tensor:
    """``value`` must hold exactly ``expected`` elements (``why`` says where the number comes from)."""
    if value.numel() != expected:
        raise ValueError(f"{name} must hold {expected} elements ({why}), got {value.numel()} "
                         f"(shape {tuple(value.shape)})")
    return value
