"""Chapter 2: the 4-bit code tables (NF4, FP4 and a uniform Int4 for comparison).

A 4-bit *code table* is 16 float32 values in ``[-1, 1]`` (Int4 below adds one unused value outside). A
weight is stored as the 4-bit index of the table entry nearest to ``weight / absmax`` of its block, and
read back as ``table[index] * absmax`` (:mod:`qlora_edu.ch02_nf4.quant4bit`). The three tables differ only in
*where* they put their 16 levels.

**NF4 (NormalFloat4)**, the QLoRA data type. Pretrained weights are roughly normal, so NF4 puts its
levels at quantiles of the standard normal distribution N(0, 1): dense near 0 where most weights are,
sparse in the tails. It has 8 positive levels, 7 negative levels and an exact 0 (16 in all), ends
exactly at -1 and +1, and 0.0 is index 7. bitsandbytes builds it in ``create_normal_map``:

1. ``p+ = linspace(offset, 0.5, 9)`` in float32 (9 probabilities from ``offset = 0.9677083`` down to
   0.5); the normal quantiles ``Phi^-1(p+)`` are 8 positive values and a 0 (at p = 0.5), which is dropped;
2. ``p- = linspace(offset, 0.5, 8)``; ``-Phi^-1(p-)`` minus its 0 are 7 negative values;
3. add one exact 0.0, round to float32, sort, divide by the largest value so the table ends at +-1.

(``Phi^-1(0.9677083) = 1.848``, so both ends of the table sit at 1.848 standard deviations before the
division.) The probabilities must be made in float32 (as ``torch.linspace`` does) and the quantiles in
float64; then the table is bit-identical to bitsandbytes'. Computing everything in float64 moves entries
by up to ~1.1e-7, which changes the bytes of values that fall near a midpoint.

Two remarks for the course:

* The paper's equation for the levels, averages of adjacent quantiles ``q_i = (Q(i/17) + Q((i+1)/17)) / 2``
  (its eq. 4), is *not* what the released code computes: the code evaluates quantiles at evenly spaced
  probabilities directly, as above. The paper's Appendix E, though, prints the code's exact 16 values (the
  table :func:`nf4_code` returns). We follow the code and the appendix, because the code made the checkpoints.
* The table gives every code an equal share only of the normal it assumes, N(0, 1/Phi^-1(offset)^2), std
  0.541; absmax-normalised blocks of 64 are narrower (std ~0.39), so the inner codes are used more often
  (chapter 2 measures it; Yoshida 2023, arXiv 2306.06965, shows why: after absmax normalisation the
  distribution depends on the block size).
* Why ``offset = 0.9677083``? The authors never documented it (bitsandbytes issue #440 asks). Some offset
  below 1 is needed because ``Phi^-1(1) = inf``. This one equals ``1 - (1/30 + 1/32) / 2``, the mean of
  ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``, the centres of the last bin when ``[0, 1]`` is cut into 15 or 16
  equal bins: a plausible reading, not a documented one.

**FP4** (bitsandbytes' other 4-bit type, and the *default* ``quant_type`` of ``quantize_4bit``,
``Linear4bit`` and transformers' ``BitsAndBytesConfig``: QLoRA must ask for ``"nf4"``) is a tiny float:
bit 3 is the sign, bits 2-1 an exponent field ``e``, bit 0 a mantissa bit ``m``. Before the final
division by 12 the magnitudes are ``(1 + m/2) * 2**(4 - e)`` for ``e = 1, 2, 3`` (8, 12 / 4, 6 / 2, 3;
the exponent field counts *down*) and ``m * 0.0625`` for ``e = 0`` (0 and a subnormal 0.0625). The table
is indexed by bit pattern, not sorted, and has two zeros (codes 0 and 8; bitsandbytes stores +0.0 in
both). Only 15 distinct values, and they are spaced like a float: fine near 0, coarse near 1.

**Int4** (for comparison at equal bits): the uniform grid of chapter 1. ``int4_code()[k + 8] = k / 7``
for ``k = -8..7``: the 15 levels ``-1, -6/7, ..., 6/7, 1`` with an exact 0 at index 8, plus index 0
(``-8/7``) which lies outside ``[-1, 1]`` and is never chosen, exactly as chapter 1's 4-bit absmax
quantizer uses the integers ``-7..7`` and leaves ``-8`` unused to stay symmetric. Quantizing with this
table and ``quantize_4bit`` gives chapter 1's codes shifted by 8, except for values on (or within
float32 rounding of) a midpoint: chapter 1 divides by ``absmax / 7`` and rounds half to even, the 4-bit
quantizer multiplies by ``1 / absmax`` and sends a tie to the lower level.

Shapes: every function returns a new float32 tensor of shape ``(16,)``.
"""

from __future__ import annotations

import torch

__all__ = ["nf4_code", "fp4_code", "int4_code", "NF4_OFFSET"]

#: The outermost probability of the NF4 construction (see the module docstring).
NF4_OFFSET = 0.9677083


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels, computed from normal quantiles; bit-identical to bitsandbytes' table.

    Returns:
        float32 tensor of shape ``(16,)``, sorted, ``[-1.0, -0.6962, ..., 0.0 (index 7), ..., 0.7230, 1.0]``.
    """
    # BEGIN SOLUTION
    # Hint: probabilities in float32: torch.linspace(NF4_OFFSET, 0.5, 9)[:-1] (8 positive) and
    # Hint: torch.linspace(NF4_OFFSET, 0.5, 8)[:-1] (7 negative); quantiles in float64 with
    # Hint: torch.special.ndtri(p.double()); add one 0.0, round to float32, sort, divide by the max.
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]  # drops p = 0.5 (quantile 0)
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]
    positive = torch.special.ndtri(p_pos.double())
    negative = -torch.special.ndtri(p_neg.double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    code = values / values.max()
    # END SOLUTION
    return code


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 table, indexed by bit pattern (sign bit 3, exponent bits 2-1, mantissa bit 0).

    Returns:
        float32 tensor of shape ``(16,)`` (not sorted): codes 0..7 are
        ``0, 0.0625, 8, 12, 4, 6, 2, 3`` divided by 12, codes 8..15 the same negated, code 8 is +0.0.
    """
    # Magnitudes by the 3 low bits, before the division by 12:
    #   0b000 -> 0        e=0, m=0  (zero)
    #   0b001 -> 0.0625   e=0, m=1  (subnormal: m * 2**-4)
    #   0b010 -> 8        e=1, m=0  (1 + 0/2) * 2**3
    #   0b011 -> 12       e=1, m=1  (1 + 1/2) * 2**3
    #   0b100 -> 4        e=2, m=0  (1 + 0/2) * 2**2
    #   0b101 -> 6        e=2, m=1  (1 + 1/2) * 2**2
    #   0b110 -> 2        e=3, m=0  (1 + 0/2) * 2**1
    #   0b111 -> 3        e=3, m=1  (1 + 1/2) * 2**1
    magnitude = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=torch.float32)
    code = torch.cat([magnitude, -magnitude]) / 12.0  # bit 3 set: negative
    code[8] = 0.0  # "-0": bitsandbytes stores +0.0 here, not -0.0
    return code


def int4_code() -> torch.Tensor:
    """The uniform 4-bit table of chapter 1: ``k / 7`` at index ``k + 8`` for ``k = -8..7``.

    Returns:
        float32 tensor of shape ``(16,)``, sorted; index 0 (``-8/7``) is outside ``[-1, 1]`` and never
        chosen, so 15 levels are used, with 0.0 exactly at index 8.
    """
    return torch.arange(-8, 8, dtype=torch.float32) / 7.0
