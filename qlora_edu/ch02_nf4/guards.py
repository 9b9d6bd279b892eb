"""Guards of chapter 2's functions: :mod:`qlora_edu.ch02_nf4.packing` and :mod:`qlora_edu.ch02_nf4.quant4bit`."""

from __future__ import annotations

import math

import torch

from qlora_edu.common.guards import (
    all_finite,
    check_dtype,
    check_dtype_choice,
    check_float32_range,
    check_float_tensor,
    check_int,
    check_power_of_two,
    check_same_device,
    check_shape,
    float_dtypes,
    n_blocks,
)

#: Block sizes the 4-bit kernels accept: powers of two from 32 to 4096.
BLOCKSIZE_RANGE = (32, 4096)


def check_code(code: object) -> torch.Tensor:
    """``code`` must be a finite float32 table of 16 values that contains 0.0."""
    check_dtype("code", code, torch.float32)
    if tuple(code.shape) != (16,):
        raise ValueError(f"code must have shape (16,) (one value per 4-bit code), got {tuple(code.shape)}")
    if not all_finite(code):
        raise ValueError("code must be finite")
    if not bool((code == 0).any()):
        raise ValueError("code must contain 0.0 (zero blocks and the padding use the code of 0.0)")
    return code


def check_blocksize(blocksize: object) -> int:
    """``blocksize`` must be a power of two in 32..4096 (what the 4-bit kernels accept)."""
    return check_power_of_two("blocksize", blocksize, low=BLOCKSIZE_RANGE[0], high=BLOCKSIZE_RANGE[1])


def check_pack_4bit_args(codes: object, pad: object) -> None:
    """``codes``: a non-empty uint8 tensor of values 0..15; ``pad``: 0..15."""
    check_dtype("codes", codes, torch.uint8)
    check_int("pad", pad, low=0, high=15)
    if codes.numel() == 0:
        raise ValueError("codes must not be empty")
    if int(codes.max()) > 15:
        raise ValueError(f"codes must hold 4-bit values 0..15, got a maximum of {int(codes.max())}")


def check_unpack_4bit_args(packed: object, numel: object) -> None:
    """``packed``: uint8 holding ``ceil(numel / 2)`` bytes; ``numel``: >= 1."""
    check_dtype("packed", packed, torch.uint8)
    check_int("numel", numel, low=1)
    if packed.numel() != -(-numel // 2):
        raise ValueError(f"packed must hold ceil(numel / 2) = {-(-numel // 2)} bytes for numel={numel}, "
                         f"got {packed.numel()}")


def check_quantize_4bit_args(x: object, code: object, blocksize: object) -> None:
    """``x``: a non-empty float tensor (finiteness is checked on the block maxima, see :func:`check_finite_absmax`);
    ``code``: a 16-value float32 table with 0.0; ``blocksize``: a power of two in 32..4096."""
    check_float_tensor("x", x, finite=False)
    check_code(code)
    check_blocksize(blocksize)


def check_finite_absmax(x: torch.Tensor, absmax: torch.Tensor) -> None:
    """After quantizing: a NaN or inf anywhere in ``x`` makes its block's absmax NaN or inf. Checking the block
    maxima costs 1/blocksize of checking ``x``, and only a bad ``x`` pays for counting its bad values."""
    if not all_finite(absmax):
        n_bad = int((~torch.isfinite(x)).sum())
        if n_bad == 0:  # a finite float64 x whose block maximum does not fit the float32 constants
            check_float32_range("x", x)
        raise ValueError(f"x must be finite: it holds {n_bad} NaN or inf value(s)")


def check_dequantize_4bit_args(packed: object, absmax: object, code: object, shape: object, blocksize: object,
                               dtype: object) -> torch.Size:
    """``packed`` uint8 with ``ceil(n / 2)`` bytes and ``absmax`` float32 with one constant per block, on one
    device; ``shape`` the original shape (``n`` elements); ``dtype`` a float dtype. Returns ``shape`` as a Size."""
    check_dtype("packed", packed, torch.uint8)
    check_float_tensor("absmax", absmax)
    check_dtype("absmax", absmax, torch.float32)
    check_code(code)
    shape = check_shape("shape", shape)
    check_blocksize(blocksize)
    check_dtype_choice("dtype", dtype, float_dtypes())
    check_same_device(packed=packed, absmax=absmax)
    n = math.prod(shape)
    if packed.numel() != math.ceil(n / 2):
        raise ValueError(f"packed must hold ceil(n / 2) = {math.ceil(n / 2)} bytes for shape {tuple(shape)}, "
                         f"got {packed.numel()}")
    if tuple(absmax.shape) != (n_blocks(n, blocksize),):
        raise ValueError(f"absmax must have shape ({n_blocks(n, blocksize)},) for {n} elements at blocksize "
                         f"{blocksize}, got {tuple(absmax.shape)}")
    return shape

