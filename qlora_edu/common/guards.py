"""Argument checks: the primitives every chapter's guards are built from, and the one exception policy.

Every public function of the course starts with one call to its guard, ``check_<function>_args(...)``, kept in its
chapter's ``guards.py`` (``qlora_edu/ch01_absmax/guards.py`` guards ``qlora_edu/ch01_absmax/absmax.py``, and so on;
code shared by every chapter, in :mod:`qlora_edu.common`, keeps its few guards beside it). A guard raises an error
that names the argument and says what was expected, so a wrong call fails loudly instead of returning a silently
wrong tensor. Learners are given the guards (an exercise imports them from the chapter's ``guards.py``, never from
the module they are writing): the lesson is the quantization, not the bookkeeping.

**One exception policy**, the same in every chapter:

* the wrong *type* (a list where a tensor belongs, a str where a ``torch.dtype`` belongs, a tensor of the wrong
  dtype) raises :class:`TypeError`;
* the right type with a wrong *value* (a negative size, a ``torch.dtype`` outside the allowed ones, NaN in a tensor
  that must be finite, mismatched shapes or devices) raises :class:`ValueError`;
* asking for CUDA where there is none raises :class:`CudaUnavailableError`, everywhere.

This module imports no torch at import time (the pre-flight check ``python -m qlora_edu doctor`` uses it to report
a missing torch); the checks that look at tensors import torch when they run.
"""

from __future__ import annotations

import math


class CudaUnavailableError(RuntimeError):
    """A CUDA device was asked for (an argument, ``QLORA_EDU_DEVICE``, a GPU-only function) and there is none.

    A ``RuntimeError``, not a ``ValueError``: the call is right, the machine lacks what it needs.
    """


def _torch():
    import torch

    return torch


def float_dtypes() -> tuple:
    """The floating-point dtypes the course's tensors may have: float32, float16, bfloat16, float64."""
    torch = _torch()
    return (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, value: object):
    """``value`` must be a ``torch.Tensor``."""
    if not isinstance(value, _torch().Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def all_finite(t) -> bool:
    """Whether every element of the float tensor ``t`` is finite (no NaN, no inf).

    A NaN makes the min and the max NaN, an inf makes one of them infinite, so two reductions answer it;
    ``torch.isfinite(t).all()`` builds a bool tensor first and was ~10x slower on 262,144 constants.
    """
    torch = _torch()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_float_tensor(name: str, value: object, *, finite: bool = True, float32_range: bool = False):
    """``value`` must be a non-empty floating-point tensor (fp32/fp16/bf16/fp64), finite by default.

    With ``float32_range``, its values must also fit in float32 (only a float64 tensor can hold more): the course's
    quantizers keep their scales in float32, so a larger value would become an infinite scale.
    """
    check_tensor(name, value)
    if value.dtype not in float_dtypes():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got dtype {value.dtype}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty (shape {tuple(value.shape)})")
    if finite and not all_finite(value):
        n_bad = int((~_torch().isfinite(value)).sum())
        raise ValueError(f"{name} must be finite: it holds {n_bad} NaN or inf value(s)")
    if float32_range:
        check_float32_range(name, value)
    return value


def check_float32_range(name: str, value) -> None:
    """A float64 tensor's values must fit in float32 (max 3.4028e38): the scales the course stores are float32."""
    torch = _torch()
    if value.dtype == torch.float64:
        largest = float(value.abs().max())
        if largest > torch.finfo(torch.float32).max:
            raise ValueError(f"{name} holds values beyond float32's range (max |{name}| = {largest:.4g} > "
                             f"{torch.finfo(torch.float32).max:.4g}): the format stores its scales in float32; "
                             f"scale {name} down first")


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` must be a Python int (not bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` must be a finite real number (int or float, not bool) in the interval from ``low`` to ``high``
    (closed ends unless ``low_open`` / ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or below or above:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return float(value)


def check_power_of_two(name: str, value: object, *, low: int, high: int) -> int:
    """``value`` must be a power of two in ``[low, high]`` (block sizes of the 4-bit kernels)."""
    check_int(name, value, low=low, high=high)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")
    return value


def check_dtype(name: str, value: object, expected) -> object:
    """``value`` must be a tensor of exactly ``expected`` dtype."""
    check_tensor(name, value)
    if value.dtype != expected:
        raise TypeError(f"{name} must have dtype {expected}, got {value.dtype}")
    return value


def check_dtype_choice(name: str, value: object, choices: tuple):
    """``value`` must be a ``torch.dtype`` (else TypeError) and one of ``choices`` (else ValueError)."""
    if not isinstance(value, _torch().dtype):
        raise TypeError(f"{name} must be a torch.dtype (one of {choices}), got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value}")
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
    """``value`` must be one of ``choices`` (a TypeError when the choices are all str and ``value`` is not one)."""
    if all(isinstance(c, str) for c in choices) and not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_device(name: str, value: object, *, types: tuple[str, ...] = ("cpu", "cuda"), available: bool = True):
    """``value`` must name a torch device of one of ``types``: ``"cpu"``, ``"cuda"``, ``"cuda:0"`` or a
    ``torch.device``; with ``available`` (the default) it must also exist here. Returns the ``torch.device``.

    Raises TypeError for another type, ValueError for a string that names no device (or a type not in ``types``),
    :class:`CudaUnavailableError` for a CUDA device on a machine without one (unless ``available`` is False: a
    function that only *describes* a device's settings, such as chapter 8's ``default_config("cuda")``).
    """
    torch = _torch()
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name} must be one of {types} (a str) or a torch.device, got {type(value).__name__}")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name} must name a device such as {' or '.join(map(repr, types))}, got {value!r}") from err
    if device.type not in types:
        raise ValueError(f"{name} must be a {' or '.join(types)} device, got {str(device)!r}")
    if available and device.type == "cuda" and not torch.cuda.is_available():
        raise CudaUnavailableError(f"{name} is {str(device)!r}, but there is no CUDA device here "
                                   f"(torch.cuda.is_available() is False, torch {torch.__version__}); "
                                   "use 'cpu' or run on a machine with an NVIDIA GPU")
    return device


def check_same_device(**tensors) -> object:
    """All the tensors must live on one device; returns it (``check_same_device(packed=p, absmax=a)``)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{' and '.join(devices)} must be on the same device, got {where}")
    return next(iter(devices.values()))


def check_shape(name: str, value: object):
    """``value`` must be a tuple (or torch.Size) of non-negative ints describing at least one element."""
    torch = _torch()
    if isinstance(value, (str, bytes)) or not isinstance(value, (torch.Size, tuple, list)):
        raise TypeError(f"{name} must be a tuple of ints (e.g. x.shape), got {type(value).__name__}")
    dims = tuple(value)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {dims}")
    if math.prod(dims) == 0:
        raise ValueError(f"{name} must describe at least one element, got {dims}")
    return torch.Size(dims)


def check_length(name: str, value, expected: int, why: str):
    """``value`` must hold exactly ``expected`` elements (``why`` says where the number comes from)."""
    if value.numel() != expected:
        raise ValueError(f"{name} must hold {expected} elements ({why}), got {value.numel()} "
                         f"(shape {tuple(value.shape)})")
    return value


def check_instance(name: str, value: object, cls: type, what: str = "") -> object:
    """``value`` must be an instance of ``cls`` (``what`` says how one is made, e.g. ``"from quantize_nf4()"``)."""
    if not isinstance(value, cls):
        made = f" ({what})" if what else ""
        raise TypeError(f"{name} must be a {cls.__name__}{made}, got {type(value).__name__}")
    return value
