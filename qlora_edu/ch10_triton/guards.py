"""Guards of chapter 10's functions: :mod:`qlora_edu.ch10_triton.nf4_triton` and
:mod:`qlora_edu.ch10_triton.roofline`."""

from __future__ import annotations

import torch

from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.common.guards import (
    check_bool,
    check_dtype_choice,
    check_instance,
    check_int,
    check_number,
    check_power_of_two,
    check_same_device,
    check_shape,
    check_tensor,
)

#: The output dtypes of the kernel (those of bitsandbytes' ``dequantize_4bit``).
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The kernel indexes weights with 32-bit integers, as bitsandbytes' CUDA kernel does (``int n``).
MAX_WEIGHTS = 2**31


def check_triton_dequantize_applies_args(weight: object) -> None:
    """Any object may be asked about (the answer is then False); nothing to check."""


def check_nf4_for_kernel(weight: object) -> NF4Tensor:
    """``weight``: an :class:`NF4Tensor` with double quantization, of fewer than ``2**31`` weights, on a CPU or a CUDA
    device (its parts were checked to fit together when it was built)."""
    check_instance("weight", weight, NF4Tensor, "from quantize_nf4")
    if not weight.double_quant:
        raise ValueError("weight must be stored with double quantization (quantize_nf4(x, double_quant=True), the "
                         "default): the kernel reads 8-bit constants; dequantize_nf4 reads float32 ones")
    if weight.numel >= MAX_WEIGHTS:
        raise ValueError(f"weight must hold fewer than 2**31 weights (32-bit indices, as in bitsandbytes' kernel), "
                         f"got {weight.numel}")
    if weight.device.type not in ("cpu", "cuda"):
        raise ValueError(f"weight must be on a CPU (Triton's interpreter) or a CUDA device, got {weight.device}")
    return weight


def check_dequantize_nf4_triton_args(weight: object, dtype: object) -> torch.dtype:
    """Returns the output dtype: ``dtype``, or the weight's own when it is None."""
    check_nf4_for_kernel(weight)
    return check_dtype_choice("dtype", weight.dtype if dtype is None else dtype, OUTPUT_DTYPES)


def check_launch_nf4_dequantize_args(kernel: object, weight: object, out: object) -> None:
    """``kernel`` a function (plain or ``@triton.jit``); ``out`` a contiguous float32 / float16 / bfloat16 tensor of
    ``weight.numel`` elements on the weight's device."""
    if not callable(kernel) and not callable(getattr(kernel, "fn", None)):
        raise TypeError(f"kernel must be a function written in Triton's language, got {type(kernel).__name__}")
    check_nf4_for_kernel(weight)
    check_tensor("out", out)
    check_dtype_choice("out.dtype", out.dtype, OUTPUT_DTYPES)
    if out.numel() != weight.numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of weight.numel = {weight.numel} elements, got shape "
                         f"{tuple(out.shape)}{'' if out.is_contiguous() else ' (not contiguous)'}")
    check_same_device(weight=weight.packed, out=out)


def check_nf4_dequantize_ptx_args(capability: object, dtype: object, fp_fusion: object) -> None:
    """``capability``: a CUDA compute capability as Triton numbers it (80 for A100, 90 for H100 / H200); ``dtype``:
    an output dtype; ``fp_fusion``: a bool."""
    check_int("capability", capability, low=70, high=120)
    check_dtype_choice("dtype", dtype, OUTPUT_DTYPES)
    check_bool("fp_fusion", fp_fusion)


def check_dequantize_traffic_bytes_args(shape: object, dtype: object, blocksize: object, blocksize2: object) -> None:
    check_shape("shape", shape)
    check_dtype_choice("dtype", dtype, OUTPUT_DTYPES)
    check_power_of_two("blocksize", blocksize, low=32, high=4096)
    check_power_of_two("blocksize2", blocksize2, low=32, high=4096)


def check_roofline_seconds_args(nbytes: object, bandwidth: object) -> None:
    """``nbytes``: a non-negative int; ``bandwidth``: bytes per second, a positive number."""
    check_int("nbytes", nbytes, low=0)
    check_number("bandwidth", bandwidth, low=0.0, low_open=True)


def check_measured_nf4_gpu_times_args() -> None:
    """No arguments."""
