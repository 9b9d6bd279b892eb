"""Battery for chapter 2: the 4-bit code tables, packing, ``quantize_4bit`` / ``dequantize_4bit``, NF4Tensor.

Expected values come from bitsandbytes 0.50.2 itself (its tables and its CPU bytes, read at run time),
from the NF4 / FP4 tables written out in the course's bitsandbytes notes, from hand-made examples, and
from a float64 reference written here; never from ``qlora_edu``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import qlora_edu
from qlora_edu.ch02_nf4.guards import check_dequantize_4bit_args, check_quantize_4bit_args
from qlora_edu.ch02_nf4.nf4 import NF4_OFFSET
from qlora_edu.checks import (
    CheckFailure,
    _Hex,
    bits,
    bnb_functional,
    case,
    expect_equal,
    expect_raises,
    expect_same_bytes,
    expect_true,
    mistake,
)
from qlora_edu.common.guards import n_blocks

#: NF4 as printed by bitsandbytes 0.50.2 (``get_4bit_type("nf4")``), index 0..15.
NF4_TABLE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
#: FP4 magnitudes by bit pattern 0b000..0b111, before the division by 12 (bit 3 is the sign).
FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]


def _expect_bytes(what: str, got: torch.Tensor, expected: torch.Tensor, hint: str = "") -> None:
    """Packed bytes equal, dtype and shape too; the first differing byte is shown in hex with its two nibbles,
    as the lesson prints bytes (``0x12``, not ``18``)."""
    expect_true(isinstance(got, torch.Tensor), f"{what} should be a torch.Tensor", "Tensor", type(got).__name__)
    expect_true(got.dtype == torch.uint8, f"{what} has the wrong dtype", torch.uint8, got.dtype, hint)
    expect_true(tuple(got.shape) == tuple(expected.shape), f"{what} has the wrong shape", tuple(expected.shape),
                tuple(got.shape), hint)
    diff = (got.flatten() != expected.flatten()).nonzero().flatten()
    if diff.numel():
        i = int(diff[0])
        e, g = int(expected.flatten()[i]), int(got.flatten()[i])
        raise CheckFailure(f"{what}: {diff.numel()} of {got.numel()} bytes differ; the first is byte {i}",
                           _Hex(f"0x{e:02X} (high nibble {e >> 4}, low nibble {e & 15})"),
                           _Hex(f"0x{g:02X} (high nibble {g >> 4}, low nibble {g & 15})"), hint)


def nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Codes from packed bytes, high nibble first (written here, independently of ``unpack_4bit``)."""
    flat = packed.flatten().to(torch.int64)
    return torch.stack([flat >> 4, flat & 15], dim=1).flatten()[:numel]


# ----------------------------------------------------------------------------------- code tables


@case("nf4_code", hint="8 positive quantiles + 7 negative + one exact 0, sorted, divided by the largest")
def nf4_code_structure(impl):
    """16 sorted float32 values from -1 to 1, 0.0 at index 7: 7 negative and 8 positive levels."""
    code = impl.nf4_code()
    expect_true(isinstance(code, torch.Tensor) and code.dtype == torch.float32,
                "nf4_code() must be a float32 tensor", "float32 tensor",
                getattr(code, "dtype", type(code).__name__))
    expect_true(tuple(code.shape) == (16,), "nf4_code() must hold 16 values", (16,), tuple(code.shape))
    expect_true(bool((code[1:] > code[:-1]).all()), "nf4_code() must be sorted ascending", "sorted", code)
    expect_true(float(code[0]) == -1.0 and float(code[15]) == 1.0, "nf4_code() must end exactly at -1 and +1",
                (-1.0, 1.0), (float(code[0]), float(code[15])))
    expect_true(float(code[7]) == 0.0, "nf4_code()[7] must be exactly 0.0 (7 negative levels below it)",
                0.0, float(code[7]))


@mistake("nf4_code", caught_by=nf4_code_structure)
def nf4_mirrored():
    """8 negative and 7 positive levels (0.0 lands at index 8)."""
    return -_nf4_from(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1], torch.linspace(NF4_OFFSET, 0.5, 8)[:-1]).flip(0)


@mistake("nf4_code", caught_by=nf4_code_structure)
def nf4_not_normalised():
    """Not divided by the largest value: the table ends at +-1.848."""
    return _nf4_from(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1], torch.linspace(NF4_OFFSET, 0.5, 8)[:-1],
                     normalise=False)


