"""Chapter 1: absmax block quantization to signed integers.

A tensor is cut into blocks of ``blocksize`` consecutive elements of its row-major flattening (the
last block may be shorter). Each block ``b`` gets one float32 *quantization constant*

    scale_b = max_i |x_i| / qmax,        qmax = 2**(bits-1) - 1        (7 for 4 bits)

and every element becomes the integer code ``round(x_i / scale_b)`` in ``[-qmax, qmax]``. Reading the
weights back is one multiply, ``x_i ~ code_i * scale_b``, with an error of at most ``scale_b / 2``.

Why blocks: one outlier sets the scale of its whole block. With one scale for the whole tensor a
single weight of 100.0 turns every weight below 100/14 ~ 7.1 into code 0; with blocks of 64 it only
costs its own 63 neighbours their precision. The price is one float32 constant a block: 32/blocksize
extra bits per parameter (0.5 bits at blocksize 64).

Shapes: ``x`` any shape with ``n`` elements -> ``codes`` int8 of ``x``'s shape and ``scales`` float32
of shape ``(ceil(n / blocksize),)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_edu.ch01_absmax.guards import check_absmax_dequantize_args, check_absmax_quantize_args
from qlora_edu.common.guards import n_blocks

__all__ = ["absmax_quantize", "absmax_dequantize"]


def absmax_quantize(x: torch.Tensor, bits: int = 4, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` blockwise to signed ``bits``-bit integers with one absmax scale a block.

    Args:
        x: float tensor (fp32, fp16, bf16 or fp64), any shape, finite.
        bits: 2..8; codes lie in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (symmetric: -8 is unused
            for 4 bits, so that 0 stays exactly representable and +-absmax map to +-qmax).
        blocksize: number of consecutive flattened elements sharing one scale (>= 1).

    Returns:
        ``(codes, scales)``: int8 codes with ``x``'s shape, float32 scales of shape
        ``(ceil(x.numel() / blocksize),)``. An all-zero block gets scale 0 and codes 0.
    """
    check_absmax_quantize_args(x, bits, blocksize)
    qmax = 2 ** (bits - 1) - 1
    n = x.numel()
    # BEGIN SOLUTION
    # Hint: flatten x to float32 and pad it with zeros to whole blocks, view it as (n_blocks, blocksize),
    # Hint: scale = row absmax / qmax, codes = round(x / scale); a zero scale must give codes 0, not NaN.
    # Hint: end with `scales` (float32, one per block) and `codes` (any shape, the n codes first in flat order).
    flat = x.detach().flatten().float()
    blocks = F.pad(flat, (0, n_blocks(n, blocksize) * blocksize - n)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Divide by a tensor, not by the number qmax: on CUDA, PyTorch computes `tensor / number` as
    # tensor * (1 / number), which misses the correctly rounded quotient by one ulp on about half the values
    # for qmax = 7. Tensor / tensor is IEEE division on every device, so CPU and CUDA give the same bits.
    scales = absmax / absmax.new_tensor(qmax)
    # Divide by 1 where the block is all zeros: its elements are 0, so their codes stay 0.
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = torch.round(blocks / safe[:, None]).clamp_(-qmax, qmax)
    # END SOLUTION
    return codes.flatten()[:n].to(torch.int8).view(x.shape), scales


def absmax_dequantize(codes: torch.Tensor, scales: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Reverse :func:`absmax_quantize`: ``x ~ codes * scale`` of each element's block.

    Args:
        codes: int8 tensor, any shape (``n`` elements).
        scales: float32 tensor of shape ``(ceil(n / blocksize),)``, on ``codes``' device.
        blocksize: the block size used to quantize.

    Returns:
        float32 tensor with ``codes``' shape.
    """
    check_absmax_dequantize_args(codes, scales, blocksize)
    n = codes.numel()
    # BEGIN SOLUTION
    # Hint: give every element the scale of its block: scales.repeat_interleave(blocksize)[:n];
    # Hint: end with `deq`, the n float32 values in flat order.
    per_element = scales.repeat_interleave(blocksize)[:n]
    deq = codes.flatten().float() * per_element
    # END SOLUTION
    return deq.view(codes.shape)
