"""Chapter 3: :class:`NF4Tensor`, a weight as QLoRA stores it (NF4 codes plus, usually, double-quantized constants).

The type only: it holds exactly the tensors that are kept (so ``nbytes`` is the real storage cost) and checks, when
built, that they fit together. :mod:`qlora_edu.ch03_double_quant.nf4_codec` makes one from a weight
(:func:`~qlora_edu.ch03_double_quant.nf4_codec.quantize_nf4`) and reads it back
(:func:`~qlora_edu.ch03_double_quant.nf4_codec.dequantize_nf4`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora_edu.common.guards import (
    check_bool,
    check_dtype,
    check_length,
    check_power_of_two,
    check_same_device,
    check_shape,
    n_blocks,
)

__all__ = ["NF4Tensor"]


@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A weight as QLoRA stores it: exactly the tensors that are kept, plus how to read them.

    Attributes:
        packed: uint8 ``(ceil(n / 2), 1)``, two NF4 codes a byte (first element in the high nibble).
        absmax: float32 ``(n_blocks,)`` constants, or, with ``double_quant``, their uint8 codes into
            ``dynamic_map(True)``.
        shape, dtype: the original weight's shape and dtype (``dequantize_nf4`` returns them).
        blocksize: weights per first-level block (64 in QLoRA).
        double_quant: whether ``absmax`` holds 8-bit codes.
        offset: float32 0-d mean of the constants (double quantization only).
        absmax2: float32 ``(ceil(n_blocks / blocksize2),)`` second-level constants (double quantization only).
        blocksize2: constants per second-level block (256).

    The two code tables (NF4's 16 values, the dynamic map's 256) are constants of the format and not
    counted; bitsandbytes' ``QuantState`` keeps a copy of both with every weight (64 B + 1 KiB).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    double_quant: bool = False
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    blocksize2: int = 256

    def __post_init__(self) -> None:
        """Check that the parts fit together, so a hand-built NF4Tensor cannot dequantize to truncated or
        mis-scaled values. Only shapes, dtypes and devices are compared (no pass over the data, no GPU sync):
        the QLoRA layer builds one on every forward pass."""
        n = math.prod(check_shape("shape", self.shape))
        object.__setattr__(self, "shape", torch.Size(self.shape))
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype (the weight's), got {self.dtype!r}")
        check_power_of_two("blocksize", self.blocksize, low=32, high=4096)
        check_bool("double_quant", self.double_quant)
        check_dtype("packed", self.packed, torch.uint8)
        check_length("packed", self.packed, n_blocks(n, 2), f"two 4-bit codes a byte for {n} weights")
        blocks = n_blocks(n, self.blocksize)
        if self.double_quant:
            check_dtype("absmax", self.absmax, torch.uint8)
            check_power_of_two("blocksize2", self.blocksize2, low=32, high=4096)
            check_dtype("offset", self.offset, torch.float32)
            check_length("offset", self.offset, 1, "the constants' mean")
            check_dtype("absmax2", self.absmax2, torch.float32)
            check_length("absmax2", self.absmax2, n_blocks(blocks, self.blocksize2),
                         f"one per {self.blocksize2} of the {blocks} constants")
            check_same_device(packed=self.packed, absmax=self.absmax, offset=self.offset, absmax2=self.absmax2)
        else:
            check_dtype("absmax", self.absmax, torch.float32)
            if self.offset is not None or self.absmax2 is not None:
                raise ValueError("offset and absmax2 belong to double quantization: pass double_quant=True, "
                                 "or leave them None")
            check_same_device(packed=self.packed, absmax=self.absmax)
        check_length("absmax", self.absmax, blocks, f"one constant per {self.blocksize} of the {n} weights")

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors: packed codes + constants (+ offset and absmax2)."""
        stored = [self.packed, self.absmax, self.offset, self.absmax2]
        return sum(t.numel() * t.element_size() for t in stored if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def __repr__(self) -> str:
        constants = f"double_quant=True, blocksize2={self.blocksize2}" if self.double_quant else "double_quant=False"
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {constants}, "
                f"nbytes={self.nbytes}, {self.bits_per_param:.3f} bits/param)")
