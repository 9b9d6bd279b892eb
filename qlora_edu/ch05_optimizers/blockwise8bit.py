"""Chapter 5: blockwise 8-bit quantization of optimizer states (the storage of 8-bit Adam).

Adam keeps two float32 numbers per parameter: the running mean of the gradient ``m`` (any sign) and of
its square ``v`` (never negative). 8-bit Adam (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization") stores each as one byte per element plus one float32 scale per block:

1. flatten the state row-major and cut it into blocks of ``blocksize = 256`` consecutive elements (the
   last block may be partial);
2. per block ``absmax = max |x|`` (float32) and ``scaled = x * (1 / absmax)`` in ``[-1, 1]``;
3. each scaled value becomes the uint8 index of a code of the *dynamic map*
   (:func:`qlora_edu.ch03_double_quant.double_quant.dynamic_map`): the signed map for ``m``, the unsigned one for ``v``
   (``v >= 0``, so spending the sign bit on precision doubles the levels of every decade).

Reading back: ``x ~ code[codes] * absmax[i // blocksize]`` (one float32 product).

Why blocks: one outlier only coarsens the 256 values of its own block. Why a dynamic map: Adam's states
span many orders of magnitude inside a block; the dynamic map has levels from ``1`` down to a few ``1e-7``
(chapter 3 explains its layout), where a linear 8-bit grid would round everything below ``absmax / 255`` to 0.

Storage per element: 8 bits + 32/256 bits of ``absmax`` = 8.125 bits, against 32 for float32 (2.03
bytes instead of 4 per state, :func:`qlora_edu.ch05_optimizers.optim.state_bytes_per_param`).

**Matching bitsandbytes on the CPU, byte for byte** (0.50.2, ``quantize_blockwise`` and the CPU
8-bit optimizer, which calls it to re-quantize both states after every update):

* the scaling multiplies by the float32 reciprocal ``1 / absmax`` in every block, the partial last block
  included (the 4-bit CPU kernel divides in its last block; this one does not);
* the rounding is the CPU grid snap of chapter 3: ``g = uint16((scaled + 1) * 0.5 * 65535 + 0.5)`` in
  float32, then the code of grid point ``g`` from :func:`qlora_edu.ch03_double_quant.double_quant.grid_lookup_table`.
  The
  grid covers ``[-1, 1]`` for both maps, so the unsigned map only uses its upper half (32,768 points);
* an all-zero block has ``absmax = 0`` and ``0 * (1/0) = NaN``, which lands on grid point 0: code 0,
  which is ``-0.99297`` in the signed map and ``0.0`` in the unsigned one. Both read back as 0 because
  they are multiplied by ``absmax = 0`` (the signed one as ``-0.0``).

The CUDA kernels of bitsandbytes round to the exactly nearest code instead (no grid), so on a GPU this
module reproduces the CPU bytes, not the CUDA ones.

Shapes: ``x`` of any shape with ``n`` elements -> ``codes`` uint8 of the same shape and ``absmax`` float32
of shape ``(ceil(n / blocksize),)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_edu.ch03_double_quant.double_quant import GRID_POINTS, grid_lookup_table
from qlora_edu.ch05_optimizers.guards import (
    check_dequantize_blockwise_8bit_args,
    check_quantize_blockwise_8bit_args,
)
from qlora_edu.common.guards import n_blocks

__all__ = ["STATE_BLOCKSIZE", "quantize_blockwise_8bit", "dequantize_blockwise_8bit"]

#: Block size of bitsandbytes' 8-bit optimizers (since 0.44; it was 2048 before).
STATE_BLOCKSIZE = 256


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = STATE_BLOCKSIZE, *,
                            lookup: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` blockwise to 8-bit indices into ``code``, as bitsandbytes' CPU kernel does.

    Args:
        x: finite float tensor of any shape (converted to float32), e.g. one of Adam's states. With an
            unsigned ``code`` (all entries >= 0) every element must be >= 0.
        code: the 256 sorted float32 values of the 8-bit map, in ``[-1, 1]``: ``dynamic_map(True)`` for
            Adam's first moment, ``dynamic_map(False)`` for the second.
        blocksize: elements per block (power of two, 64..4096; the optimizers use 256).
        lookup: optional ``grid_lookup_table(code)`` computed once by the caller (the optimizer does, to
            avoid rebuilding the 65,536-entry table for every tensor at every step).

    Returns:
        ``(codes, absmax)``: uint8 of ``x``'s shape, float32 of shape ``(ceil(n / blocksize),)``.
    """
    check_quantize_blockwise_8bit_args(x, code, blocksize, lookup)
    if lookup is None:
        lookup = grid_lookup_table(code.to(x.device))
    # BEGIN SOLUTION
    # Hint: blocks of `blocksize` consecutive values of x.flatten() (the last one padded); each block's absmax;
    # Hint: each value scaled into [-1, 1] by the reciprocal of its block's absmax; then chapter 3's rounding:
    # Hint: snap to the grid in float32 and read the code from `lookup` (an all-zero block gives NaN: grid point
    # Hint: 0). The codes come back as uint8 in x's shape.
    flat = x.detach().flatten().float()
    n = flat.numel()
    blocks = F.pad(flat, (0, n_blocks(n, blocksize) * blocksize - n)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * (1 / absmax)[:, None]  # an all-zero block gives 0 * inf = NaN
    grid = ((scaled + 1) * 0.5 * (GRID_POINTS - 1) + 0.5).nan_to_num_(0.0).clamp_(0, GRID_POINTS - 1)
    codes = lookup.to(x.device)[grid.to(torch.int64)].flatten()[:n].to(torch.uint8).view(x.shape)
    # END SOLUTION
    return codes, absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = STATE_BLOCKSIZE, shape: tuple[int, ...] | torch.Size | None = None
                              ) -> torch.Tensor:
    """Reverse :func:`quantize_blockwise_8bit`: ``code[codes] * absmax[i // blocksize]`` in float32.

    Args:
        codes: uint8 tensor of ``n`` indices into ``code`` (any shape, read row-major).
        absmax: float32 tensor of shape ``(ceil(n / blocksize),)``.
        code: the 256-entry map the codes index (the one used to quantize).
        blocksize: the block size used to quantize.
        shape: shape of the result (``n`` elements); ``codes.shape`` when None.

    Returns:
        float32 tensor of ``shape``: each element within half a step of the map times its block's
        ``absmax`` (plus one grid cell, 2/65535, from the grid snap) of the value that was quantized.
    """
    check_dequantize_blockwise_8bit_args(codes, absmax, code, blocksize, shape)
    shape = codes.shape if shape is None else torch.Size(shape)
    n = codes.numel()
    # BEGIN SOLUTION
    # Hint: the way back: each code's value in the map `code`, times the absmax of its block; then `shape`.
    values = code.to(codes.device)[codes.flatten().long()]
    blocks = F.pad(values, (0, n_blocks(n, blocksize) * blocksize - n)).view(-1, blocksize)
    x = (blocks * absmax[:, None]).flatten()[:n].view(shape)
    # END SOLUTION
    return x
