"""Battery for chapter 3: the dynamic map, ``double_quantize`` / ``double_dequantize``, NF4 + double
quantization as QLoRA stores it, and the storage arithmetic.

Expected values come from bitsandbytes 0.50.2 (its dynamic map and the quantization state of
``quantize_4bit(..., compress_statistics=True)`` on CPU), from a brute-force float64 nearest-code search
written here, and from the bit-count formulas of the QLoRA paper; never from ``qlora_edu``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import qlora_edu
from qlora_edu.ch03_double_quant.guards import check_double_quantize_args
from qlora_edu.checks import (
    CheckFailure,
    bits,
    bnb_functional,
    bnb_nf4,
    case,
    expect_close,
    expect_equal,
    expect_raises,
    expect_same_bytes,
    expect_true,
    mistake,
)
from qlora_edu.common.guards import check_dtype, check_float_tensor, check_power_of_two, n_blocks


def _weights(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)  # weight-like scale


def _bnb_state(x: torch.Tensor, blocksize: int = 64):
    """bitsandbytes' NF4 + double quantization of x: (packed, first-level absmax, quant state)."""
    _, plain = bnb_nf4(x, blocksize, double_quant=False)
    packed, state = bnb_nf4(x, blocksize, double_quant=True)
    return packed, plain.absmax, state


def _expect_same_codes(what: str, got: torch.Tensor, expected: torch.Tensor, hint: str = "") -> None:
    expect_true(isinstance(got, torch.Tensor) and got.dtype == torch.uint8, f"{what} must be a uint8 tensor",
                torch.uint8, getattr(got, "dtype", type(got).__name__), hint)
    expect_true(got.numel() == expected.numel(), f"{what}: one code per constant", expected.numel(),
                got.numel())
    diff = (got.flatten() != expected.flatten()).nonzero().flatten()
    if diff.numel():
        i = int(diff[0])
        raise CheckFailure(f"{what}: {diff.numel()} of {got.numel()} codes differ; the first is constant {i} "
                           f"(second-level block {i // 256})", int(expected.flatten()[i]),
                           int(got.flatten()[i]), hint)


@case("dynamic_map", hint="for each fraction width i = 0..6: the midpoints of torch.linspace(0.1, 1, "
      "count + 1) times 10**(i - 6), count = 2**i signed, 2**(i+1) unsigned; signed adds the negatives; "
      "add 0 and 1; sort")
def dynamic_map_matches_bitsandbytes(impl):
    """The signed and unsigned 8-bit dynamic maps, bit for bit equal to create_dynamic_map."""
    bnbf = bnb_functional()
    for signed in (True, False):
        got = impl.dynamic_map(signed=signed)
        ok = isinstance(got, torch.Tensor) and got.dtype == torch.float32 and tuple(got.shape) == (256,)
        expect_true(ok, f"dynamic_map(signed={signed}) must be 256 float32 values", ((256,), torch.float32),
                    (tuple(getattr(got, "shape", ())), getattr(got, "dtype", None)))
        expected = bnbf.create_dynamic_map(signed=signed)
        expect_equal(f"dynamic_map(signed={signed}) bits", bits(got), bits(expected))
    signed_map = impl.dynamic_map(signed=True)
    expect_true(float(signed_map[127]) == 0.0 and float(signed_map[255]) == 1.0,
                "the signed map has 0.0 at index 127 and ends at 1.0", (0.0, 1.0),
                (float(signed_map[127]), float(signed_map[255])))


@mistake("dynamic_map", caught_by=dynamic_map_matches_bitsandbytes)
def dynamic_map_ignores_signed(signed=True):
    """Always the unsigned map."""
    return qlora_edu.dynamic_map(False)


@mistake("dynamic_map", caught_by=dynamic_map_matches_bitsandbytes)
def dynamic_map_float64(signed=True):
    """The linspace and midpoints in float64, rounded to float32 at the end."""
    return _dynamic_map(signed, float64=True)


@mistake("dynamic_map", caught_by=dynamic_map_matches_bitsandbytes)
def dynamic_map_left_edges(signed=True):
    """The left edges of the slices of [0.1, 1] instead of their midpoints."""
    return _dynamic_map(signed, left_edges=True)