@case("nf4_code", hint="probabilities in float32 (torch.linspace(0.9677083, 0.5, 9)[:-1] and (..., 8)[:-1]), "
      "quantiles in float64 (torch.special.ndtri(p.double())), then .float(), sort, divide by the max")
def nf4_code_bit_identical(impl):
    """Bit for bit equal to bitsandbytes' NF4 table (the literal values and the one bitsandbytes returns)."""
    code = impl.nf4_code()
    literal = torch.tensor(NF4_TABLE, dtype=torch.float32)
    expect_equal("nf4_code() bits vs the NF4 table", bits(code), bits(literal),
                 hint="off by ~1e-7? you computed the probabilities in float64: make them with "
                      "torch.linspace in float32, only the quantiles in float64")
    runtime = bnb_functional().get_4bit_type("nf4", device="cpu")
    expect_equal("nf4_code() bits vs bitsandbytes.functional.get_4bit_type('nf4')", bits(code), bits(runtime))


@mistake("nf4_code", caught_by=nf4_code_bit_identical)
def nf4_float64_probabilities():
    """The probabilities made in float64 (entries move by ~1e-7)."""
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1]
    return _nf4_from(p_pos, p_neg)


@mistake("nf4_code", caught_by=nf4_code_bit_identical)
def nf4_wrong_offset():
    """An offset of 0.99 instead of 0.9677083 (still ends at -1 and 1, 0.0 at index 7)."""
    return _nf4_from(torch.linspace(0.99, 0.5, 9)[:-1], torch.linspace(0.99, 0.5, 8)[:-1])


@mistake("nf4_code", caught_by=nf4_code_bit_identical)
def nf4_divided_in_float64():
    """Divided by the largest value in float64, rounded to float32 only at the end."""
    return _nf4_from(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1], torch.linspace(NF4_OFFSET, 0.5, 8)[:-1],
                     divide_in_float64=True)


@case("fp4_code", hint="by bit pattern: magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3 over 12, then the same "
      "negated for codes 8..15, with code 8 = +0.0")
def fp4_code_bit_identical(impl):
    """FP4 indexed by bit pattern, equal to bitsandbytes' table bit for bit (code 8 is +0.0, not -0.0)."""
    code = impl.fp4_code()
    magnitude = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32) / 12.0
    literal = torch.cat([magnitude, -magnitude])
    literal[8] = 0.0
    expect_equal("fp4_code() bits vs the FP4 table", bits(code), bits(literal))
    runtime = bnb_functional().get_4bit_type("fp4", device="cpu")
    expect_equal("fp4_code() bits vs bitsandbytes.functional.get_4bit_type('fp4')", bits(code), bits(runtime))


@case("int4_code", hint="torch.arange(-8, 8, dtype=torch.float32) / 7: index k + 8 holds k / 7")
def int4_code_is_chapter1_grid(impl):
    """The uniform grid of chapter 1: k/7 at index k + 8 (index 0, -8/7, is never chosen), 0.0 at index 8."""
    code = impl.int4_code()
    expected = torch.tensor([k / 7 for k in range(-8, 8)], dtype=torch.float32)
    expect_equal("int4_code()", code, expected)


# ----------------------------------------------------------------------------------- packing


@case("pack_4bit", "unpack_4bit", hint="byte = (codes[0::2] << 4) | codes[1::2]: the FIRST code goes in the "
      "HIGH nibble; an odd count gets `pad` as its last low nibble")
def pack_known_example(impl):
    """[1, 2, 3, 4, 5] with pad 7 packs to [0x12, 0x34, 0x57]; [[15, 0], [10, 11]] to [0xF0, 0xAB]."""
    def u8(values):
        return torch.tensor(values, dtype=torch.uint8)

    got = impl.pack_4bit(u8([1, 2, 3, 4, 5]), pad=7)
    _expect_bytes("pack_4bit([1, 2, 3, 4, 5], pad=7)", got, u8([0x12, 0x34, 0x57]))
    got = impl.pack_4bit(u8([[15, 0], [10, 11]]))
    _expect_bytes("pack_4bit([[15, 0], [10, 11]]) (row-major)", got, u8([0xF0, 0xAB]))
    got = impl.unpack_4bit(u8([0x12, 0x34, 0x57]), 5)
    expect_equal("unpack_4bit([0x12, 0x34, 0x57], 5)", got, u8([1, 2, 3, 4, 5]),
                 hint="high nibble = byte >> 4 comes first, then byte & 15; drop the pad nibble")


