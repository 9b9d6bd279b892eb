"""Which device and dtype a notebook runs on, decided in one place.

Every notebook starts with::

    compute = pick_compute()
    print(compute)      # "Running on cpu with torch.bfloat16: ..."

and then uses ``compute.device`` and ``compute.dtype``. The rule:

* a CUDA GPU with bf16 support (compute capability >= 8.0: A100, A10, L4, RTX 30xx/40xx, H100)
  -> ``cuda`` with ``bfloat16``, the dtype QLoRA computes in;
* an older CUDA GPU (T4 and V100 are the usual free/cloud ones) -> ``cuda`` with ``float16``: they
  have no bf16 arithmetic;
* no GPU, but a CPU with native bf16 instructions (AVX512-BF16 or AMX-BF16) -> ``cpu`` with
  ``bfloat16``;
* otherwise -> ``cpu`` with ``float32`` (bf16 would only be emulated, slowly).

Two environment variables override the choice, so a learner can force a path without editing a
notebook: ``QLORA_EDU_DEVICE`` (``cpu`` or ``cuda``) and ``QLORA_EDU_DTYPE`` (``float32``,
``bfloat16`` or ``float16``). An explicit argument to :func:`pick_compute` wins over both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_edu.common import settings
from qlora_edu.common.guards import CudaUnavailableError
from qlora_edu.common.settings import DEVICE_ENV, DTYPE_ENV

__all__ = ["Compute", "pick_compute", "gpu_available", "skip_reason_no_gpu", "cpu_has_native_bf16"]

DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Compute:
    """Where the course's tensors live and which float type they compute in, and why.

    Attributes:
        device: ``torch.device("cpu")`` or ``torch.device("cuda")``.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        reason: one sentence a learner can read, saying why this pair was chosen.
    """

    device: torch.device
    dtype: torch.dtype
    reason: str

    def describe(self) -> str:
        """The line a notebook prints, e.g. ``Running on cpu with torch.bfloat16: <reason>``."""
        return f"Running on {self.device.type} with {self.dtype}: {self.reason}"

    def __str__(self) -> str:
        return self.describe()


def gpu_available() -> bool:
    """True when torch sees at least one CUDA device."""
    return torch.cuda.is_available()


def skip_reason_no_gpu() -> str | None:
    """``None`` when a CUDA device is present, else the sentence a skipped GPU test/cell reports."""
    if gpu_available():
        return None
    return ("no CUDA device: torch.cuda.is_available() is False (CPU-only machine or CPU build of "
            f"torch {torch.__version__}); this check needs a GPU")


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic instructions (x86 AVX512-BF16 or AMX-BF16).

    Why not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: it is True on any AVX512 CPU, where
    oneDNN *emulates* bf16; only the instructions below make bf16 matmuls fast. ``torch.cpu``'s
    capability table (torch >= 2.7) reads them from cpuinfo.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:  # older torch: fall back to the (looser) oneDNN check
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    caps = get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def _setting(name: str, arg: str | None, env: str, env_value: str | None, allowed) -> tuple[str | None, str]:
    """The argument if given, else the environment variable if set (non-empty), else None.

    Returns ``(value, source)`` where source names where the value came from, for messages.
    """
    if arg is not None:
        value, source = arg, f"argument {name}"
    else:
        value, source = env_value, f"environment variable {env}"
    if value is None:
        return None, source
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"{source} must be one of {', '.join(allowed)}; got {value!r}")
    return value.lower(), source


def _cuda_name() -> str:
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    return f"CUDA device {name} (compute capability {major}.{minor})"


def pick_compute(prefer: str | None = None, dtype: str | None = None) -> Compute:
    """Choose the device and dtype for this machine (see the module docstring for the rule).

    Args:
        prefer: ``"cpu"`` or ``"cuda"`` to force a device; ``None`` reads ``QLORA_EDU_DEVICE``,
            and if that is unset too, uses CUDA when it is available.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` to force a dtype; ``None`` reads
            ``QLORA_EDU_DTYPE``, and if that is unset too, picks the best one for the device.

    Returns:
        A frozen :class:`Compute`; ``print`` it to tell the learner what was chosen and why.

    Raises:
        ValueError: an argument or environment variable holds a value outside the allowed ones.
        CudaUnavailableError: cuda was asked for but torch sees no CUDA device (a RuntimeError).
    """
    device_name, device_source = _setting("prefer", prefer, DEVICE_ENV, settings.device_override(), DEVICES)
    dtype_name, dtype_source = _setting("dtype", dtype, DTYPE_ENV, settings.dtype_override(), tuple(DTYPES))

    if device_name == "cuda" and not gpu_available():
        raise CudaUnavailableError(f"{device_source} asks for cuda, but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}); use cpu or run on a machine with a CUDA GPU")
    if device_name is None:
        device_name = "cuda" if gpu_available() else "cpu"
        why_device = None
    else:
        why_device = f"{device_source} asks for {device_name}"

    if device_name == "cuda":
        where = _cuda_name()
        if torch.cuda.is_bf16_supported():
            best, why = torch.bfloat16, f"{where} supports bf16, the dtype QLoRA computes in"
        else:
            best, why = torch.float16, (f"{where} has no bf16 support, so float16 is used; "
                                        "T4 and V100 learners take this path")
    elif cpu_has_native_bf16():
        best, why = torch.bfloat16, "the CPU has native bf16 instructions (AVX512-BF16 or AMX-BF16)"
    else:
        best, why = torch.float32, ("the CPU has no native bf16 instructions, so float32 is used "
                                    "(emulated bf16 would be slower)")
    if why_device is not None:
        why = f"{why_device}; {why}"
    elif device_name == "cpu":
        why = f"no CUDA device; {why}"

    if dtype_name is None:
        return Compute(torch.device(device_name), best, why)
    chosen = DTYPES[dtype_name]
    return Compute(torch.device(device_name), chosen,
                   f"{dtype_source} asks for {dtype_name} (the automatic choice was {best}: {why})")
