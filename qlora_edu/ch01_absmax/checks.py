"""Battery for chapter 1: ``absmax_quantize`` and ``absmax_dequantize``.

Expected values come from the seed notes' worked example, the error bound ``|x - deq| <= scale / 2``
and an independent NumPy float64 reference, never from ``qlora_edu`` itself.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlora_edu
from qlora_edu.checks import (
    CheckFailure,
    case,
    expect_close,
    expect_equal,
    expect_raises,
    expect_true,
    mistake,
    property_settings,
)

FAST = property_settings(40)


def reference_scales(x: torch.Tensor, bits: int, blocksize: int) -> np.ndarray:
    """Block absmax / qmax in float64 with NumPy: an implementation independent of the one under test."""
    flat = x.detach().float().numpy().astype(np.float64).ravel()
    pad = (-flat.size) % blocksize
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, blocksize)
    return np.abs(blocks).max(axis=1) / (2 ** (bits - 1) - 1)


@case("absmax_quantize", "absmax_dequantize",
      hint="scale = absmax / 7 for 4 bits; codes = round(x / scale); dequantize = codes * scale")
def seed_worked_example(impl):
    """The block [0.1, 2.5, -1.5] from the seed notes: constant 2.5/7, codes [0, 7, -4]."""
    x = torch.tensor([0.1, 2.5, -1.5])
    codes, scales = impl.absmax_quantize(x, bits=4, blocksize=3)
    expect_equal("codes of [0.1, 2.5, -1.5]", codes, torch.tensor([0, 7, -4], dtype=torch.int8))
    expect_close("the constant 2.5 / 7", scales, torch.tensor([2.5 / 7]), atol=0, rtol=1e-6)
    deq = impl.absmax_dequantize(codes, scales, blocksize=3)
    expect_close("dequantized [0, 2.5, -1.43]", deq, torch.tensor([0.0, 2.5, -4 * 2.5 / 7]), atol=1e-6)


@mistake("absmax_quantize", caught_by=seed_worked_example)
def absmax_quantize_divides_by_8(x, bits=4, blocksize=64):
    """scale = absmax / 8 (the 16 levels of -8..7) with codes rounded against absmax / 7: inconsistent."""
    codes, scales = qlora_edu.absmax_quantize(x, bits=bits, blocksize=blocksize)
    return codes, scales * (2 ** (bits - 1) - 1) / 2 ** (bits - 1)


@case("absmax_quantize", hint="one scale for the whole block: the outlier sets it, the small values round to 0")
def outlier_zeroes_its_block(impl):
    """63 weights of 0.1 and one of 100.0 in a block of 64: the small ones all become code 0."""
    x = torch.full((64,), 0.1)
    x[17] = 100.0
    codes, scales = impl.absmax_quantize(x, bits=4, blocksize=64)
    expect_close("the block's constant 100 / 7", scales, torch.tensor([100 / 7]), atol=0, rtol=1e-6)
    expected = torch.zeros(64, dtype=torch.int8)
    expected[17] = 7
    expect_equal("codes of 63 x 0.1 and one 100.0", codes, expected)


@case("absmax_quantize", hint="pad the last block with zeros (or handle it separately); never drop elements")
def shapes_dtypes_and_partial_blocks(impl):
    """codes int8 with x's shape; scales float32 of shape (ceil(n / blocksize),)."""
    g = torch.Generator().manual_seed(1)
    for shape, blocksize in [((5, 37), 16), ((3, 4, 5), 64), ((10,), 3), ((1,), 64), ((2, 64), 64)]:
        x = torch.randn(shape, generator=g)
        codes, scales = impl.absmax_quantize(x, bits=4, blocksize=blocksize)
        n_blocks = -(-x.numel() // blocksize)
        expect_true(codes.dtype == torch.int8, f"codes dtype for shape {shape}", torch.int8, codes.dtype)
        expect_true(tuple(codes.shape) == shape, "codes must have x's shape", shape, tuple(codes.shape))
        expect_true(scales.dtype == torch.float32, "scales dtype", torch.float32, scales.dtype)
        expect_true(tuple(scales.shape) == (n_blocks,), f"scales shape for {x.numel()} elements at "
                    f"blocksize {blocksize}", (n_blocks,), tuple(scales.shape))
        expect_close(f"scales for shape {shape}, blocksize {blocksize}", scales,
                     torch.from_numpy(reference_scales(x, 4, blocksize)), atol=0, rtol=1e-6,
                     hint="blocks are consecutive elements of x.flatten(), crossing row ends")


@mistake("absmax_quantize", caught_by=shapes_dtypes_and_partial_blocks)
def absmax_quantize_blocks_per_row(x, bits=4, blocksize=64):
    """Blocks restart at every row instead of running over the flattened tensor."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    parts = [qlora_edu.absmax_quantize(r.contiguous(), bits=bits, blocksize=blocksize) for r in rows]
    return torch.cat([c.flatten() for c, _ in parts]).view(x.shape), torch.cat([s for _, s in parts])


@case("absmax_quantize", hint="round(x / scale) with round-half-to-even, then clamp to [-qmax, qmax]")
def codes_are_rounded_ratios(impl):
    """codes == round(x / scale) against a float64 reference, for every bit width 2..8."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 50, generator=g) * 3
    for bits in range(2, 9):
        codes, scales = impl.absmax_quantize(x, bits=bits, blocksize=32)
        qmax = 2 ** (bits - 1) - 1
        expect_true(int(codes.abs().max()) <= qmax, f"codes must lie in [-{qmax}, {qmax}] at {bits} bits",
                    qmax, int(codes.abs().max()))
        scale64 = reference_scales(x, bits, 32)
        ratio = x.numpy().astype(np.float64).ravel() / np.repeat(scale64, 32)[: x.numel()]
        ref = np.clip(np.round(ratio), -qmax, qmax)
        near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-4
        got = codes.numpy().ravel().astype(np.float64)
        bad = (got != ref) & ~near_tie
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CheckFailure(f"code at flat index {i} ({bits} bits): x / scale = {ratio[i]:.4f}",
                               int(ref[i]), int(got[i]))


@mistake("absmax_quantize", caught_by=codes_are_rounded_ratios)
def absmax_quantize_floors(x, bits=4, blocksize=64):
    """torch.floor instead of round: every positive code one step low half the time."""
    codes, scales = qlora_edu.absmax_quantize(x, bits=bits, blocksize=blocksize)
    qmax = 2 ** (bits - 1) - 1
    per = scales.repeat_interleave(blocksize)[: x.numel()]
    safe = torch.where(per == 0, torch.ones_like(per), per)
    return torch.floor(x.flatten().float() / safe).clamp(-qmax, qmax).to(torch.int8).view(x.shape), scales


@case("absmax_quantize", hint="a block of zeros has absmax 0: avoid 0/0 = NaN, its codes are 0")
def all_zero_block(impl):
    """An all-zero block gets scale 0 and codes 0, with no NaN anywhere."""
    x = torch.zeros(3 * 64)
    x[64:128] = torch.linspace(-1, 1, 64)
    codes, scales = impl.absmax_quantize(x, bits=4, blocksize=64)
    expect_equal("scales of [zeros, ramp, zeros]", scales, torch.tensor([0.0, 1 / 7, 0.0]))
    expect_equal("codes of the zero blocks", codes[:64], torch.zeros(64, dtype=torch.int8))
    expect_equal("codes of the zero blocks", codes[128:], torch.zeros(64, dtype=torch.int8))


@mistake("absmax_quantize", caught_by=all_zero_block)
def absmax_quantize_zero_block_fails(x, bits=4, blocksize=64):
    """An all-zero block divides 0 by 0 (here: raises instead of giving codes 0)."""
    codes, scales = qlora_edu.absmax_quantize(x, bits=bits, blocksize=blocksize)
    if bool((scales == 0).any()):
        raise ZeroDivisionError("0 / 0 in an all-zero block")
    return codes, scales


@case("absmax_quantize", "absmax_dequantize",
      hint="rounding to the nearest code can be off by at most half a step, and a step is one scale")
def roundtrip_error_bound(impl):
    """|x - dequantize(quantize(x))| <= scale / 2 for random shapes, bits, block sizes and dtypes."""

    @FAST
    @given(rows=st.integers(1, 6), cols=st.integers(1, 130), bits=st.integers(2, 8),
           blocksize=st.sampled_from([1, 3, 16, 64, 100, 256]),
           dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
    def prop(rows, cols, bits, blocksize, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(rows, cols, generator=g) * 2).to(dtype)
        codes, scales = impl.absmax_quantize(x, bits=bits, blocksize=blocksize)
        deq = impl.absmax_dequantize(codes, scales, blocksize=blocksize)
        expect_true(deq.dtype == torch.float32 and tuple(deq.shape) == (rows, cols),
                    "dequantized tensor must be float32 with the codes' shape",
                    (torch.float32, (rows, cols)), (deq.dtype, tuple(deq.shape)))
        bound = scales.repeat_interleave(blocksize)[: x.numel()].view(rows, cols) / 2
        err = (x.float() - deq).abs()
        bad = err > bound * (1 + 1e-5) + 1e-12
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            raise CheckFailure(f"round-trip error above scale/2 at flat index {i} (shape {(rows, cols)}, "
                               f"{bits} bits, blocksize {blocksize}, {dtype})",
                               f"<= {bound.flatten()[i].item():.6g}", f"{err.flatten()[i].item():.6g}")

    prop()


@case("absmax_dequantize", hint="each element uses the scale of block (flat index // blocksize)")
def dequantize_known_codes(impl):
    """Hand-made codes and scales, blocks crossing a row end: 3 x 4 elements at blocksize 5."""
    codes = torch.tensor([[1, -2, 3, 0], [7, 1, 1, -7], [2, 2, 2, 2]], dtype=torch.int8)
    scales = torch.tensor([0.5, 2.0, 10.0])
    expected = torch.tensor([[0.5, -1.0, 1.5, 0.0], [3.5, 2.0, 2.0, -14.0], [4.0, 4.0, 20.0, 20.0]])
    expect_close("dequantized values", impl.absmax_dequantize(codes, scales, blocksize=5), expected, atol=0)


@mistake("absmax_dequantize", caught_by=dequantize_known_codes)
def absmax_dequantize_tiles_scales(codes, scales, blocksize=64):
    """scales.repeat(blocksize) (the scales tiled) where repeat_interleave (each scale repeated) is meant."""
    n = codes.numel()
    return (codes.flatten().float() * scales.repeat(blocksize)[:n]).view(codes.shape)


@case("absmax_quantize", "absmax_dequantize",
      hint="the validation lines at the top of each function are given: keep them")
def bad_inputs_are_named(impl):
    """Bad arguments raise ValueError/TypeError that names the argument."""
    x = torch.randn(8, 8)
    expect_raises("bits=1", ValueError, lambda: impl.absmax_quantize(x, bits=1), "bits")
    expect_raises("bits=9", ValueError, lambda: impl.absmax_quantize(x, bits=9), "bits")
    expect_raises("blocksize=0", ValueError, lambda: impl.absmax_quantize(x, blocksize=0), "blocksize")
    expect_raises("integer x", TypeError, lambda: impl.absmax_quantize(torch.ones(4, dtype=torch.int32)), "x")
    expect_raises("x with NaN", ValueError, lambda: impl.absmax_quantize(torch.tensor([1.0, float("nan")])), "x")
    expect_raises("x with inf", ValueError, lambda: impl.absmax_quantize(torch.tensor([1.0, float("inf")])), "x")
    expect_raises("a list for x", TypeError, lambda: impl.absmax_quantize([1.0, 2.0]), "x")
    codes = torch.zeros(130, dtype=torch.int8)
    expect_raises("too few scales", ValueError,
                  lambda: impl.absmax_dequantize(codes, torch.ones(2), blocksize=64), "scales")
    expect_raises("float codes", TypeError,
                  lambda: impl.absmax_dequantize(codes.float(), torch.ones(3), blocksize=64), "codes")
