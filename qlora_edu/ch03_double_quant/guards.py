"""Guards of chapter 3's functions: :mod:`qlora_edu.ch03_double_quant.double_quant` and
:mod:`qlora_edu.ch03_double_quant.nf4_codec`."""

from __future__ import annotations

import torch

from qlora_edu.ch02_nf4.guards import check_blocksize
from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.common.guards import (
    check_bool,
    check_choice,
    check_dtype,
    check_float_tensor,
    check_instance,
    check_power_of_two,
    check_same_device,
    check_tensor,
    n_blocks,
)

#: How the 8-bit code of a constant is chosen: bitsandbytes' CPU grid snap, or the exactly nearest code (CUDA).
ROUNDINGS = ("grid", "nearest")


def check_blocksize2(name: str, blocksize: object) -> int:
    """A second-level block size: a power of two in 32..4096 (bitsandbytes uses 256)."""
    return check_power_of_two(name, blocksize, low=32, high=4096)


def check_dynamic_map_args(signed: object) -> None:
    check_bool("signed", signed)


def check_grid_lookup_table_args(code: object) -> None:
    """``code``: a sorted 1-D float32 table of at least 2 values."""
    check_dtype("code", code, torch.float32)
    if code.dim() != 1 or code.numel() < 2 or not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("code must be a sorted 1-D table of at least 2 values")


def check_double_quantize_args(absmax: object, blocksize: object, rounding: object) -> None:
    """``absmax``: finite, non-negative float constants (they are maxima of absolute values); ``blocksize``:
    a power of two in 32..4096; ``rounding``: ``"grid"`` or ``"nearest"``."""
    check_float_tensor("absmax", absmax)
    if float(absmax.min()) < 0:
        raise ValueError(f"absmax must hold non-negative constants (maxima of |x|), got a minimum of "
                         f"{float(absmax.min())}")
    check_blocksize2("blocksize", blocksize)
    check_choice("rounding", rounding, ROUNDINGS)
    # The offset is the constants' float32 mean: their sum must not overflow float32 on the way (weights near
    # 1e38 do that; the result would be an infinite offset and NaN weights). One float64 sum of n / 64 values.
    total, limit = float(absmax.double().sum()), torch.finfo(torch.float32).max
    if total > limit:
        raise ValueError(f"absmax (the block constants) sums to {total:.4g}, beyond float32's range ({limit:.4g}): "
                         "their float32 mean, the offset, would overflow; scale the weight down, or quantize it "
                         "without double quantization (double_quant=False)")


def check_double_dequantize_args(codes: object, offset: object, absmax2: object, blocksize: object) -> torch.Tensor:
    """``codes`` uint8, ``offset`` a finite number (float or one-element float tensor), ``absmax2`` float32 with one
    constant per block of ``codes``, on the codes' device. Returns ``offset`` as a float32 0-d tensor there."""
    check_dtype("codes", codes, torch.uint8)
    if codes.numel() == 0:
        raise ValueError("codes must not be empty")
    if isinstance(offset, torch.Tensor):
        check_float_tensor("offset", offset)
        if offset.numel() != 1:
            raise ValueError(f"offset must be a single number, got shape {tuple(offset.shape)}")
        check_same_device(codes=codes, offset=offset)
        offset = offset.detach().reshape(()).float()
    elif isinstance(offset, (int, float)) and not isinstance(offset, bool):
        offset = check_float_tensor("offset", torch.tensor(float(offset), device=codes.device))
    else:
        raise TypeError(f"offset must be a float or a 0-d float tensor, got {type(offset).__name__}")
    check_float_tensor("absmax2", absmax2)
    check_dtype("absmax2", absmax2, torch.float32)
    check_blocksize2("blocksize", blocksize)
    check_same_device(codes=codes, absmax2=absmax2)
    expected = (n_blocks(codes.numel(), blocksize),)
    if tuple(absmax2.shape) != expected:
        raise ValueError(f"absmax2 must have shape {expected} for {codes.numel()} codes at blocksize {blocksize}, "
                         f"got {tuple(absmax2.shape)}")
    return offset


def check_rounding_mismatch_rate_args(absmax: object, blocksize: object) -> None:
    check_double_quantize_args(absmax, blocksize, "grid")


def check_quantize_nf4_args(x: object, blocksize: object, double_quant: object, rounding: object,
                            blocksize2: object) -> None:
    check_tensor("x", x)
    check_blocksize(blocksize)
    check_bool("double_quant", double_quant)
    check_choice("rounding", rounding, ROUNDINGS)
    check_blocksize2("blocksize2", blocksize2)


def check_dequantize_nf4_args(t: object) -> None:
    check_instance("t", t, NF4Tensor, "from quantize_nf4")
