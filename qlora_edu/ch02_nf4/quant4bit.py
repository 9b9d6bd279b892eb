"""Chapter 2: blockwise 4-bit quantization with a code table (NF4, FP4, Int4), byte for byte as bitsandbytes.

The tensor is flattened row-major and cut into blocks of ``blocksize`` consecutive elements (blocks cross
row ends; the last block may be shorter). For each block ``b``:

    absmax_b = max_i |x_i|                      (float32; the block's quantization constant)
    v_i      = clamp(x_i / absmax_b, -1, 1)     (in [-1, 1], the range of the code table)
    q_i      = index of the table entry nearest to v_i      (4 bits)

and two codes are packed per byte, first element in the high nibble (:mod:`qlora_edu.ch02_nf4.packing`). Reading
back is one lookup and one multiply, ``x_i ~ code[q_i] * absmax_b``, in float32, then rounded (to nearest
even) to the output dtype.

Details that decide bytes (bitsandbytes 0.50.2 on CPU; we reproduce them exactly):

* the input is converted to float32 first; ``absmax`` is float32, one per block, ``(ceil(n / blocksize),)``;
* full blocks are scaled by a reciprocal, ``x * (1 / absmax)``, the last partial block by a division,
  ``x / absmax`` (the two can differ in the last bit, which can flip a code);
* the divisor is ``max(absmax, 1e-38)``: an all-zero full block stores absmax 0 and its elements get the
  code of 0.0; the last partial block even *stores* the clamped value (``1e-38`` for an all-zero tail);
* "nearest" means: compare with the float32 midpoints between neighbouring (sorted) table entries; a value
  exactly on a midpoint goes to the **lower** entry (``torch.bucketize`` with ``right=False``). FP4's
  table is not sorted, so the sorted position is mapped back to FP4's bit pattern; FP4's two zeros are
  sorted code 0 first, so values in ``(-0.0026, 0]`` get code 0 and values in ``(0, 0.0026]`` code 8;
* an odd number of elements is padded with the code of 0.0 (NF4: 7) in the last low nibble;
* ``packed`` has shape ``(ceil(n / 2), 1)``, uint8, as bitsandbytes returns it.

The two functions here are the lesson: one vectorized pass over the whole tensor each, on whatever device the
tensor lives (CPU or CUDA; the code table is moved there). :mod:`qlora_edu.ch02_nf4.fast4bit` runs the same computation
faster, per device, and :mod:`qlora_edu.ch03_double_quant.nf4_tensor` stores a weight the way QLoRA does (NF4 plus
double
quantization) with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qlora_edu.ch02_nf4.guards import (
    check_dequantize_4bit_args,
    check_finite_absmax,
    check_quantize_4bit_args,
)
from qlora_edu.ch02_nf4.packing import pack_4bit, unpack_4bit

__all__ = ["quantize_4bit", "dequantize_4bit", "MIN_ABSMAX"]

#: bitsandbytes' guard against dividing by a zero absmax (a float32 subnormal, ~1e-38).
MIN_ABSMAX = 1e-38


def quantize_4bit(x: torch.Tensor, code: torch.Tensor,
                  blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of ``x`` to 4-bit indices into ``code``, packed two to a byte.

    Equal, byte for byte, to ``bitsandbytes.functional.quantize_4bit(x, blocksize=blocksize,
    quant_type="nf4" | "fp4", compress_statistics=False)`` on CPU with ``code = nf4_code()`` or
    ``fp4_code()``.

    Args:
        x: float tensor (fp32, fp16, bf16; fp64 is rounded to fp32 first), any shape, finite.
        code: float32 table of 16 values containing 0.0 (``nf4_code()``, ``fp4_code()``, ``int4_code()``).
        blocksize: elements per block, a power of two in 32..4096.

    Returns:
        ``(packed, absmax)``: uint8 ``(ceil(n / 2), 1)`` and float32 ``(ceil(n / blocksize),)``.
    """
    check_quantize_4bit_args(x, code, blocksize)
    # BEGIN SOLUTION
    # Hint: flat = x as a flat float32 tensor; full blocks: view flat[:full] as (n_full, blocksize),
    # Hint: absmax = row max of |x| (stored as is: 0 for an all-zero block), scaled = blocks * (1 /
    # Hint: absmax.clamp(min=MIN_ABSMAX))[:, None]; the partial tail: absmax = max(its max |x|, MIN_ABSMAX)
    # Hint: (here the clamped value IS stored: 1e-38 for an all-zero tail), scaled = tail / absmax. Clamp scaled to
    # Hint: [-1, 1]. Nearest code: sort the table (stable), midpoints = (sorted[:-1] + sorted[1:]) / 2,
    # Hint: torch.bucketize(scaled, midpoints) (ties go to the lower entry), mapped back through the sort
    # Hint: order. Pack with pack_4bit, padding an odd count with the code of 0.0.
    # Hint: End with `packed` (uint8, ceil(n / 2) bytes) and `absmax` (float32): the lines below use them.
    flat = x.detach().reshape(-1).float()  # bf16/fp16 convert exactly; fp64 is rounded, as bitsandbytes does
    code = code.to(flat.device)  # everything below runs where x lives, CPU or CUDA
    n = flat.numel()
    n_full = n // blocksize
    full = n_full * blocksize
    absmax = flat.new_empty(math.ceil(n / blocksize))
    scaled = torch.empty_like(flat)

    blocks = flat[:full].view(n_full, blocksize)  # the full blocks: scaled by the reciprocal of absmax
    absmax[:n_full] = blocks.abs().amax(dim=1)
    reciprocal = 1 / absmax[:n_full].clamp(min=MIN_ABSMAX)
    scaled[:full] = (blocks * reciprocal[:, None]).flatten()
    if full < n:  # the last, partial block: divided by its absmax, and the clamped value is what is stored
        absmax[-1] = flat[full:].abs().max().clamp(min=MIN_ABSMAX)
        scaled[full:] = flat[full:] / absmax[-1]
    scaled.clamp_(-1, 1)

    # The nearest table entry: sort the table, find the midpoint interval, map back to the table's index.
    sorted_code, order = code.sort(stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    codes = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    zero_code = int(order[torch.bucketize(flat.new_zeros(()), midpoints)])  # the code of 0.0 pads an odd count
    packed = pack_4bit(codes, pad=zero_code)
    # END SOLUTION
    check_finite_absmax(x, absmax)  # a NaN or inf anywhere in x makes its block's absmax NaN or inf
    return packed.view(-1, 1), absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: Sequence[int],
                    blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reverse :func:`quantize_4bit`: ``code[q] * absmax`` in float32, rounded to ``dtype``, in ``shape``.

    Equal to ``bitsandbytes.functional.dequantize_4bit`` where that is correct (see the course notes:
    bitsandbytes 0.50.2 on the AVX512 CPUs we ran it on gets multi-row shapes whose last dimension is a
    multiple of 16 but not of the blocksize, with a block crossing a row end, wrong); a 1-D shape comes back
    1-D (bitsandbytes returns ``(1, n)``).

    Args:
        packed: uint8 tensor of ``ceil(n / 2)`` bytes (any shape, e.g. ``(ceil(n/2), 1)``).
        absmax: float32 tensor of shape ``(ceil(n / blocksize),)``, on ``packed``'s device.
        code: the float32 table of 16 values used to quantize.
        shape: the original shape (``n`` = product of its dimensions).
        blocksize: the block size used to quantize (power of two, 32..4096).
        dtype: output dtype: float32, float16, bfloat16 (or float64).

    Returns:
        tensor of ``shape`` and ``dtype``.
    """
    shape = check_dequantize_4bit_args(packed, absmax, code, shape, blocksize, dtype)
    n = math.prod(shape)
    # BEGIN SOLUTION
    # Hint: unpack the n codes (unpack_4bit), look up their values (code[q.long()]), multiply each by its
    # Hint: block's absmax (absmax.repeat_interleave(blocksize)[:n] lines them up) in float32, cast to dtype.
    # Hint: End with `out`, the n values in `dtype` (flat is fine): the line below reshapes it.
    code = code.to(packed.device)
    q = unpack_4bit(packed, n).long()
    scale = absmax.detach().repeat_interleave(blocksize)[:n]  # element i belongs to block i // blocksize
    out = (code[q] * scale).to(dtype)  # the float32 product, rounded once to dtype
    # END SOLUTION
    return out.view(shape)