@mistake("dynamic_map", caught_by=dynamic_map_matches_bitsandbytes)
def dynamic_map_exponent_reversed(signed=True):
    """The most fraction bits given to the smallest decade instead of the largest."""
    return _dynamic_map(signed, exponent_reversed=True)


@case("grid_lookup_table", "dynamic_map", hint="grid value of point g: torch.arange(65536, "
      "dtype=torch.float32) * (2 / 65535) - 1; its code: torch.bucketize on the map's midpoints "
      "(ties go down)")
def grid_lookup_table_matches_bitsandbytes(impl):
    """For all 65536 grid points, the code bitsandbytes' CPU kernel gives a value that snaps to the point."""
    g = torch.arange(65536)
    probes = (g.double() * 2 / 65535 - 1).float()  # each snaps back to its own g: int((v+1)*0.5*65535+0.5)
    rows = -(-65536 // 255)
    body = torch.nn.functional.pad(probes, (0, rows * 255 - 65536)).view(rows, 255)
    blocks = torch.cat([torch.ones(rows, 1), body], dim=1)  # a 1.0 first: every block's absmax is 1
    bnbf = bnb_functional()
    signed_map = bnbf.create_dynamic_map(signed=True)
    codes, _ = bnbf.quantize_blockwise(blocks.flatten(), code=signed_map, blocksize=256)
    expected = codes.view(rows, 256)[:, 1:].flatten()[:65536].to(torch.int32)
    got = impl.grid_lookup_table(impl.dynamic_map(True))
    expect_equal("grid_lookup_table(dynamic_map(True))", got, expected)


@case("double_quantize", hint="offset = absmax.mean() in float32; absmax2 = max |absmax - offset| per 256; "
      "scale with * (1 / absmax2); for byte parity snap to the 65536-point grid first (rounding='grid')")
def double_quantize_matches_bitsandbytes(impl):
    """codes, offset and absmax2 equal to bitsandbytes' compress_statistics=True state (absmax, offset,
    state2.absmax), for 329 constants (a partial second-level block) and for 1024."""
    for seed, shape in ((1, (300, 70)), (2, (64, 1024))):
        x = _weights(seed, shape)
        _, absmax, state = _bnb_state(x)
        codes, offset, absmax2 = impl.double_quantize(absmax, blocksize=256, rounding="grid")
        expect_equal(f"offset for {shape}", offset.reshape(()), state.offset.reshape(()),
                     hint="the float32 mean of the constants: absmax.mean() (not a float64 mean)")
        expect_equal(f"absmax2 for {shape}", absmax2, state.state2.absmax,
                     hint="max |absmax - offset| over each block of 256 constants (the last may be partial)")
        _expect_same_codes(f"codes for {shape}", codes, state.absmax,
                           hint="a code off here and there? that is exact-nearest rounding; bitsandbytes' "
                                "CPU kernel snaps to g = int((v + 1) * 0.5 * 65535 + 0.5) first")


@mistake("double_quantize", caught_by=double_quantize_matches_bitsandbytes)
def double_quantize_no_centring(absmax, blocksize=256, rounding="grid"):
    """The mean is returned as the offset but never subtracted."""
    return _double_quantize(absmax, blocksize, rounding, centre=False)


@mistake("double_quantize", caught_by=double_quantize_matches_bitsandbytes)
def double_quantize_one_absmax2(absmax, blocksize=256, rounding="grid"):
    """One absmax2 over all the constants instead of one per block of 256."""
    return _double_quantize(absmax, blocksize, rounding, whole_tensor=True)


@mistake("double_quantize", caught_by=double_quantize_matches_bitsandbytes)
def double_quantize_float64_mean(absmax, blocksize=256, rounding="grid"):
    """The offset taken as a float64 mean, rounded to float32."""
    return _double_quantize(absmax, blocksize, rounding, float64_mean=True)


@mistake("double_quantize", caught_by=double_quantize_matches_bitsandbytes)
def double_quantize_pads_before_centring(absmax, blocksize=256, rounding="grid"):
    """The last block padded with zeros before the offset is subtracted (the padding counts in absmax2)."""
    return _double_quantize(absmax, blocksize, rounding, pad_first=True)


@mistake("double_quantize", caught_by=double_quantize_matches_bitsandbytes)
def double_quantize_unsigned_map(absmax, blocksize=256, rounding="grid"):
    """The unsigned dynamic map for the centred (signed) values."""
    return _double_quantize(absmax, blocksize, rounding, unsigned=True)


@case("double_quantize", hint="the grid index in float32, in this order: ((v + 1) * 0.5) * 65535 + 0.5, "
      "truncated; v = centred * (1 / absmax2) (a reciprocal, not a division)")
def double_quantize_grid_rounding_dense(impl):
    """2**20 constants spread densely over [0, 2]: values fall within a few float32 steps of the grid cells'
    edges, where the order of the float32 operations decides the code."""
    m = 1 << 20
    g = torch.Generator().manual_seed(9)
    absmax = torch.linspace(0, 2, m)[torch.randperm(m, generator=g)]
    offset = absmax.mean()
    expected, state2 = bnb_functional().quantize_blockwise(absmax - offset, blocksize=256)
    codes, _, absmax2 = impl.double_quantize(absmax, blocksize=256, rounding="grid")
    expect_equal("absmax2 of 2**20 dense constants", absmax2, state2.absmax)
    _expect_same_codes("codes of 2**20 dense constants", codes, expected)


@mistake("double_quantize", caught_by=double_quantize_grid_rounding_dense)
def double_quantize_always_nearest(absmax, blocksize=256, rounding="grid"):
    """Exact-nearest rounding whatever ``rounding`` says (the CPU grid snap skipped)."""
    return _double_quantize(absmax, blocksize, rounding, force="nearest")


@mistake("double_quantize", caught_by=double_quantize_grid_rounding_dense)
def double_quantize_divides(absmax, blocksize=256, rounding="grid"):
    """Scaled by a division, centred / absmax2, instead of the reciprocal."""
    return _double_quantize(absmax, blocksize, rounding, divide=True)


@mistake("double_quantize", caught_by=double_quantize_grid_rounding_dense)
def double_quantize_grid_in_float64(absmax, blocksize=256, rounding="grid"):
    """The grid index computed in float64 instead of float32 steps."""
    return _double_quantize(absmax, blocksize, rounding, grid_float64=True)


@case("double_quantize", hint="a block whose constants all equal the mean has absmax2 = 0: store 0 (no clamp); "
      "its scaled values 0 * (1 / 0) are NaN: rounding='grid' sends them to grid point 0 (code 0, as bitsandbytes' "
      "CPU kernel), rounding='nearest' treats them as the 0.0 they stand for (code 127, the map's 0.0)")
def double_quantize_constant_block(impl):
    """Blocks of 256 constants all equal to the mean (an all-zero weight, or a run of equal constants): absmax2
    is 0; with rounding='grid' the codes are bitsandbytes' (grid point 0), with rounding='nearest' the code of
    0.0 (the centred value is exactly 0); both read back as the offset."""
    bnbf = bnb_functional()
    table = bnbf.create_dynamic_map(signed=True)
    equal_run = torch.cat([torch.ones(256), torch.tensor([0.5, 1.5] * 22)])  # mean exactly 1.0
    for label, absmax in (("256 constants equal to the mean, then 44 others", equal_run),
                          ("300 zero constants (an all-zero weight)", torch.zeros(300))):
        offset = absmax.mean()
        expected, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        codes, got_offset, absmax2 = impl.double_quantize(absmax, blocksize=256, rounding="grid")
        expect_equal(f"offset of {label}", got_offset.reshape(()), offset)
        expect_equal(f"absmax2 of {label}", absmax2, state2.absmax,
                     hint="max |absmax - offset| per block, 0 for a constant block: do not clamp it")
        _expect_same_codes(f"codes of {label}", codes, expected)
        codes, _, absmax2 = impl.double_quantize(absmax, blocksize=256, rounding="nearest")
        zero_code = int((table == 0).nonzero())  # 127: where bitsandbytes' signed map holds 0.0
        _expect_same_codes(f"rounding='nearest' codes of {label} (each centred value is exactly 0.0)",
                           codes[:256], torch.full((256,), zero_code, dtype=torch.uint8),
                           hint="0 * (1 / 0) is NaN, and torch.bucketize puts NaN past the last midpoint (code "
                                "255); turn the NaN into 0.0 first (nan_to_num) so it gets the code of 0.0")
        read_back = table[codes.long()] * absmax2.repeat_interleave(256)[:300] + offset
        expect_equal(f"{label} read back from rounding='nearest' codes (any code times absmax2 = 0 is 0)",
                     read_back[:256], torch.full((256,), float(offset)))


@mistake("double_quantize", caught_by=double_quantize_constant_block)
def double_quantize_clamps_absmax2(absmax, blocksize=256, rounding="grid"):
    """absmax2 clamped to 1e-38 as in chapter 2 (a block of constants equal to the mean: not 0 and code 0)."""
    return _double_quantize(absmax, blocksize, rounding, clamp_absmax2=True)


@mistake("double_quantize", caught_by=double_quantize_constant_block)
def double_quantize_nan_not_handled(absmax, blocksize=256, rounding="grid"):
    """The NaN of a block whose constants all equal the mean is used as a grid index as it is."""
    return _double_quantize(absmax, blocksize, rounding, keep_nan=True)


@mistake("double_quantize", caught_by=double_quantize_constant_block)
def double_quantize_nearest_nan_to_255(absmax, blocksize=256, rounding="grid"):
    """rounding='nearest' bucketizes the NaN of a constant block as it is: code 255 (1.0), not 127 (0.0)."""
    return _double_quantize(absmax, blocksize, rounding, nearest_keeps_nan=True)


@case("double_quantize", "dynamic_map", hint="rounding='nearest' must pick the closest dynamic-map value to "
      "(absmax - offset) * (1 / absmax2), the lower one on an exact tie")
def double_quantize_nearest_is_nearest(impl):
    """With rounding='nearest' every code is the nearest of the 256 (a brute-force float64 search here)."""
    x = _weights(3, (64, 1024))
    _, absmax, _ = _bnb_state(x)
    codes, offset, absmax2 = impl.double_quantize(absmax, blocksize=256, rounding="nearest")
    table = bnb_functional().create_dynamic_map(signed=True)
    centred = absmax - offset
    scaled = (centred.view(-1, 256) * (1 / absmax2)[:, None]).flatten()
    distance = (scaled.double()[:, None] - table.double()[None, :]).abs()
    nearest = distance.argmin(dim=1)  # the first (lower) index on a tie
    _expect_same_codes("nearest codes", codes, nearest.to(torch.uint8))


@mistake("double_quantize", caught_by=double_quantize_nearest_is_nearest)
def double_quantize_always_grid(absmax, blocksize=256, rounding="grid"):
    """The grid snap whatever ``rounding`` says ("nearest" is not nearest)."""
    return _double_quantize(absmax, blocksize, rounding, force="grid")


@case("double_dequantize", hint="dynamic_map(True)[codes] * absmax2[i // 256], in float32, then + offset")
def double_dequantize_matches_bitsandbytes(impl):
    """Equal to bitsandbytes.functional.dequantize_blockwise(codes, state2) + offset; within half a step."""
    bnbf = bnb_functional()
    x = _weights(4, (300, 70))
    _, absmax, state = _bnb_state(x)
    got = impl.double_dequantize(state.absmax, state.offset, state.state2.absmax, blocksize=256)
    expected = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    expect_equal("double_dequantize vs bitsandbytes", got, expected)
    # The widest gap of the signed map is 0.9/64 (between 0.1 and 1): the error is under half of it.
    per_constant = state.state2.absmax.repeat_interleave(256)[: absmax.numel()]
    expect_close("double_dequantize vs the original constants", got, absmax,
                 atol=float((per_constant * 0.9 / 128).max()) * 1.001)


@mistake("double_dequantize", caught_by=double_dequantize_matches_bitsandbytes)
def double_dequantize_no_offset(codes, offset, absmax2, blocksize=256):
    """The offset never added back."""
    return _double_dequantize(codes, offset, absmax2, blocksize, add_offset=False)


@mistake("double_dequantize", caught_by=double_dequantize_matches_bitsandbytes)
def double_dequantize_absmax2_tiled(codes, offset, absmax2, blocksize=256):
    """absmax2 lined up with ``repeat`` (tiled) instead of ``repeat_interleave``."""
    return _double_dequantize(codes, offset, absmax2, blocksize, tile=True)


@mistake("double_dequantize", caught_by=double_dequantize_matches_bitsandbytes)
def double_dequantize_one_rounding(codes, offset, absmax2, blocksize=256):
    """code * absmax2 + offset in float64 and rounded once, where bitsandbytes rounds twice in float32."""
    return _double_dequantize(codes, offset, absmax2, blocksize, fused=True)


@case("quantize_nf4", "dequantize_nf4", hint="quantize_4bit with nf4_code(), then double_quantize(absmax)")
def quantize_nf4_matches_bitsandbytes(impl):
    """quantize_nf4(x) (double_quant=True) stores what bitsandbytes stores, and dequantizes the same."""
    bnbf = bnb_functional()
    # (4096, 4096) has 262,144 constants: enough for a multi-threaded float32 mean to differ in its last bit
    # from a single-threaded one, which moves codes; bitsandbytes takes the mean on the caller's threads.
    for seed, shape, dtype in ((5, (300, 70), torch.bfloat16), (6, (33, 18), torch.float16),
                               (0, (4096, 4096), torch.float32)):
        x = _weights(seed, shape, dtype)
        packed, _, state = _bnb_state(x)
        t = impl.quantize_nf4(x, blocksize=64, double_quant=True)
        expect_same_bytes(f"NF4Tensor.packed for {shape}", t.packed, packed, 64)
        _expect_same_codes(f"NF4Tensor.absmax (the 8-bit codes) for {shape}", t.absmax, state.absmax)
        expect_equal(f"NF4Tensor.offset for {shape}", t.offset.reshape(()), state.offset.reshape(()))
        expect_equal(f"NF4Tensor.absmax2 for {shape}", t.absmax2, state.state2.absmax)
        expected = bnbf.dequantize_4bit(packed, state).reshape(shape)
        expect_equal(f"dequantize_nf4 for {shape}", impl.dequantize_nf4(t), expected)


@case("quantize_nf4", "dequantize_nf4",
      hint="keep x.shape and x.dtype in the NF4Tensor; nbytes = bytes of the stored tensors only")
def quantize_nf4_round_trip(impl):
    """Shape and dtype come back; the error is within half a code gap of each block's absmax; nbytes."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 96, generator=g).to(torch.bfloat16)
    n, blocksize = x.numel(), 64
    for double_quant in (False, True):
        t = impl.quantize_nf4(x, blocksize=blocksize, double_quant=double_quant)
        y = impl.dequantize_nf4(t)
        expect_true(tuple(y.shape) == (4, 96) and y.dtype == torch.bfloat16,
                    f"dequantize_nf4 shape and dtype (double_quant={double_quant})",
                    ((4, 96), torch.bfloat16), (tuple(y.shape), y.dtype))
        absmax = x.float().view(-1, blocksize).abs().amax(dim=1).repeat_interleave(blocksize).view(4, 96)
        # NF4's widest gap is from -1 to -0.6962: half of it (0.152), plus the constant's own 8-bit error
        # (< 0.8% of absmax) and the bf16 rounding of the result (< 0.4%).
        bound = absmax * (0.1520 + 0.008 + 0.004) + 1e-6
        expect_close(f"dequantize_nf4(quantize_nf4(x)) (double_quant={double_quant})", y.float(), x.float(),
                     atol=float(bound.max()),
                     hint="the error of a 4-bit code is at most half the gap to the next level")
        n_blocks = math.ceil(n / blocksize)
        expected_bytes = math.ceil(n / 2) + (n_blocks + 4 + 4 * math.ceil(n_blocks / 256) if double_quant
                                             else 4 * n_blocks)
        expect_true(t.nbytes == expected_bytes,
                    f"nbytes of a (4, 96) NF4Tensor (double_quant={double_quant}): packed codes + constants "
                    "(+ 4-byte offset + float32 absmax2)", expected_bytes, t.nbytes)


@case("double_quantize", "double_dequantize", hint="keep the given argument checks")
def double_quant_bad_input_is_rejected(impl):
    """A bad rounding name or blocksize, or non-float constants, raise errors naming the argument."""
    absmax = torch.rand(300)
    expect_raises("double_quantize(rounding='round')", ValueError,
                  lambda: impl.double_quantize(absmax, rounding="round"), "rounding")
    expect_raises("double_quantize(blocksize=100)", ValueError,
                  lambda: impl.double_quantize(absmax, blocksize=100), "blocksize")
    expect_raises("double_quantize of int constants", TypeError,
                  lambda: impl.double_quantize(torch.ones(300, dtype=torch.int64)), "absmax")
    codes, offset, absmax2 = impl.double_quantize(absmax)
    expect_raises("double_dequantize with absmax2 of the wrong length", ValueError,
                  lambda: impl.double_dequantize(codes, offset, absmax2[:1]), "absmax2")


@case("bits_per_param", "double_quant_savings_bytes", "quantized_linear_params",
      hint="4 + 32/64 without double quantization; 4 + 8/64 + 32/(64*256) with it")
def storage_arithmetic(impl):
    """4.5 vs 4.127 bits/param; LLaMA-1 65B's linears; ~3 GB saved on 65B (the QLoRA paper's figure)."""
    plain = impl.bits_per_param(64, double_quant=False)
    expect_true(plain == 4.5, "bits_per_param without double quantization", 4.5, plain)
    with_dq = impl.bits_per_param(64, double_quant=True, blocksize2=256)
    expect_true(math.isclose(with_dq, 4 + 8 / 64 + 32 / (64 * 256)) and round(with_dq, 3) == 4.127,
                "bits_per_param with double quantization", 4.126953125, with_dq)
    n65 = 80 * (4 * 8192**2 + 3 * 8192 * 22016)  # 80 layers of q, k, v, o (h x h) and gate, up, down (h x i)
    expect_true(impl.quantized_linear_params("65B") == n65, "quantized_linear_params('65B')", n65,
                impl.quantized_linear_params("65B"))
    saved = impl.double_quant_savings_bytes(n65)
    expect_true(math.isclose(saved, n65 * 0.373046875 / 8) and 2.9e9 < saved < 3.1e9,
                "double_quant_savings_bytes for 65B (about 3 GB)", n65 * 0.373046875 / 8, saved)


# ----------------------------------------------------------------- the re-implementations the mistakes switch
# Each mistake above is this chapter's function re-implemented with one thing changed; with every switch off the
# re-implementation passes the battery (tests check that control), so a failure is the mistake's own.


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


def _double_quantize(absmax, blocksize=256, rounding="grid", *, centre=True, float64_mean=False,
                     whole_tensor=False, divide=False, grid_float64=False, unsigned=False, force=None,
                     pad_first=False, clamp_absmax2=False, keep_nan=False, nearest_keeps_nan=False):
    """The reference ``double_quantize`` (with its argument checks) and one switch per mistake."""
    check_double_quantize_args(absmax, blocksize, rounding)
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
        codes = torch.bucketize(scaled if nearest_keeps_nan else scaled.nan_to_num(0.0), (code[:-1] + code[1:]) / 2)
    return codes.flatten()[:m].to(torch.uint8), offset, absmax2


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


# An equivalent mistake, not listed above (it gives the same outputs on every input, so no case can catch it):
# the grid index as (v + 1) * 32767.5 + 0.5 instead of (v + 1) * 0.5 * 65535 + 0.5: multiplying by 0.5 is exact
# in float32, so both products round the same real number once.
