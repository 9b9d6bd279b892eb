"""Mutation tests for the chapter 2 and 3 batteries: plausible learner mistakes must fail ``check``.

Each *mutant* below is a small function with the real name and signature of an exercise function that
makes one mistake a learner could make (most wrap the package's function or re-implement it with one
thing changed). ``check(mutant)`` must return False, print a report naming the first failing case, and
mark the case that was written to catch that mistake as FAIL. Mistakes that turned out to be
equivalent to the right answer (the same outputs on every input) are listed at the end of the module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import qlora_edu
from qlora_edu.checks import check
from qlora_edu.double_quant import check_rounding
from qlora_edu.nf4 import NF4_OFFSET
from qlora_edu.quant4bit import check_blocksize, check_code, check_dequantize_args
from qlora_edu.validation import check_dtype, check_float_tensor, check_power_of_two, n_blocks

MUTANTS: list = []


def mutant(name: str, caught_by: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as a mutant of ``name`` that the case ``caught_by`` must fail."""

    def register(fn: Callable) -> Callable:
        MUTANTS.append(pytest.param(fn, caught_by, id=f"{name}:{fn.__name__.lstrip('_')}"))
        fn.__name__ = name  # check() selects the cases by the function's name
        return fn

    return register


# ======================================================================= chapter 2: nf4_code


def _nf4_from(p_pos: torch.Tensor, p_neg: torch.Tensor, normalise: bool = True,
              divide_in_float64: bool = False) -> torch.Tensor:
    positive = torch.special.ndtri(p_pos.double())
    negative = -torch.special.ndtri(p_neg.double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    if divide_in_float64:
        return (values / values.max()).float()
    values = values.float()
    return values / values.max() if normalise else values


@mutant("nf4_code", caught_by="nf4.nf4_code_bit_identical")
def _nf4_float64_probabilities():
    """The probabilities made in float64 (entries move by ~1e-7)."""
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1]
    return _nf4_from(p_pos, p_neg)


@mutant("nf4_code", caught_by="nf4.nf4_code_bit_identical")
def _nf4_wrong_offset():
    """An offset of 0.99 instead of 0.9677083 (still ends at -1 and 1, 0.0 at index 7)."""
    return _nf4_from(torch.linspace(0.99, 0.5, 9)[:-1], torch.linspace(0.99, 0.5, 8)[:-1])


@mutant("nf4_code", caught_by="nf4.nf4_code_bit_identical")
def _nf4_divided_in_float64():
    """Divided by the largest value in float64, rounded to float32 only at the end."""
    return _nf4_from(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1], torch.linspace(NF4_OFFSET, 0.5, 8)[:-1],
                     divide_in_float64=True)


@mutant("nf4_code", caught_by="nf4.nf4_code_structure")
def _nf4_mirrored():
    """8 negative and 7 positive levels (0.0 lands at index 8)."""
    return -_nf4_from(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1], torch.linspace(NF4_OFFSET, 0.5, 8)[:-1]).flip(0)


@mutant("nf4_code", caught_by="nf4.nf4_code_structure")
def _nf4_not_normalised():
    """Not divided by the largest value: the table ends at +-1.848."""
    return _nf4_from(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1], torch.linspace(NF4_OFFSET, 0.5, 8)[:-1],
                     normalise=False)


# ======================================================================= chapter 2: pack_4bit / unpack_4bit


@mutant("pack_4bit", caught_by="nf4.pack_known_example")
def _pack_first_in_low_nibble(codes, pad=0):
    """The first code of each pair in the low nibble."""
    flat = F.pad(codes.flatten(), (0, codes.numel() % 2), value=pad)
    return flat[0::2] | (flat[1::2] << 4)


@mutant("pack_4bit", caught_by="nf4.pack_known_example")
def _pack_ignores_pad(codes, pad=0):
    """An odd count always padded with 0, whatever ``pad`` says."""
    return qlora_edu.pack_4bit(codes, pad=0)


@mutant("pack_4bit", caught_by="nf4.pack_known_example")
def _pack_no_padding(codes, pad=0):
    """No padding at all: an odd count raises a size mismatch."""
    flat = codes.flatten()
    return (flat[0::2] << 4) | flat[1::2]