@mistake("pack_4bit", caught_by=pack_known_example)
def pack_first_in_low_nibble(codes, pad=0):
    """The first code of each pair in the low nibble."""
    flat = F.pad(codes.flatten(), (0, codes.numel() % 2), value=pad)
    return flat[0::2] | (flat[1::2] << 4)


@mistake("pack_4bit", caught_by=pack_known_example)
def pack_ignores_pad(codes, pad=0):
    """An odd count always padded with 0, whatever ``pad`` says."""
    return qlora_edu.pack_4bit(codes, pad=0)


@mistake("pack_4bit", caught_by=pack_known_example)
def pack_no_padding(codes, pad=0):
    """No padding at all: an odd count raises a size mismatch."""
    flat = codes.flatten()
    return (flat[0::2] << 4) | flat[1::2]


@mistake("unpack_4bit", caught_by=pack_known_example)
def unpack_nibbles_swapped(packed, numel):
    """The low nibble taken as the first code."""
    flat = packed.flatten()
    return torch.stack([flat & 0x0F, flat >> 4], dim=1).flatten()[:numel]


@mistake("unpack_4bit", caught_by=pack_known_example)
def unpack_not_trimmed(packed, numel):
    """The pad nibble of an odd count is kept (2 * bytes codes come back)."""
    flat = packed.flatten()
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).flatten()


@mistake("unpack_4bit", caught_by=pack_known_example)
def unpack_no_mask(packed, numel):
    """The second code taken as the whole byte (``& 0x0F`` forgotten)."""
    flat = packed.flatten()
    return torch.stack([flat >> 4, flat], dim=1).flatten()[:numel]


