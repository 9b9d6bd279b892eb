"""Chapter 3: double quantization, quantizing the quantization constants.

NF4 at blocksize 64 stores one float32 ``absmax`` per 64 weights: 32/64 = 0.5 extra bits per
parameter on top of the 4. Double quantization (QLoRA, section 3) stores those constants in 8 bits:

1. ``offset = absmax.mean()`` (float32). The constants are all positive; centring them makes the
   values symmetric around 0, so a signed 8-bit code uses both halves of its range.
2. ``absmax - offset`` is cut into blocks of ``blocksize = 256`` constants; each block gets its own
   float32 ``absmax2 = max |absmax - offset|`` and every constant becomes the 8-bit index of the nearest
   entry of the signed *dynamic map* (below) to ``(absmax - offset) / absmax2``.
3. Reading back: ``absmax ~ dynamic_map[code] * absmax2[i // 256] + offset``, in float32 (two roundings:
   the product, then the sum).

Storage per parameter: 8/64 bits for the codes + 32/(64*256) bits for ``absmax2``: 0.127 instead of 0.5
(total 4.127 bits/param instead of 4.5; see :mod:`qlora_edu.ch03_double_quant.storage`).

**The dynamic map** (``create_dynamic_map`` in bitsandbytes, from Dettmers' 8-bit optimizers) is an 8-bit
float-like code built for values spread over many orders of magnitude. Read a signed code as bits::

    s | 0 0 ... 0 | 1 | f f ... f
    sign  E zeros   indicator   6 - E fraction bits

* the number ``E`` (0..6) of zeros after the sign bit is a *decimal* exponent: the magnitude is ``10**-E``
  times a fraction;
* the first 1 is the *indicator bit* that ends the exponent;
* the remaining ``6 - E`` bits are a *linear* fraction: the ``2**(6-E)`` midpoints of equal slices of
  ``[0.1, 1]``. Large magnitudes (E = 0) get 64 fine levels between 0.1 and 1, tiny ones (E = 6) a single
  level, ``0.55e-6``.

That is 127 magnitudes a sign (64 + 32 + ... + 1). The two leftover patterns (all 7 bits zero, with either
sign) encode 0 and 1.0. Sorted, the 256 values run from -0.99297 (not -1: there is no negative 1.0) to
1.0, and 0.0 is index 127. The unsigned map (for non-negative values, e.g. Adam's second moment) spends
the sign bit on the fraction instead: ``7 - E`` fraction bits, ``2**(7-E)`` levels for ``E = 0..6``,
plus 0 and 1.0, from 0 to 1.

**Rounding on the CPU.** Since bitsandbytes 0.50.0 its CPU kernel does not look for the exactly nearest
code: it first snaps each scaled value ``v`` in ``[-1, 1]`` to one of 65536 grid points,
``g = uint16((v + 1) * 0.5 * 65535 + 0.5)`` (float32 arithmetic, truncation), and takes the code of grid
point ``g`` (the code nearest to ``g * 2/65535 - 1``) from a lookup table. Near a boundary between two
codes the grid point can fall on the other side, so about 0.2% of the codes differ from exact nearest
rounding (the CUDA kernel's). ``rounding="grid"`` reproduces the CPU bytes; ``rounding="nearest"`` is the
exact nearest code (a value exactly between two codes goes to the lower one), and
:func:`rounding_mismatch_rate` measures how often the two disagree. Near 0 the map's codes are closer
together than a grid cell (2/65535 = 3e-5): no grid point lies at 0, so the 7 codes with ``|v| < 1e-5``,
0.0 included, never come out of the grid path (:func:`grid_lookup_table`), and there the two roundings
can be several codes apart, though never more than a grid cell apart in value.

Shapes: ``absmax`` of ``m`` constants -> ``codes`` uint8 ``(m,)``, ``offset`` float32 0-d,
``absmax2`` float32 ``(ceil(m / blocksize),)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qlora_edu.ch03_double_quant.guards import (
    ROUNDINGS,
    check_double_dequantize_args,
    check_double_quantize_args,
    check_dynamic_map_args,
    check_grid_lookup_table_args,
    check_rounding_mismatch_rate_args,
)
from qlora_edu.common.guards import n_blocks

__all__ = ["dynamic_map", "grid_lookup_table", "double_quantize", "double_dequantize", "rounding_mismatch_rate",
           "ROUNDINGS", "GRID_POINTS"]
#: Number of points of bitsandbytes' CPU rounding grid over [-1, 1].
GRID_POINTS = 65536


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic map: 256 sorted float32 values, equal to bitsandbytes' ``create_dynamic_map``.

    Args:
        signed: True for the signed map in ``[-0.99297, 1]`` (double quantization, Adam's first moment);
            False for the unsigned map in ``[0, 1]``.

    Returns:
        float32 tensor of shape ``(256,)``, sorted ascending.
    """
    check_dynamic_map_args(signed)
    # BEGIN SOLUTION
    # Hint: for each fraction width i = 0..6 (decimal exponent E = 6 - i): count = 2**i (signed) or
    # Hint: 2**(i+1) (unsigned) midpoints of torch.linspace(0.1, 1, count + 1) (float32), times
    # Hint: 10.0 ** (i - 6); the signed map adds their negatives; then add 0.0 and 1.0 and sort.
    magnitudes = []
    for fraction_bits in range(7):  # builds a 7-row table: no loop over data
        count = 2 ** fraction_bits if signed else 2 ** (fraction_bits + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        magnitudes.append(midpoints * 10.0 ** (fraction_bits - 6))
    magnitudes = torch.cat(magnitudes)
    parts = [magnitudes, -magnitudes] if signed else [magnitudes]
    values = torch.cat([*parts, torch.tensor([0.0, 1.0])])
    table = values.sort().values
    # END SOLUTION
    return table


def grid_lookup_table(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU rounding table: for each of the 65536 grid points ``g``, the index of the entry
    of ``code`` (sorted, float32) nearest to the grid value ``g * 2/65535 - 1`` (a tie goes to the lower).

    Returns:
        int32 tensor of shape ``(65536,)``, on ``code``'s device. For the signed dynamic map only 249 of the 256
        codes occur: no grid point lies at 0 (the points nearest it are +-1/65535), so the 7 codes with ``|v| < 1e-5``,
        0.0 included, are never chosen.
    """
    check_grid_lookup_table_args(code)
    # BEGIN SOLUTION
    # Hint: grid values = torch.arange(65536, dtype=torch.float32, device=code.device) * (2 / 65535) - 1, then
    # Hint: torch.bucketize on the midpoints of neighbouring codes (right=False: ties go down), int32.
    midpoints = (code[:-1] + code[1:]) / 2
    grid_values = torch.arange(GRID_POINTS, dtype=torch.float32, device=code.device) * (2 / (GRID_POINTS - 1)) - 1
    table = torch.bucketize(grid_values, midpoints, out_int32=True)
    # END SOLUTION
    return table


def double_quantize(absmax: torch.Tensor, blocksize: int = 256,
                    rounding: str = "grid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the first-level constants ``absmax`` to 8 bits (QLoRA's double quantization).

    Args:
        absmax: float tensor of ``m`` non-negative first-level constants (any shape, taken flat; converted to
            float32). Everything is computed on its device.
        blocksize: constants per second-level block (power of two, 32..4096; bitsandbytes uses 256).
        rounding: ``"grid"`` reproduces bitsandbytes' CPU bytes (65536-point grid snap); ``"nearest"``
            picks the exactly nearest code (ties to the lower one).

    Returns:
        ``(codes, offset, absmax2)``: uint8 ``(m,)`` indices into ``dynamic_map(True)``, the float32 0-d
        ``offset = absmax.mean()``, float32 ``(ceil(m / blocksize),)`` second-level constants. A block
        whose constants all equal the offset (absmax2 = 0) gets code 0 with ``"grid"`` (bitsandbytes'
        CPU kernel computes 0 * (1/0) = NaN, which lands on grid point 0) and the code of 0.0 (127) with
        ``"nearest"``; both read back as ``offset``.
    """
    check_double_quantize_args(absmax, blocksize, rounding)
    # BEGIN SOLUTION
    # Hint: offset = absmax.float().mean(); centre, pad with zeros to whole blocks, view (-1, blocksize);
    # Hint: absmax2 = row max of |.|; scaled = centred * (1 / absmax2)[:, None] (a reciprocal, like
    # Hint: bitsandbytes); "nearest": torch.bucketize on the dynamic map's midpoints, after turning the NaN of
    # Hint: a constant block (0 * (1/0)) into 0.0 (code 127); "grid": see the notes above this exercise
    # Hint: (float32 steps, truncate, NaN -> grid point 0, then grid_lookup_table).
    # Hint: End with `codes` (uint8, one per constant), `offset` and `absmax2`.
    flat = absmax.detach().flatten().float()
    m = flat.numel()
    offset = flat.mean()
    centred = flat - offset
    blocks = F.pad(centred, (0, n_blocks(m, blocksize) * blocksize - m)).view(-1, blocksize)
    absmax2 = blocks.abs().amax(dim=1)
    scaled = blocks * (1 / absmax2)[:, None]  # an all-zero block gives 0 * inf = NaN
    if rounding == "grid":
        # Snap to the 65536-point grid in float32 steps, as the C++ kernel does; NaN goes to grid point 0.
        grid = ((scaled + 1) * 0.5 * (GRID_POINTS - 1) + 0.5).nan_to_num_(0.0).clamp_(0, GRID_POINTS - 1)
        codes = grid_lookup_table(dynamic_map(True).to(flat.device))[grid.to(torch.int64)]
    else:
        code = dynamic_map(True).to(flat.device)
        midpoints = (code[:-1] + code[1:]) / 2
        codes = torch.bucketize(scaled.nan_to_num_(0.0), midpoints, out_int32=True)
    codes = codes.flatten()[:m].to(torch.uint8)
    # END SOLUTION
    return codes, offset, absmax2


def double_dequantize(codes: torch.Tensor, offset: torch.Tensor | float, absmax2: torch.Tensor,
                      blocksize: int = 256) -> torch.Tensor:
    """Reverse :func:`double_quantize`: ``dynamic_map(True)[codes] * absmax2[i // blocksize] + offset``.

    Args:
        codes: uint8 tensor of ``m`` codes (any shape, taken flat).
        offset: the float32 mean subtracted before quantizing (0-d tensor or Python float).
        absmax2: float32 tensor of shape ``(ceil(m / blocksize),)``.
        blocksize: the second-level block size used to quantize.

    Returns:
        float32 tensor of shape ``(m,)``: the first-level constants, to within half a step of the dynamic
        map times ``absmax2`` (the widest step is 0.9/64, in the top decade: at most 0.7% of ``absmax2``),
        plus one grid cell (2/65535) with ``rounding="grid"``.
    """
    offset = check_double_dequantize_args(codes, offset, absmax2, blocksize)  # as a float32 0-d tensor
    m = codes.numel()
    # BEGIN SOLUTION
    # Hint: look the codes up in dynamic_map(True) (index with codes.long()), pad to whole blocks,
    # Hint: multiply each row by its absmax2, flatten, keep m values, then add the offset (two float32 steps).
    values = dynamic_map(True).to(codes.device)[codes.flatten().long()]
    blocks = F.pad(values, (0, n_blocks(m, blocksize) * blocksize - m)).view(-1, blocksize)
    absmax = (blocks * absmax2[:, None]).flatten()[:m] + offset
    # END SOLUTION
    return absmax


def rounding_mismatch_rate(absmax: torch.Tensor, blocksize: int = 256) -> float:
    """Fraction of constants whose 8-bit code differs between ``rounding="grid"`` and ``"nearest"``.

    On the constants of Gaussian weight matrices it is about 0.18% (0.22% on SmolLM2's; measured in
    chapter 3): the CPU grid snap is a tiny, rare rounding error, but it is the difference between
    matching bitsandbytes' bytes and not.
    """
    check_rounding_mismatch_rate_args(absmax, blocksize)
    grid, _, _ = double_quantize(absmax, blocksize, rounding="grid")
    nearest, _, _ = double_quantize(absmax, blocksize, rounding="nearest")
    return float((grid != nearest).float().mean())