@mutant("unpack_4bit", caught_by="nf4.pack_known_example")
def _unpack_nibbles_swapped(packed, numel):
    """The low nibble taken as the first code."""
    flat = packed.flatten()
    return torch.stack([flat & 0x0F, flat >> 4], dim=1).flatten()[:numel]


@mutant("unpack_4bit", caught_by="nf4.pack_known_example")
def _unpack_not_trimmed(packed, numel):
    """The pad nibble of an odd count is kept (2 * bytes codes come back)."""
    flat = packed.flatten()
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).flatten()


@mutant("unpack_4bit", caught_by="nf4.pack_known_example")
def _unpack_no_mask(packed, numel):
    """The second code taken as the whole byte (``& 0x0F`` forgotten)."""
    flat = packed.flatten()
    return torch.stack([flat >> 4, flat], dim=1).flatten()[:numel]


@mutant("unpack_4bit", caught_by="nf4.pack_unpack_round_trip")
def _unpack_returns_int64(packed, numel):
    """The codes come back as int64 (the bytes widened with ``.long()`` first) instead of uint8."""
    flat = packed.flatten().long()
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).flatten()[:numel]


# ======================================================================= chapter 2: quantize_4bit


def _quantize(x, code, blocksize, *, divide_full=False, reciprocal_tail=False, right=False, per_row=False,
              pad_code=None, clamp_absmax=True, map_back=True, store_clamped=True, store_clamped_full=False,
              input_dtype=False, argmin=False, float64_midpoints=False):
    """The reference ``quantize_4bit`` (with its argument checks) and one switch per mistake."""
    check_float_tensor("x", x, finite=False)
    check_code(code)
    check_blocksize(blocksize)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite")
    if per_row and x.dim() > 1:
        parts = [_quantize(row, code, blocksize) for row in x.reshape(-1, x.shape[-1])]
        codes = torch.cat([qlora_edu.unpack_4bit(p, x.shape[-1]) for p, _ in parts])
        zero = int(qlora_edu.unpack_4bit(_quantize(torch.zeros(1), code, 32)[0], 1))
        return qlora_edu.pack_4bit(codes, pad=zero).view(-1, 1), torch.cat([a for _, a in parts])
    flat = x.detach().reshape(-1) if input_dtype else x.detach().reshape(-1).float()
    n = flat.numel()
    n_full = n // blocksize
    full = n_full * blocksize
    absmax = torch.empty(n_blocks(n, blocksize), dtype=torch.float32)
    scaled = torch.empty(n, dtype=flat.dtype)
    low = 1e-38 if clamp_absmax else 0.0
    blocks = flat[:full].view(n_full, blocksize)
    absmax[:n_full] = blocks.abs().amax(dim=1).float()
    if store_clamped_full:
        absmax[:n_full] = absmax[:n_full].clamp(min=low)
    divisor = absmax[:n_full].clamp(min=low).to(flat.dtype)
    scaled[:full] = (blocks / divisor[:, None] if divide_full else blocks * (1 / divisor)[:, None]).flatten()
    if full < n:
        tail_max = flat[full:].abs().max().float()
        absmax[-1] = tail_max.clamp(min=low) if store_clamped else tail_max
        tail_divisor = tail_max.clamp(min=low).to(flat.dtype)
        scaled[full:] = flat[full:] * (1 / tail_divisor) if reciprocal_tail else flat[full:] / tail_divisor
    scaled = scaled.float().clamp(-1, 1)
    sorted_code, order = code.sort(stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    if float64_midpoints:
        exact_midpoints = (sorted_code.double()[:-1] + sorted_code.double()[1:]) / 2
        codes = order[torch.bucketize(scaled.double(), exact_midpoints)].to(torch.uint8)
    elif argmin:
        codes = (scaled[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)
    else:
        position = torch.bucketize(scaled, midpoints, right=right)
        codes = (order[position] if map_back else position).to(torch.uint8)
    zero = int(order[torch.bucketize(torch.zeros(()), midpoints)])
    return qlora_edu.pack_4bit(codes, pad=zero if pad_code is None else pad_code).view(-1, 1), absmax


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_scaling_matches_bitsandbytes")
def _quantize_divides_full_blocks(x, code, blocksize=64):
    """Full blocks divided by absmax instead of multiplied by its reciprocal."""
    return _quantize(x, code, blocksize, divide_full=True)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_scaling_matches_bitsandbytes")
def _quantize_reciprocal_in_tail(x, code, blocksize=64):
    """The last, partial block also multiplied by the reciprocal (what CUDA does, not the CPU)."""
    return _quantize(x, code, blocksize, reciprocal_tail=True)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_ties_go_down")
def _quantize_ties_go_up(x, code, blocksize=64):
    """A value exactly on a midpoint goes to the upper code (``bucketize(..., right=True)``)."""
    return _quantize(x, code, blocksize, right=True)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_matches_bitsandbytes")
def _quantize_blocks_per_row(x, code, blocksize=64):
    """Blocks cut per row instead of over the flattened tensor."""
    return _quantize(x, code, blocksize, per_row=True)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_matches_bitsandbytes")
def _quantize_pads_with_code_0(x, code, blocksize=64):
    """An odd count padded with code 0 instead of the code of 0.0."""
    return _quantize(x, code, blocksize, pad_code=0)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_matches_bitsandbytes")
def _quantize_absmax_not_clamped(x, code, blocksize=64):
    """absmax not clamped to 1e-38: an all-zero block scales to 0 / 0 = NaN."""
    return _quantize(x, code, blocksize, clamp_absmax=False)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_matches_bitsandbytes")
def _quantize_fp4_not_mapped_back(x, code, blocksize=64):
    """The position in the sorted table returned as the code (wrong for FP4, whose table is not sorted)."""
    return _quantize(x, code, blocksize, map_back=False)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_matches_bitsandbytes")
def _quantize_stores_unclamped_tail(x, code, blocksize=64):
    """An all-zero partial last block stores absmax 0 instead of the clamped 1e-38."""
    return _quantize(x, code, blocksize, store_clamped=False)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_matches_bitsandbytes")
def _quantize_stores_clamped_full(x, code, blocksize=64):
    """An all-zero full block stores the clamped 1e-38 instead of 0."""
    return _quantize(x, code, blocksize, store_clamped_full=True)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_ties_go_down")
def _quantize_float64_midpoints(x, code, blocksize=64):
    """Midpoints and the comparison in float64 instead of the float32 midpoints."""
    return _quantize(x, code, blocksize, float64_midpoints=True)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_matches_bitsandbytes")
def _quantize_in_input_dtype(x, code, blocksize=64):
    """Scaled in the input dtype (bf16 / fp16) instead of float32."""
    return _quantize(x, code, blocksize, input_dtype=True)


@mutant("quantize_4bit", caught_by="nf4.quantize_4bit_matches_bitsandbytes")
def _quantize_argmin_distance(x, code, blocksize=64):
    """Nearest code by argmin of |v - code| (FP4's two zeros both become code 0; float32 distances tie)."""
    return _quantize(x, code, blocksize, argmin=True)


# ======================================================================= chapter 2: dequantize_4bit


def _dequantize(packed, absmax, code, shape, blocksize, dtype, *, swap=False, round_twice=False, tile=False):
    """The reference ``dequantize_4bit`` (with its argument checks) and one switch per mistake."""
    shape = check_dequantize_args(packed, absmax, code, shape, blocksize, dtype)
    n = math.prod(shape)
    flat = packed.flatten()
    pairs = [flat & 0x0F, flat >> 4] if swap else [flat >> 4, flat & 0x0F]
    q = torch.stack(pairs, dim=1).flatten()[:n].long()
    scale = (absmax.repeat(blocksize) if tile else absmax.repeat_interleave(blocksize))[:n]
    if round_twice:
        return (code[q].to(dtype) * scale.to(dtype)).view(shape)
    return (code[q] * scale).to(dtype).view(shape)


@mutant("dequantize_4bit", caught_by="nf4.dequantize_4bit_matches_bitsandbytes")
def _dequantize_nibbles_swapped(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    """The low nibble read as the first element."""
    return _dequantize(packed, absmax, code, shape, blocksize, dtype, swap=True)


@mutant("dequantize_4bit", caught_by="nf4.dequantize_4bit_matches_bitsandbytes")
def _dequantize_in_output_dtype(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    """code[q] and absmax rounded to the output dtype before the multiply (two roundings)."""
    return _dequantize(packed, absmax, code, shape, blocksize, dtype, round_twice=True)


@mutant("dequantize_4bit", caught_by="nf4.dequantize_4bit_matches_bitsandbytes")
def _dequantize_absmax_tiled(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    """absmax lined up with ``repeat`` (tiled) instead of ``repeat_interleave``: the wrong block's constant."""
    return _dequantize(packed, absmax, code, shape, blocksize, dtype, tile=True)


# ======================================================================= chapter 3: dynamic_map


def _dynamic_map(signed=True, *, float64=False, left_edges=False, exponent_reversed=False):
    """The reference ``dynamic_map`` with one switch per mistake."""
    magnitudes = []
    for fraction_bits in range(7):
        count = 2 ** fraction_bits if signed else 2 ** (fraction_bits + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64 if float64 else torch.float32)
        levels = edges[:-1] if left_edges else (edges[:-1] + edges[1:]) / 2
        exponent = -fraction_bits if exponent_reversed else fraction_bits - 6
        magnitudes.append((levels * 10.0 ** exponent).float())
    magnitudes = torch.cat(magnitudes)
    parts = [magnitudes, -magnitudes] if signed else [magnitudes]
    return torch.cat([*parts, torch.tensor([0.0, 1.0])]).sort().values


@mutant("dynamic_map", caught_by="double_quant.dynamic_map_matches_bitsandbytes")
def _dynamic_map_ignores_signed(signed=True):
    """Always the unsigned map."""
    return qlora_edu.dynamic_map(False)


@mutant("dynamic_map", caught_by="double_quant.dynamic_map_matches_bitsandbytes")
def _dynamic_map_float64(signed=True):
    """The linspace and midpoints in float64, rounded to float32 at the end."""
    return _dynamic_map(signed, float64=True)


@mutant("dynamic_map", caught_by="double_quant.dynamic_map_matches_bitsandbytes")
def _dynamic_map_left_edges(signed=True):
    """The left edges of the slices of [0.1, 1] instead of their midpoints."""
    return _dynamic_map(signed, left_edges=True)


@mutant("dynamic_map", caught_by="double_quant.dynamic_map_matches_bitsandbytes")
def _dynamic_map_exponent_reversed(signed=True):
    """The most fraction bits given to the smallest decade instead of the largest."""
    return _dynamic_map(signed, exponent_reversed=True)


# ======================================================================= chapter 3: double_quantize


def _double_quantize(absmax, blocksize=256, rounding="grid", *, centre=True, float64_mean=False,
                     whole_tensor=False, divide=False, grid_float64=False, unsigned=False, force=None,
                     pad_first=False, clamp_absmax2=False, keep_nan=False):
    """The reference ``double_quantize`` (with its argument checks) and one switch per mistake."""
    check_float_tensor("absmax", absmax)
    check_power_of_two("blocksize", blocksize, low=32, high=4096)
    check_rounding(rounding)
    rounding = force or rounding
    flat = absmax.detach().flatten().float()
    m = flat.numel()
    offset = flat.double().mean().float() if float64_mean else flat.mean()
    padding = n_blocks(m, blocksize) * blocksize - m
    if pad_first:
        blocks = F.pad(flat, (0, padding)).view(-1, blocksize) - offset
    else:
        blocks = F.pad(flat - offset if centre else flat, (0, padding)).view(-1, blocksize)
    absmax2 = blocks.abs().amax(dim=1)
    if whole_tensor:
        absmax2 = absmax2.max().reshape(1)
    if clamp_absmax2:
        absmax2 = absmax2.clamp(min=1e-38)
    scaled = blocks / absmax2[:, None] if divide else blocks * (1 / absmax2)[:, None]
    code = qlora_edu.dynamic_map(not unsigned)
    if rounding == "grid":
        v = scaled.double() if grid_float64 else scaled
        grid = (v + 1) * 0.5 * 65535 + 0.5
        grid = (grid if keep_nan else grid.nan_to_num(0.0)).clamp(0, 65535).to(torch.int64)
        codes = qlora_edu.grid_lookup_table(code)[grid]
    else:
        codes = torch.bucketize(scaled.nan_to_num(0.0), (code[:-1] + code[1:]) / 2)
    return codes.flatten()[:m].to(torch.uint8), offset, absmax2


@mutant("double_quantize", caught_by="double_quant.double_quantize_matches_bitsandbytes")
def _double_quantize_no_centring(absmax, blocksize=256, rounding="grid"):
    """The mean is returned as the offset but never subtracted."""
    return _double_quantize(absmax, blocksize, rounding, centre=False)


@mutant("double_quantize", caught_by="double_quant.double_quantize_grid_rounding_dense")
def _double_quantize_always_nearest(absmax, blocksize=256, rounding="grid"):
    """Exact-nearest rounding whatever ``rounding`` says (the CPU grid snap skipped)."""
    return _double_quantize(absmax, blocksize, rounding, force="nearest")


@mutant("double_quantize", caught_by="double_quant.double_quantize_nearest_is_nearest")
def _double_quantize_always_grid(absmax, blocksize=256, rounding="grid"):
    """The grid snap whatever ``rounding`` says ("nearest" is not nearest)."""
    return _double_quantize(absmax, blocksize, rounding, force="grid")


@mutant("double_quantize", caught_by="double_quant.double_quantize_matches_bitsandbytes")
def _double_quantize_one_absmax2(absmax, blocksize=256, rounding="grid"):
    """One absmax2 over all the constants instead of one per block of 256."""
    return _double_quantize(absmax, blocksize, rounding, whole_tensor=True)


@mutant("double_quantize", caught_by="double_quant.double_quantize_grid_rounding_dense")
def _double_quantize_divides(absmax, blocksize=256, rounding="grid"):
    """Scaled by a division, centred / absmax2, instead of the reciprocal."""
    return _double_quantize(absmax, blocksize, rounding, divide=True)


@mutant("double_quantize", caught_by="double_quant.double_quantize_grid_rounding_dense")
def _double_quantize_grid_in_float64(absmax, blocksize=256, rounding="grid"):
    """The grid index computed in float64 instead of float32 steps."""
    return _double_quantize(absmax, blocksize, rounding, grid_float64=True)


@mutant("double_quantize", caught_by="double_quant.double_quantize_matches_bitsandbytes")
def _double_quantize_float64_mean(absmax, blocksize=256, rounding="grid"):
    """The offset taken as a float64 mean, rounded to float32."""
    return _double_quantize(absmax, blocksize, rounding, float64_mean=True)


@mutant("double_quantize", caught_by="double_quant.double_quantize_matches_bitsandbytes")
def _double_quantize_pads_before_centring(absmax, blocksize=256, rounding="grid"):
    """The last block padded with zeros before the offset is subtracted (the padding counts in absmax2)."""
    return _double_quantize(absmax, blocksize, rounding, pad_first=True)


@mutant("double_quantize", caught_by="double_quant.double_quantize_constant_block")
def _double_quantize_clamps_absmax2(absmax, blocksize=256, rounding="grid"):
    """absmax2 clamped to 1e-38 as in chapter 2 (a block of constants equal to the mean: not 0 and code 0)."""
    return _double_quantize(absmax, blocksize, rounding, clamp_absmax2=True)


@mutant("double_quantize", caught_by="double_quant.double_quantize_constant_block")
def _double_quantize_nan_not_handled(absmax, blocksize=256, rounding="grid"):
    """The NaN of a block whose constants all equal the mean is used as a grid index as it is."""
    return _double_quantize(absmax, blocksize, rounding, keep_nan=True)


@mutant("double_quantize", caught_by="double_quant.double_quantize_matches_bitsandbytes")
def _double_quantize_unsigned_map(absmax, blocksize=256, rounding="grid"):
    """The unsigned dynamic map for the centred (signed) values."""
    return _double_quantize(absmax, blocksize, rounding, unsigned=True)


# ======================================================================= chapter 3: double_dequantize


def _double_dequantize(codes, offset, absmax2, blocksize=256, *, add_offset=True, tile=False, fused=False):
    """The reference ``double_dequantize`` (with its argument checks) and one switch per mistake."""
    check_dtype("codes", codes, torch.uint8)
    check_float_tensor("absmax2", absmax2)
    check_power_of_two("blocksize", blocksize, low=32, high=4096)
    m = codes.numel()
    if tuple(absmax2.shape) != (n_blocks(m, blocksize),):
        raise ValueError(f"absmax2 must have shape ({n_blocks(m, blocksize)},), got {tuple(absmax2.shape)}")
    values = qlora_edu.dynamic_map(True)[codes.flatten().long()]
    scale = (absmax2.repeat(blocksize) if tile else absmax2.repeat_interleave(blocksize))[:m]
    offset = torch.as_tensor(offset, dtype=torch.float32)
    if fused:
        return (values.double() * scale.double() + offset.double()).float()
    return values * scale + offset if add_offset else values * scale


@mutant("double_dequantize", caught_by="double_quant.double_dequantize_matches_bitsandbytes")
def _double_dequantize_no_offset(codes, offset, absmax2, blocksize=256):
    """The offset never added back."""
    return _double_dequantize(codes, offset, absmax2, blocksize, add_offset=False)


@mutant("double_dequantize", caught_by="double_quant.double_dequantize_matches_bitsandbytes")
def _double_dequantize_absmax2_tiled(codes, offset, absmax2, blocksize=256):
    """absmax2 lined up with ``repeat`` (tiled) instead of ``repeat_interleave``."""
    return _double_dequantize(codes, offset, absmax2, blocksize, tile=True)


@mutant("double_dequantize", caught_by="double_quant.double_dequantize_matches_bitsandbytes")
def _double_dequantize_one_rounding(codes, offset, absmax2, blocksize=256):
    """code * absmax2 + offset in float64 and rounded once, where bitsandbytes rounds twice in float32."""
    return _double_dequantize(codes, offset, absmax2, blocksize, fused=True)


# ======================================================================= the tests


def _unmutated(name: str) -> Callable:
    """The re-implementation behind the mutants of ``name`` with every mistake switched off."""
    p_pos, p_neg = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1], torch.linspace(NF4_OFFSET, 0.5, 8)[:-1]
    fn = {
        "nf4_code": lambda: _nf4_from(p_pos, p_neg),
        "quantize_4bit": lambda x, code, blocksize=64: _quantize(x, code, blocksize),
        "dequantize_4bit": lambda packed, absmax, code, shape, blocksize=64, dtype=torch.float32: _dequantize(
            packed, absmax, code, shape, blocksize, dtype),
        "dynamic_map": lambda signed=True: _dynamic_map(signed),
        "double_quantize": lambda absmax, blocksize=256, rounding="grid": _double_quantize(absmax, blocksize,
                                                                                           rounding),
        "double_dequantize": lambda codes, offset, absmax2, blocksize=256: _double_dequantize(codes, offset,
                                                                                              absmax2, blocksize),
    }[name]
    fn.__name__ = name
    return fn


@pytest.mark.parametrize("name", ["nf4_code", "quantize_4bit", "dequantize_4bit", "dynamic_map", "double_quantize",
                                  "double_dequantize"])
def test_the_mutants_fail_for_their_mistake_only(name):
    """The control: with every mistake switched off, the re-implementations behind the mutants pass."""
    assert check(_unmutated(name), verbose=False) is True


@pytest.mark.parametrize(("buggy", "caught_by"), MUTANTS)
def test_battery_catches_the_mutant(buggy, caught_by, capsys):
    assert check(buggy) is False
    report = capsys.readouterr().out
    assert "First failing case" in report
    assert f"[FAIL] {caught_by}  (" in report, report


# Equivalent mistakes, not mutants (the same outputs on every input):
# * nf4_code divided by values.abs().max() (or -values.min()): both ends are +-ndtri(float32(0.9677083)),
#   the same float32 number with opposite signs.
# * quantize_4bit without clamping the scaled values to [-1, 1]: a value above 1 (or below -1) is already
#   past the last (first) midpoint and gets the same end code, and NaN is not changed by a clamp.
# * the grid index as (v + 1) * 32767.5 + 0.5 instead of (v + 1) * 0.5 * 65535 + 0.5: multiplying by 0.5
#   is exact in float32, so both products round the same real number once.
