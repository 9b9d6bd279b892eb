"""Chapter 3: a weight to and from the way QLoRA stores it, NF4 codes plus double-quantized constants.

:class:`~qlora_edu.ch03_double_quant.nf4_tensor.NF4Tensor` holds exactly the tensors that are kept, and
:func:`quantize_nf4` / :func:`dequantize_nf4` go to and from it, equal to bitsandbytes'
``quantize_4bit(..., quant_type="nf4", compress_statistics=True)`` and ``dequantize_4bit``:

    weight --quantize_4bit(nf4_code(), 64)--> packed codes (4 bits) + absmax (float32, one per 64)
    absmax --double_quantize(256)----------> 8-bit codes + offset (the mean) + absmax2 (one per 256)

(:mod:`qlora_edu.ch02_nf4.quant4bit`, :mod:`qlora_edu.ch03_double_quant.double_quant`). The 4-bit steps run through
:mod:`qlora_edu.ch02_nf4.fast4bit` (the same bytes, faster, on the weight's own device), because the from-scratch QLoRA
layer dequantizes every weight in every forward and backward pass. All tensors of an :class:`NF4Tensor` live
on the device of the weight it was made from.
"""

from __future__ import annotations

import functools
import warnings

import torch

from qlora_edu.ch02_nf4.fast4bit import byte_pair_table, dequantize_4bit_unchecked, quantize_4bit_fast
from qlora_edu.ch02_nf4.nf4 import nf4_code
from qlora_edu.ch03_double_quant.double_quant import double_quantize, dynamic_map
from qlora_edu.ch03_double_quant.guards import check_dequantize_nf4_args, check_quantize_nf4_args
from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor

__all__ = ["quantize_nf4", "dequantize_nf4", "dequantize_nf4_torch"]


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = True, rounding: str = "grid",
                 blocksize2: int = 256) -> NF4Tensor:
    """Store ``x`` as QLoRA does: NF4 codes, with the constants double-quantized by default.

    Matches ``bitsandbytes.functional.quantize_4bit(x, quant_type="nf4", blocksize=blocksize,
    compress_statistics=double_quant)``: the packed bytes, and ``absmax`` / ``offset`` / ``state2.absmax``
    (with ``rounding="grid"``; ``"nearest"`` differs on ~0.2% of the constants' codes).
    """
    check_quantize_nf4_args(x, blocksize, double_quant, rounding, blocksize2)
    packed, absmax = quantize_4bit_fast(x, nf4_code(), blocksize)
    if not double_quant:
        return NF4Tensor(packed, absmax, x.shape, x.dtype, blocksize)
    # The float32 mean of the constants can depend on how many threads sum it; bitsandbytes takes it with the
    # caller's threads, and so do we: same threads, same last bit, same codes.
    codes, offset, absmax2 = double_quantize(absmax, blocksize2, rounding)
    return NF4Tensor(packed, codes, x.shape, x.dtype, blocksize, True, offset, absmax2, blocksize2)


def dequantize_nf4(t: NF4Tensor) -> torch.Tensor:
    """The weight back from an :class:`NF4Tensor`, in its original shape and dtype.

    Equal to :func:`~qlora_edu.ch03_double_quant.double_quant.double_dequantize` followed by
    :func:`~qlora_edu.ch02_nf4.quant4bit.dequantize_4bit` (and to bitsandbytes' ``dequantize_4bit``), bit for bit; the
    tests check both. The QLoRA layer calls it for every weight in every forward and backward pass, so it skips
    the per-call work that does not depend on the weight: the tables come from :func:`_format_tables`, and the
    tensors of an :class:`NF4Tensor` were checked when they were put together.

    On CUDA, with double quantization, it runs chapter 10's fused Triton kernel
    (:func:`~qlora_edu.ch10_triton.nf4_triton.dequantize_nf4_triton`: the same bits in one launch); elsewhere, or
    where triton does not import (with a warning, once), :func:`dequantize_nf4_torch`.
    """
    check_dequantize_nf4_args(t)
    if t.device.type == "cuda" and t.double_quant:
        # A later chapter's kernel serves this one's CUDA path: one of the package's named upward imports.
        from qlora_edu.ch10_triton.nf4_triton import (
            dequantize_nf4_triton,
            triton_available,
            triton_dequantize_applies,
        )

        if triton_dequantize_applies(t):
            return dequantize_nf4_triton(t)
        if not triton_available():
            _warn_no_triton()
    return dequantize_nf4_torch(t)


def dequantize_nf4_torch(t: NF4Tensor) -> torch.Tensor:
    """:func:`dequantize_nf4` in torch: the constants, then the lookup and the product (``torch.compile``d on CUDA by
    :mod:`qlora_edu.ch02_nf4.fast4bit`). The reference the Triton kernel is checked and timed against."""
    check_dequantize_nf4_args(t)
    nf4, pair_table, dmap = _format_tables(t.device)
    absmax = _double_dequantize(t.absmax, t.offset, t.absmax2, t.blocksize2, dmap) if t.double_quant else t.absmax
    return dequantize_4bit_unchecked(t.packed, absmax, nf4, t.shape, t.blocksize, t.dtype, pair_table)


@functools.cache
def _warn_no_triton() -> None:
    """Once per process: the CUDA path runs without chapter 10's kernel."""
    warnings.warn("triton does not import here: dequantizing NF4 on CUDA with the torch.compile'd lesson path "
                  "instead of chapter 10's fused kernel (the same bits; 2.9-3.5x bitsandbytes' time on an H200, "
                  "qlora_edu/reference/gpu-runs.md). pip install triton (Linux) to use the kernel.",
                  RuntimeWarning, stacklevel=3)


@functools.cache
def _format_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NF4's 16 levels, their byte-pair table and the signed dynamic map, on ``device``: constants of the format,
    built once per device (rebuilding them on every call took about a third of dequantizing a 576 x 576 weight).
    Private and never handed out, so nothing can change them in place."""
    nf4 = nf4_code().to(device)
    return nf4, byte_pair_table(nf4), dynamic_map(True).to(device)


def _double_dequantize(codes: torch.Tensor, offset: torch.Tensor, absmax2: torch.Tensor, blocksize: int,
                       table: torch.Tensor) -> torch.Tensor:
    """:func:`~qlora_edu.ch03_double_quant.double_quant.double_dequantize` with the dynamic map passed in and no
    padding copy: the
    same two float32 steps (times ``absmax2``, plus ``offset``), so the same bits (``tests/test_03_double_quant``)."""
    values = table[codes.reshape(-1).long()]
    m = values.numel()
    full = m - m % blocksize
    values[:full].view(-1, blocksize).mul_(absmax2[: full // blocksize, None])
    values[full:].mul_(absmax2[-1])  # the last, partial block (empty when m is a multiple of blocksize)
    return values.add_(offset)
