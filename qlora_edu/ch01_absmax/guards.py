"""Guards of chapter 1's functions (:mod:`qlora_edu.ch01_absmax.absmax`)."""

from __future__ import annotations

import torch

from qlora_edu.common.guards import check_dtype, check_float_tensor, check_int, check_same_device, n_blocks


def check_absmax_quantize_args(x: object, bits: object, blocksize: object) -> None:
    """``x``: a finite float tensor within float32's range (the scales are float32); ``bits``: 2..8;
    ``blocksize``: >= 1."""
    check_float_tensor("x", x, float32_range=True)
    check_int("bits", bits, low=2, high=8)
    check_int("blocksize", blocksize, low=1)


def check_absmax_dequantize_args(codes: object, scales: object, blocksize: object) -> None:
    """``codes``: int8; ``scales``: finite float32, one per block of ``codes``, on the same device."""
    check_dtype("codes", codes, torch.int8)
    check_float_tensor("scales", scales)
    check_dtype("scales", scales, torch.float32)
    check_int("blocksize", blocksize, low=1)
    check_same_device(codes=codes, scales=scales)
    expected = (n_blocks(codes.numel(), blocksize),)
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales must have shape {expected} for {codes.numel()} codes at blocksize "
                         f"{blocksize}, got {tuple(scales.shape)}")