@case("pack_4bit", "unpack_4bit", hint="unpack must return exactly numel codes (drop the pad nibble)")
def pack_unpack_round_trip(impl):
    """unpack(pack(codes), n) == codes for even and odd n; ceil(n / 2) bytes."""
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 13, 64, 1001):
        codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        packed = impl.pack_4bit(codes)
        expect_true(packed.dtype == torch.uint8 and packed.numel() == -(-n // 2),
                    f"pack_4bit of {n} codes: uint8, ceil(n/2) bytes", (torch.uint8, -(-n // 2)),
                    (packed.dtype, packed.numel()))
        expect_equal(f"unpack_4bit(pack_4bit(codes), {n})", impl.unpack_4bit(packed, n), codes)


@mistake("unpack_4bit", caught_by=pack_unpack_round_trip)
def unpack_returns_int64(packed, numel):
    """The codes come back as int64 (the bytes widened with ``.long()`` first) instead of uint8."""
    flat = packed.flatten().long()
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).flatten()[:numel]


# ----------------------------------------------------------------------------------- quantize_4bit

# (shape, dtype, blocksize, quant_type): odd sizes, partial blocks, every input dtype, both tables.
PARITY_CASES = [
    ((3, 37), torch.float32, 64, "nf4"),
    ((1000,), torch.float16, 128, "nf4"),
    ((5, 51), torch.bfloat16, 32, "nf4"),
    ((7,), torch.float32, 64, "nf4"),
    ((2, 300), torch.float32, 256, "fp4"),
    ((3, 5, 41), torch.bfloat16, 64, "fp4"),
    ((2, 40), torch.float32, 64, "nf4"),  # its partial block (16 elements) is made all-zero below
]


def _parity_input(i: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) * 3
    return x.to(dtype)


@case("quantize_4bit", "nf4_code", "fp4_code",
      hint="full blocks: x * (1 / absmax); the last partial block: x / absmax; clamp to [-1, 1]; nearest "
      "code by the float32 midpoints, a tie goes to the LOWER code; pad an odd count with the code of 0.0")
def quantize_4bit_matches_bitsandbytes(impl):
    """packed bytes and absmax identical to bitsandbytes.functional.quantize_4bit on CPU."""
    bnbf = bnb_functional()
    for i, (shape, dtype, blocksize, quant_type) in enumerate(PARITY_CASES):
        x = _parity_input(i, shape, dtype)
        if i == 0:
            x.view(-1)[:64] = 0  # an all-zero block: absmax 0, every code = the code of 0.0
        if i == len(PARITY_CASES) - 1:
            x.view(-1)[64:] = 0  # an all-zero partial block: bitsandbytes stores its clamped absmax, 1e-38
        expected, state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                             compress_statistics=False)
        code = impl.nf4_code() if quant_type == "nf4" else impl.fp4_code()
        packed, absmax = impl.quantize_4bit(x, code, blocksize=blocksize)
        label = f"{quant_type} {tuple(shape)} {str(dtype).removeprefix('torch.')} blocksize {blocksize}"
        if i == 0 and isinstance(absmax, torch.Tensor) and absmax.numel() and float(absmax[0]) != 0.0:
            raise CheckFailure(f"absmax for {label}: block 0 is all zeros, a FULL block, and stores absmax 0",
                               0.0, float(absmax[0]),
                               "store the true max |x| of a full block, 0 here; clamp it to 1e-38 only for the "
                               "division (the clamped value is stored for the last, partial block only)")
        if i == len(PARITY_CASES) - 1 and isinstance(absmax, torch.Tensor) and absmax.numel() \
                and float(absmax[-1]) != float(state.absmax[-1]):
            raise CheckFailure(f"absmax for {label}: the last block is PARTIAL and all zeros; bitsandbytes "
                               "stores its clamped absmax", float(state.absmax[-1]), float(absmax[-1]),
                               "for the last, partial block store max(max |x|, 1e-38): bitsandbytes on CPU "
                               "keeps the clamped divisor there (full blocks store their true max, 0 if empty)")
        expect_equal(f"absmax for {label}", absmax, state.absmax,
                     hint="float32 max |x| per block of consecutive flat elements (blocks cross row ends); "
                          "only the last, partial block stores max(max |x|, 1e-38)")
        expect_same_bytes(f"packed for {label}", packed, expected, blocksize)


@mistake("quantize_4bit", caught_by=quantize_4bit_matches_bitsandbytes)
def quantize_blocks_per_row(x, code, blocksize=64):
    """Blocks cut per row instead of over the flattened tensor."""
    return _quantize(x, code, blocksize, per_row=True)


@mistake("quantize_4bit", caught_by=quantize_4bit_matches_bitsandbytes)
def quantize_pads_with_code_0(x, code, blocksize=64):
    """An odd count padded with code 0 instead of the code of 0.0."""
    return _quantize(x, code, blocksize, pad_code=0)


@mistake("quantize_4bit", caught_by=quantize_4bit_matches_bitsandbytes)
def quantize_absmax_not_clamped(x, code, blocksize=64):
    """absmax not clamped to 1e-38: an all-zero block scales to 0 / 0 = NaN."""
    return _quantize(x, code, blocksize, clamp_absmax=False)


@mistake("quantize_4bit", caught_by=quantize_4bit_matches_bitsandbytes)
def quantize_fp4_not_mapped_back(x, code, blocksize=64):
    """The position in the sorted table returned as the code (wrong for FP4, whose table is not sorted)."""
    return _quantize(x, code, blocksize, map_back=False)


@mistake("quantize_4bit", caught_by=quantize_4bit_matches_bitsandbytes)
def quantize_stores_unclamped_tail(x, code, blocksize=64):
    """An all-zero partial last block stores absmax 0 instead of the clamped 1e-38."""
    return _quantize(x, code, blocksize, store_clamped=False)


@mistake("quantize_4bit", caught_by=quantize_4bit_matches_bitsandbytes)
def quantize_stores_clamped_full(x, code, blocksize=64):
    """An all-zero full block stores the clamped 1e-38 instead of 0."""
    return _quantize(x, code, blocksize, store_clamped_full=True)


@mistake("quantize_4bit", caught_by=quantize_4bit_matches_bitsandbytes)
def quantize_in_input_dtype(x, code, blocksize=64):
    """Scaled in the input dtype (bf16 / fp16) instead of float32."""
    return _quantize(x, code, blocksize, input_dtype=True)


@mistake("quantize_4bit", caught_by=quantize_4bit_matches_bitsandbytes)
def quantize_argmin_distance(x, code, blocksize=64):
    """Nearest code by argmin of |v - code| (FP4's two zeros both become code 0; float32 distances tie)."""
    return _quantize(x, code, blocksize, argmin=True)


def _mul_div_disagree(a: float) -> torch.Tensor:
    """float32 values x in (-a, a), next to the NF4 midpoints times a, whose nearest NF4 level differs between
    x * (1 / a) and x / a (found by trying the 65 floats around each midpoint * a)."""
    table = torch.tensor(NF4_TABLE, dtype=torch.float32)
    midpoints = (table[:-1] + table[1:]) / 2
    a = torch.tensor(a, dtype=torch.float32)
    near = (midpoints * a).view(torch.int32)[:, None] + torch.arange(-32, 33, dtype=torch.int32)
    x = near.view(torch.float32).flatten()
    x = x[x.abs() < a]
    by_mul = torch.bucketize(x * (1 / a), midpoints)
    by_div = torch.bucketize(x / a, midpoints)
    return x[by_mul != by_div]


@case("quantize_4bit", "nf4_code", hint="bitsandbytes scales FULL blocks with a reciprocal, "
      "x * (1 / absmax), and the last PARTIAL block with a division, x / absmax; the two differ in the last "
      "bit now and then")
def quantize_4bit_scaling_matches_bitsandbytes(impl):
    """Values chosen so that x * (1 / absmax) and x / absmax round to different codes, in a full block and
    in the partial last block."""
    bnbf = bnb_functional()
    for a in (3.0, 7.0, 1.7):
        x = _mul_div_disagree(a)
        head = torch.cat([torch.tensor([a]), x])
        full = torch.cat([head, torch.zeros(64 - head.numel())])
        tensor = torch.cat([full, head])  # one full block, then a partial one with the same values
        expected, state = bnbf.quantize_4bit(tensor, blocksize=64, quant_type="nf4",
                                             compress_statistics=False)
        packed, absmax = impl.quantize_4bit(tensor, impl.nf4_code(), blocksize=64)
        expect_equal(f"absmax with block maximum {a}", absmax, state.absmax)
        expect_same_bytes(f"packed for values near NF4 midpoints times {a}", packed, expected, 64)


@mistake("quantize_4bit", caught_by=quantize_4bit_scaling_matches_bitsandbytes)
def quantize_divides_full_blocks(x, code, blocksize=64):
    """Full blocks divided by absmax instead of multiplied by its reciprocal."""
    return _quantize(x, code, blocksize, divide_full=True)


@mistake("quantize_4bit", caught_by=quantize_4bit_scaling_matches_bitsandbytes)
def quantize_reciprocal_in_tail(x, code, blocksize=64):
    """The last, partial block also multiplied by the reciprocal (what CUDA does, not the CPU)."""
    return _quantize(x, code, blocksize, reciprocal_tail=True)


@case("quantize_4bit", "nf4_code", hint="torch.bucketize(v, midpoints) with right=False sends a value equal "
      "to a midpoint to the lower code")
def quantize_4bit_ties_go_down(impl):
    """Values exactly on the midpoint between NF4 levels i and i+1 get code i (and -1, 1 the end codes)."""
    table = torch.tensor(NF4_TABLE, dtype=torch.float32)
    midpoints = (table[:-1] + table[1:]) / 2
    x = torch.cat([torch.tensor([1.0, -1.0]), midpoints])  # absmax 1: the scaled values are x itself
    packed, _ = impl.quantize_4bit(x, impl.nf4_code(), blocksize=32)
    expected = torch.cat([torch.tensor([15, 0]), torch.arange(15)])
    expect_equal("codes of [1, -1, midpoint(0,1), ..., midpoint(14,15)]", nibbles(packed, x.numel()),
                 expected)


@mistake("quantize_4bit", caught_by=quantize_4bit_ties_go_down)
def quantize_ties_go_up(x, code, blocksize=64):
    """A value exactly on a midpoint goes to the upper code (``bucketize(..., right=True)``)."""
    return _quantize(x, code, blocksize, right=True)


@mistake("quantize_4bit", caught_by=quantize_4bit_ties_go_down)
def quantize_float64_midpoints(x, code, blocksize=64):
    """Midpoints and the comparison in float64 instead of the float32 midpoints."""
    return _quantize(x, code, blocksize, float64_midpoints=True)


# ----------------------------------------------------------------------------------- dequantize_4bit

#: Shapes where bitsandbytes 0.50.2's CPU dequantize is right (not: >1 row with the last dim a multiple
#: of 16 but not of the blocksize, blocksize < 2048, on AVX512 CPUs) and fast: an even last dimension and
#: blocksize < 2048 use its C++ kernel; the other shapes go through a torch.compile'd fallback that takes
#: seconds to compile (tests/test_nf4_parity.py covers them).
DEQUANT_CASES = [
    ((3, 38), torch.float32, 64, "nf4"),
    ((1000,), torch.bfloat16, 128, "nf4"),
    ((5, 50), torch.float16, 32, "nf4"),
    ((2, 300), torch.bfloat16, 256, "fp4"),
    ((130,), torch.float32, 64, "fp4"),
]


@case("dequantize_4bit", "nf4_code", "fp4_code",
      hint="code[q] * absmax of the element's block, in float32, then .to(dtype); reshape to `shape`")
def dequantize_4bit_matches_bitsandbytes(impl):
    """Given bitsandbytes' packed bytes, the same values as bitsandbytes.functional.dequantize_4bit."""
    bnbf = bnb_functional()
    for i, (shape, dtype, blocksize, quant_type) in enumerate(DEQUANT_CASES):
        x = _parity_input(50 + i, shape, dtype)
        packed, state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                           compress_statistics=False)
        expected = bnbf.dequantize_4bit(packed, state).reshape(shape)  # a 1-D input comes back (1, n)
        code = impl.nf4_code() if quant_type == "nf4" else impl.fp4_code()
        got = impl.dequantize_4bit(packed, state.absmax, code, shape, blocksize=blocksize, dtype=dtype)
        label = f"{quant_type} {tuple(shape)} {str(dtype).removeprefix('torch.')} blocksize {blocksize}"
        expect_equal(f"dequantize_4bit for {label}", got, expected)


