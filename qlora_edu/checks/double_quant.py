"""Battery for chapter 3: the dynamic map, ``double_quantize`` / ``double_dequantize``, NF4 + double
quantization as QLoRA stores it, and the storage arithmetic.

Expected values come from bitsandbytes 0.50.2 (its dynamic map and the quantization state of
``quantize_4bit(..., compress_statistics=True)`` on CPU), from a brute-force float64 nearest-code search
written here, and from the bit-count formulas of the QLoRA paper; never from ``qlora_edu``.
"""

from __future__ import annotations

import math

import torch

from qlora_edu.checks import CheckFailure, case, expect_close, expect_equal, expect_raises, expect_true
from qlora_edu.checks.nf4 import bits, bnb_functional, expect_same_bytes


def _weights(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)  # weight-like scale


def _bnb_state(x: torch.Tensor, blocksize: int = 64):
    """bitsandbytes' NF4 + double quantization of x: (packed, first-level absmax, quant state)."""
    bnbf = bnb_functional()
    _, plain = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    packed, state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
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


@case("double_quantize", hint="a block whose constants all equal the mean has absmax2 = 0: store 0 (no clamp); "
      "its scaled values 0 * (1 / 0) are NaN, which bitsandbytes' grid snap sends to grid point 0 (code 0)")
def double_quantize_constant_block(impl):
    """Blocks of 256 constants all equal to the mean (an all-zero weight, or a run of equal constants): absmax2
    is 0 and the codes are bitsandbytes' (grid point 0); rounding='nearest' must not fail on them either."""
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
        read_back = table[codes.long()] * absmax2.repeat_interleave(256)[:300] + offset
        expect_equal(f"{label} read back from rounding='nearest' codes (any code times absmax2 = 0 is 0)",
                     read_back[:256], torch.full((256,), float(offset)))


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
