"""Chapter 2: packing two 4-bit codes into one byte.

PyTorch has no 4-bit dtype, so 4-bit codes (integers 0..15) are stored two to a ``uint8``, in the
layout bitsandbytes uses: the *first* element of each pair goes into the **high** nibble (bits 7-4),
the second into the low nibble (bits 3-0)::

    codes  [ 1,  2,  3,  4,  5 ]             (5 codes, odd: pad the last pair)
    bytes  [0x12, 0x34, 0x5p]                 p = the pad code (quantize_4bit pads with the code of 0.0)

    byte = (codes[0::2] << 4) | codes[1::2]
    codes[0::2] = byte >> 4,  codes[1::2] = byte & 0x0F

Shapes: ``n`` codes (any shape, taken in row-major order) <-> ``ceil(n / 2)`` bytes, 1-D. The number of
codes is not stored in the bytes: ``unpack_4bit`` needs ``numel`` to drop the pad nibble of an odd count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_edu.ch02_nf4.guards import check_pack_4bit_args, check_unpack_4bit_args

__all__ = ["pack_4bit", "unpack_4bit"]


def pack_4bit(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Pack 4-bit codes two to a byte, the first of each pair in the high nibble.

    Args:
        codes: uint8 tensor of any shape with values in ``0..15``, taken in row-major order.
        pad: the code (0..15) that fills the low nibble of the last byte when ``codes`` has an odd
            number of elements. ``quantize_4bit`` passes the code of 0.0 (NF4: 7), as bitsandbytes does.

    Returns:
        uint8 tensor of shape ``(ceil(n / 2),)``.
    """
    check_pack_4bit_args(codes, pad)
    # BEGIN SOLUTION
    # Hint: flatten; if the count is odd append `pad`; then (even << 4) | odd with codes[0::2], codes[1::2].
    flat = codes.flatten()
    if flat.numel() % 2:
        flat = F.pad(flat, (0, 1), value=pad)
    packed = (flat[0::2] << 4) | flat[1::2]
    # END SOLUTION
    return packed


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Reverse :func:`pack_4bit`: the first ``numel`` 4-bit codes held in ``packed``.

    Args:
        packed: uint8 tensor of any shape (e.g. bitsandbytes' ``(ceil(n/2), 1)``) holding ``ceil(numel/2)``
            bytes.
        numel: how many codes were packed (the pad nibble of an odd count is dropped).

    Returns:
        uint8 tensor of shape ``(numel,)`` with values in ``0..15``.
    """
    check_unpack_4bit_args(packed, numel)
    # BEGIN SOLUTION
    # Hint: high nibble = byte >> 4, low nibble = byte & 0x0F; interleave them with torch.stack(..., dim=1)
    # Hint: and flatten, then keep the first numel codes.
    flat = packed.flatten()
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).flatten()[:numel]
    # END SOLUTION
    return codes