@mistake("dequantize_4bit", caught_by=dequantize_4bit_matches_bitsandbytes)
def dequantize_nibbles_swapped(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    """The low nibble read as the first element."""
    return _dequantize(packed, absmax, code, shape, blocksize, dtype, swap=True)


@mistake("dequantize_4bit", caught_by=dequantize_4bit_matches_bitsandbytes)
def dequantize_in_output_dtype(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    """code[q] and absmax rounded to the output dtype before the multiply (two roundings)."""
    return _dequantize(packed, absmax, code, shape, blocksize, dtype, round_twice=True)


@mistake("dequantize_4bit", caught_by=dequantize_4bit_matches_bitsandbytes)
def dequantize_absmax_tiled(packed, absmax, code, shape, blocksize=64, dtype=torch.float32):
    """absmax lined up with ``repeat`` (tiled) instead of ``repeat_interleave``: the wrong block's constant."""
    return _dequantize(packed, absmax, code, shape, blocksize, dtype, tile=True)


@case("dequantize_4bit", "nf4_code", hint="the high nibble is the first element of each pair; the last "
      "block may be partial and the last byte may hold a pad nibble")
def dequantize_4bit_matches_float64_reference(impl):
    """Against a float64 reference written here: a (4, 96) tensor at blocksize 64 (bitsandbytes 0.50.2
    dequantizes this shape wrongly on AVX512 CPUs, so it cannot be the reference) and an odd (5, 33)."""
    g = torch.Generator().manual_seed(7)
    table = torch.tensor(NF4_TABLE, dtype=torch.float32)
    blocksize = 64
    for shape in ((4, 96), (5, 33)):
        n = math.prod(shape)
        q = torch.randint(0, 16, (n + n % 2,), generator=g)
        packed = ((q[0::2] << 4) | q[1::2]).to(torch.uint8).unsqueeze(1)
        absmax = torch.rand(math.ceil(n / blocksize), generator=g) * 2
        per_element = absmax.double().repeat_interleave(blocksize)[:n]
        exact = table.double()[q[:n]] * per_element  # a product of two float32 is exact in float64
        for dtype in (torch.float32, torch.bfloat16):
            expected = exact.float().to(dtype).view(shape)  # one float32 rounding, then the cast
            got = impl.dequantize_4bit(packed, absmax, impl.nf4_code(), shape, blocksize=blocksize,
                                       dtype=dtype)
            expect_equal(f"dequantize_4bit {shape} blocksize 64 to {dtype}", got, expected)


# ----------------------------------------------------------------------------------- NF4Tensor


# ----------------------------------------------------------------------------------- bad input


@case("quantize_4bit", "dequantize_4bit", "nf4_code",
      hint="keep the given argument checks at the top of the function")
def bad_input_is_rejected(impl):
    """Wrong dtypes, NaN, a bad blocksize or table, inconsistent sizes raise errors naming the argument."""
    code = impl.nf4_code()
    x = torch.randn(10, 10)
    expect_raises("quantize_4bit of an int tensor", TypeError,
                  lambda: impl.quantize_4bit(torch.ones(10, dtype=torch.int32), code), "x")
    nan = x.clone()
    nan[3, 3] = float("nan")
    expect_raises("quantize_4bit of a tensor with a NaN", ValueError, lambda: impl.quantize_4bit(nan, code),
                  "x")
    expect_raises("quantize_4bit with blocksize 48", ValueError,
                  lambda: impl.quantize_4bit(x, code, blocksize=48), "blocksize")
    expect_raises("quantize_4bit with blocksize 8192", ValueError,
                  lambda: impl.quantize_4bit(x, code, blocksize=8192), "blocksize")
    expect_raises("quantize_4bit with a 15-value table", ValueError,
                  lambda: impl.quantize_4bit(x, code[:15]), "code")
    expect_raises("quantize_4bit with a float64 table", TypeError,
                  lambda: impl.quantize_4bit(x, code.double()), "code")
    packed, absmax = impl.quantize_4bit(x, code)
    expect_raises("dequantize_4bit of int8 bytes", TypeError,
                  lambda: impl.dequantize_4bit(packed.to(torch.int8), absmax, code, (10, 10)), "packed")
    expect_raises("dequantize_4bit with a shape of 102 elements for 50 bytes", ValueError,
                  lambda: impl.dequantize_4bit(packed, absmax, code, (2, 51)), "packed")
    expect_raises("dequantize_4bit with absmax of the wrong length", ValueError,
                  lambda: impl.dequantize_4bit(packed, absmax[:1], code, (10, 10)), "absmax")


# ----------------------------------------------------------------- the re-implementations the mistakes switch
# Each mistake above is this chapter's function re-implemented with one thing changed; with every switch off the
# re-implementation passes the battery (tests check that control), so a failure is the mistake's own.


def _nf4_from(p_pos: torch.Tensor, p_neg: torch.Tensor, normalise: bool = True,
              divide_in_float64: bool = False) -> torch.Tensor:
    positive = torch.special.ndtri(p_pos.double())
    negative = -torch.special.ndtri(p_neg.double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    if divide_in_float64:
        return (values / values.max()).float()
    values = values.float()
    return values / values.max() if normalise else values


def _quantize(x, code, blocksize, *, divide_full=False, reciprocal_tail=False, right=False, per_row=False,
              pad_code=None, clamp_absmax=True, map_back=True, store_clamped=True, store_clamped_full=False,
              input_dtype=False, argmin=False, float64_midpoints=False):
    """The reference ``quantize_4bit`` (with its argument checks) and one switch per mistake."""
    check_quantize_4bit_args(x, code, blocksize)
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


def _dequantize(packed, absmax, code, shape, blocksize, dtype, *, swap=False, round_twice=False, tile=False):
    """The reference ``dequantize_4bit`` (with its argument checks) and one switch per mistake."""
    shape = check_dequantize_4bit_args(packed, absmax, code, shape, blocksize, dtype)
    n = math.prod(shape)
    flat = packed.flatten()
    pairs = [flat & 0x0F, flat >> 4] if swap else [flat >> 4, flat & 0x0F]
    q = torch.stack(pairs, dim=1).flatten()[:n].long()
    scale = (absmax.repeat(blocksize) if tile else absmax.repeat_interleave(blocksize))[:n]
    if round_twice:
        return (code[q].to(dtype) * scale.to(dtype)).view(shape)
    return (code[q] * scale).to(dtype).view(shape)


# Equivalent mistakes, not listed above (they give the same outputs on every input, so no case can catch them):
# * nf4_code divided by values.abs().max() (or -values.min()): both ends are +-ndtri(float32(0.9677083)),
#   the same float32 number with opposite signs.
# * quantize_4bit without clamping the scaled values to [-1, 1]: a value above 1 (or below -1) is already
#   past the last (first) midpoint and gets the same end code, and NaN is not changed by a clamp.
