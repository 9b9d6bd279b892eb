"""Chapter 2, the NF4 data type: the chapter's battery (qlora_edu/ch02_nf4/checks.py) on the package and on the
solution notebook, its known mistakes caught, and the broad parity sweeps of the code tables, packing and
quantize_4bit / dequantize_4bit against bitsandbytes 0.50.2 on CPU, with property tests and bad input.

The 4-bit tests run twice: on the lesson's one-pass functions (qlora_edu.ch02_nf4.quant4bit) and on the fast ones that
quantize_nf4 / dequantize_nf4 use (qlora_edu.ch02_nf4.fast4bit). The `gpu` tests check that the same functions give the
same bytes and values on CUDA; they need only torch, bitsandbytes, pytest and hypothesis (`make test-gpu`)."""

from __future__ import annotations

import importlib
import logging
import math
import threading

import pytest
import torch
from chapter_battery import battery_tests, control_passes
from hypothesis import given
from hypothesis import strategies as st

from qlora_edu import (
    absmax_quantize,
    dequantize_4bit,
    dequantize_nf4,
    fp4_code,
    int4_code,
    nf4_code,
    pack_4bit,
    quantize_4bit,
    unpack_4bit,
)
from qlora_edu.ch02_nf4 import fast4bit
from qlora_edu.ch02_nf4.fast4bit import dequantize_4bit_fast, quantize_4bit_fast
from qlora_edu.checks import property_settings

checks = importlib.import_module("qlora_edu.ch02_nf4.checks")
NF4_TABLE, FP4_MAGNITUDES = checks.NF4_TABLE, checks.FP4_MAGNITUDES

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # no warning about the optional `kernels` package
bnbf = pytest.importorskip("bitsandbytes.functional")

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("02_nf4")


@pytest.mark.parametrize("name", ["nf4_code", "quantize_4bit", "dequantize_4bit"])
def test_the_mistakes_pass_with_every_switch_off(name):
    """The control: the re-implementations the mistakes are built from pass the battery with no mistake on."""
    p_pos, p_neg = torch.linspace(checks.NF4_OFFSET, 0.5, 9)[:-1], torch.linspace(checks.NF4_OFFSET, 0.5, 8)[:-1]
    fn = {
        "nf4_code": lambda: checks._nf4_from(p_pos, p_neg),
        "quantize_4bit": lambda x, code, blocksize=64: checks._quantize(x, code, blocksize),
        "dequantize_4bit": lambda packed, absmax, code, shape, blocksize=64, dtype=torch.float32: checks._dequantize(
            packed, absmax, code, shape, blocksize, dtype),
    }[name]
    assert control_passes(name, fn)

FAST = property_settings(40)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
CODES = {"nf4": nf4_code, "fp4": fp4_code}
# 1-D, odd counts, a single partial block, sizes not divisible by the block size, 3-D, exact multiples.
SHAPES = [(1,), (7,), (64,), (1001,), (3, 37), (5, 3, 33), (2, 4097), (16, 256), (300, 70)]


# the lesson's functions and the fast ones behind quantize_nf4 / dequantize_nf4: the same contract
QUANTIZERS = [pytest.param(quantize_4bit, id="lesson"), pytest.param(quantize_4bit_fast, id="fast")]
DEQUANTIZERS = [pytest.param(dequantize_4bit, id="lesson"), pytest.param(dequantize_4bit_fast, id="fast")]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def sample(shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed magnitudes so that blocks differ a lot in scale
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    return x.to(dtype)


def bnb_quantize(x, blocksize, quant_type):
    return bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)


def float64_dequant(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, blocksize, dtype):
    """Independent reference: unpack by hand, exact float64 product, one float32 rounding, then the cast."""
    n = math.prod(shape)
    b = packed.flatten().long()
    q = torch.stack([b >> 4, b & 15], dim=1).flatten()[:n]
    exact = code.double()[q] * absmax.double().repeat_interleave(blocksize)[:n]
    return exact.float().to(dtype).view(shape)


# ------------------------------------------------------------------------------------------ tables


def test_nf4_code_is_bit_identical_to_bitsandbytes():
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(bits(code), bits(bnbf.get_4bit_type("nf4", device="cpu")))
    assert torch.equal(bits(code), bits(torch.tensor(NF4_TABLE, dtype=torch.float32)))
    assert float(code[7]) == 0.0 and (code[:7] < 0).all() and (code[8:] > 0).all()


def test_nf4_code_matches_create_normal_map_and_float64_does_not():
    # bitsandbytes' own constructor (scipy; 7 negatives, 241 padding zeros, 8 positives) agrees exactly ...
    normal = bnbf.create_normal_map().sort().values
    assert torch.equal(bits(nf4_code()), bits(torch.cat([normal[:7], torch.zeros(1), normal[-8:]])))
    # ... while building the probabilities in float64 moves entries by ~1e-7 (the facts: up to 1.2e-7).
    p_pos = torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1]
    zero = torch.zeros(1, dtype=torch.float64)
    v = torch.cat([-torch.special.ndtri(p_neg), zero, torch.special.ndtri(p_pos)])
    v = v.sort().values / v.max()
    err = (v - nf4_code().double()).abs().max().item()
    assert 0 < err <= 1.2e-7


def test_nf4_offset_formula():
    assert abs((1 - (1 / 30 + 1 / 32) / 2) - 0.9677083) < 1e-7


def test_fp4_code_is_bit_identical_to_bitsandbytes():
    code = fp4_code()
    assert torch.equal(bits(code), bits(bnbf.get_4bit_type("fp4", device="cpu")))
    assert bits(code)[8] == 0  # +0.0, not -0.0
    assert torch.equal(code[:8] * 12, torch.tensor(FP4_MAGNITUDES))


def test_int4_code_is_uniform_and_matches_chapter_1():
    code = int4_code()
    assert torch.equal(code, torch.arange(-8, 8, dtype=torch.float32) / 7)
    # Chapter 1's 4-bit absmax codes, shifted by 8, are what the int4 table gives (up to rounding of ties
    # and float32 details at exact midpoints, which random data does not hit).
    x = sample((64, 96), torch.float32, seed=5)
    packed, _ = quantize_4bit(x, code, blocksize=64)
    codes1, _ = absmax_quantize(x, bits=4, blocksize=64)
    q = unpack_4bit(packed, x.numel()).long() - 8
    assert (q != codes1.flatten().long()).float().mean() < 1e-3
    assert q.min() >= -7  # index 0 (-8/7) is never chosen


# ------------------------------------------------------------------------------------------ packing


def test_pack_layout_first_element_in_high_nibble():
    assert pack_4bit(torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8), pad=7).tolist() == [0x12, 0x34, 0x57]
    assert pack_4bit(torch.tensor([1, 2, 3], dtype=torch.uint8)).tolist() == [0x12, 0x30]


@FAST
@given(st.lists(st.integers(0, 15), min_size=1, max_size=300), st.integers(0, 15))
def test_pack_unpack_round_trip(values, pad):
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_4bit(codes, pad=pad)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(len(values) / 2),)
    assert unpack_4bit(packed, len(values)).tolist() == values
    if len(values) % 2:
        assert int(packed[-1]) & 15 == pad


@pytest.mark.parametrize("call, error, name", [
    (lambda: pack_4bit(torch.tensor([1, 2], dtype=torch.int64)), TypeError, "codes"),
    (lambda: pack_4bit(torch.tensor([1, 16], dtype=torch.uint8)), ValueError, "codes"),
    (lambda: pack_4bit(torch.tensor([1], dtype=torch.uint8), pad=16), ValueError, "pad"),
    (lambda: unpack_4bit(torch.tensor([1, 2], dtype=torch.int8), 4), TypeError, "packed"),
    (lambda: unpack_4bit(torch.tensor([1, 2], dtype=torch.uint8), 5), ValueError, "packed"),
    (lambda: unpack_4bit(torch.tensor([1, 2], dtype=torch.uint8), 0), ValueError, "numel"),
], ids=["int64-codes", "code-16", "pad-16", "int8-packed", "numel-too-big", "numel-0"])
def test_packing_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# ------------------------------------------------------------------------------------------ quantize_4bit


@pytest.mark.parametrize("quantize", QUANTIZERS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_4bit_matches_bitsandbytes(dtype, blocksize, quant_type, quantize):
    for i, shape in enumerate(SHAPES):
        x = sample(shape, dtype, seed=1000 * i + blocksize)
        expected, state = bnb_quantize(x, blocksize, quant_type)
        packed, absmax = quantize(x, CODES[quant_type](), blocksize)
        assert packed.shape == (math.ceil(x.numel() / 2), 1) and packed.dtype == torch.uint8
        assert torch.equal(absmax, state.absmax), shape
        assert torch.equal(packed, expected), shape


@pytest.mark.parametrize("quantize", QUANTIZERS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", [
    "all-zero", "zero-full-block", "zero-partial-block", "subnormal-partial-block", "subnormal-full-block",
    "huge", "fp16-max", "plus-minus-absmax", "tiny-around-zero",
])
def test_quantize_4bit_special_values_match_bitsandbytes(case, quant_type, quantize):
    dtype = torch.float32
    if case == "all-zero":
        x = torch.zeros(3, 50)
    elif case == "zero-full-block":
        x = sample((3, 50), dtype, 1)
        x.view(-1)[64:128] = 0
    elif case == "zero-partial-block":  # bitsandbytes stores the clamped absmax 1e-38 for it
        x = sample((3, 50), dtype, 2)
        x.view(-1)[128:] = 0
    elif case == "subnormal-partial-block":
        x = torch.tensor([1.0] * 64 + [1e-39, -3e-39, 2e-39])
    elif case == "subnormal-full-block":
        x = torch.cat([torch.linspace(-1e-39, 1e-39, 64), torch.linspace(-1, 1, 64)])
    elif case == "huge":
        x = sample((3, 50), dtype, 3) * 1e30
    elif case == "fp16-max":
        x = (sample((3, 50), dtype, 4).clamp(-1, 1) * 65504).to(torch.float16)
    elif case == "plus-minus-absmax":
        x = sample((4, 64), dtype, 5)
        x[:, 0], x[:, 1] = 7.0, -7.0
    else:  # values just either side of 0: FP4 gives (-0.0026, 0] code 0 and (0, 0.0026] code 8
        x = torch.tensor([1.0, 1e-4, -1e-4, 0.0, 2e-3, -2e-3, 1e-10] * 10)
    expected, state = bnb_quantize(x, 64, quant_type)
    packed, absmax = quantize(x, CODES[quant_type](), 64)
    assert torch.equal(bits(absmax), bits(state.absmax))
    assert torch.equal(packed, expected)


def test_zero_blocks_get_the_code_of_zero_and_the_partial_absmax_is_clamped():
    x = torch.zeros(64 + 11)
    packed, absmax = quantize_4bit(x, nf4_code(), 64)
    assert absmax[0] == 0 and absmax[1] == torch.tensor(1e-38, dtype=torch.float32)
    assert set(unpack_4bit(packed.flatten(), x.numel()).tolist()) == {7}
    assert int(packed[-1]) == 0x77  # odd count: padded with the code of 0.0


def test_ties_go_to_the_lower_code_for_every_table():
    for code in (nf4_code(), fp4_code(), int4_code()):
        s = code.sort().values
        mids = (s[:-1] + s[1:]) / 2
        x = torch.cat([torch.tensor([1.0]), mids[(mids > -1) & (mids < 1)]])
        packed, _ = quantize_4bit(x, code, 32)
        got = code[unpack_4bit(packed, x.numel()).long()][1:]
        lower = s[:-1][(mids > -1) & (mids < 1)]
        assert torch.equal(got, lower)


def test_float64_input_is_quantized_as_float32():
    x = sample((3, 50), torch.float64, 6)
    (p64, a64), (p32, a32) = quantize_4bit(x, nf4_code()), quantize_4bit(x.float(), nf4_code())
    assert torch.equal(p64, p32) and torch.equal(a64, a32)


# ------------------------------------------------------------------------------------------ dequantize_4bit


def bnb_dequant_is_wrong_for(shape, blocksize) -> bool:
    """bitsandbytes 0.50.2 on AVX512: >1 row, last dim a multiple of 16 but not of blocksize, blocksize
    < 2048."""
    rows = math.prod(shape[:-1])
    return rows > 1 and shape[-1] % 16 == 0 and shape[-1] % blocksize != 0 and blocksize < 2048


DEQUANT_CASES = [
    # (shape, blocksize): the C++ kernel (even last dim, blocksize < 2048) ...
    ((3, 38), 64), ((1000,), 128), ((5, 50), 32), ((2, 300), 256), ((16, 256), 64), ((130,), 64),
    ((8, 4096), 1024),
    # ... and bitsandbytes' torch.compile'd fallback (odd last dim, or blocksize >= 2048): a few, they compile
    ((3, 37), 64), ((4, 96), 2048), ((5, 3, 33), 4096),
]


@pytest.mark.parametrize("dequantize", DEQUANTIZERS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocksize", DEQUANT_CASES, ids=lambda v: str(v))
def test_dequantize_4bit_matches_bitsandbytes(shape, blocksize, dtype, quant_type, dequantize):
    assert not bnb_dequant_is_wrong_for(shape, blocksize)
    x = sample(shape, dtype, seed=blocksize + len(shape))
    packed, state = bnb_quantize(x, blocksize, quant_type)
    expected = bnbf.dequantize_4bit(packed, state).reshape(shape)  # 1-D comes back as (1, n)
    got = dequantize(packed, state.absmax, CODES[quant_type](), shape, blocksize, dtype)
    assert got.shape == shape and got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dequantize", DEQUANTIZERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocksize", [
    # bitsandbytes 0.50.2 on AVX512 CPUs dequantizes these wrongly (errors up to ~2): our reference is float64
    pytest.param((4, 96), 64, id="bnb-avx512-bug-4x96-bs64"),
    pytest.param((64, 2064), 64, id="bnb-avx512-bug-64x2064-bs64"),
    pytest.param((3, 48), 32, id="bnb-avx512-bug-3x48-bs32"),
    pytest.param((2, 1040), 1024, id="bnb-avx512-bug-2x1040-bs1024"),
])
def test_dequantize_4bit_bug_shapes_against_float64_reference(shape, blocksize, dtype, dequantize):
    assert bnb_dequant_is_wrong_for(shape, blocksize)
    x = sample(shape, dtype, seed=17)
    packed, absmax = quantize_4bit(x, nf4_code(), blocksize)
    expected = float64_dequant(packed, absmax, nf4_code(), shape, blocksize, dtype)
    assert torch.equal(dequantize(packed, absmax, nf4_code(), shape, blocksize, dtype), expected)


@FAST
@given(st.integers(1, 3000), st.sampled_from(BLOCKSIZES), st.sampled_from(DTYPES), st.integers(0, 2**31 - 1))
def test_dequantize_4bit_float64_reference_and_error_bound(n, blocksize, dtype, seed):
    x = sample((n,), dtype, seed)
    code = nf4_code()
    packed, absmax = quantize_4bit(x, code, blocksize)
    y = dequantize_4bit(packed, absmax, code, (n,), blocksize, dtype)
    assert torch.equal(y, float64_dequant(packed, absmax, code, (n,), blocksize, dtype))
    # every element is within half of NF4's widest gap (-1 to -0.6962) of its block's absmax, plus the cast
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    per_element = absmax.repeat_interleave(blocksize)[:n]
    err = (y.double() - x.double()).abs()
    eps = torch.finfo(dtype).eps
    assert bool((err <= per_element.double() * (half_gap + 2 * eps) + 1e-30).all())


BYTES5 = torch.zeros(5, dtype=torch.uint8)  # 10 codes


@pytest.mark.parametrize("call, error, name", [
    (lambda c: quantize_4bit(torch.ones(10, dtype=torch.int32), c), TypeError, "x"),
    (lambda c: quantize_4bit([1.0, 2.0], c), TypeError, "x"),
    (lambda c: quantize_4bit(torch.empty(0), c), ValueError, "x"),
    (lambda c: quantize_4bit(torch.tensor([1.0, float("nan")]), c), ValueError, "x"),
    (lambda c: quantize_4bit(torch.tensor([1.0, float("inf")] * 40), c), ValueError, "x"),
    (lambda c: quantize_4bit(torch.ones(10), c[:15]), ValueError, "code"),
    (lambda c: quantize_4bit(torch.ones(10), c.double()), TypeError, "code"),
    (lambda c: quantize_4bit(torch.ones(10), c + 2), ValueError, "code"),
    (lambda c: quantize_4bit(torch.ones(10), c, blocksize=48), ValueError, "blocksize"),
    (lambda c: quantize_4bit(torch.ones(10), c, blocksize=16), ValueError, "blocksize"),
    (lambda c: quantize_4bit(torch.ones(10), c, blocksize=8192), ValueError, "blocksize"),
    (lambda c: quantize_4bit(torch.ones(10), c, blocksize=64.0), TypeError, "blocksize"),
    (lambda c: dequantize_4bit(torch.zeros(5, dtype=torch.int8), torch.ones(1), c, (10,)), TypeError,
     "packed"),
    (lambda c: dequantize_4bit(BYTES5, torch.ones(1), c, (11, 1)), ValueError, "packed"),
    (lambda c: dequantize_4bit(BYTES5, torch.ones(2), c, (10,)), ValueError, "absmax"),
    (lambda c: dequantize_4bit(BYTES5, torch.ones(1).double(), c, (10,)), TypeError, "absmax"),
    (lambda c: dequantize_4bit(BYTES5, torch.ones(1), c, 10), TypeError, "shape"),
    (lambda c: dequantize_4bit(BYTES5, torch.ones(1), c, (10,), dtype=torch.int8), ValueError, "dtype"),
    (lambda c: dequantize_nf4("not a tensor"), TypeError, "t"),
], ids=["int-x", "list-x", "empty-x", "nan-x", "inf-x", "15-codes", "float64-code", "code-without-0",
        "blocksize-48", "blocksize-16", "blocksize-8192", "float-blocksize", "int8-packed", "numel-vs-packed",
        "absmax-length", "float64-absmax", "int-shape", "int-dtype", "not-nf4tensor"])
@pytest.mark.parametrize("fast", [False, True], ids=["lesson", "fast"])
def test_bad_input_names_the_argument(call, error, name, fast, monkeypatch):
    if fast:  # the same calls, routed to the sliced functions
        monkeypatch.setitem(call.__globals__, "quantize_4bit", quantize_4bit_fast)
        monkeypatch.setitem(call.__globals__, "dequantize_4bit", dequantize_4bit_fast)
    with pytest.raises(error, match=name):
        call(nf4_code())


# ------------------------------------------------------------------------------------------ slicing


@pytest.mark.parametrize("threads", [1, 2])
def test_fast_results_do_not_depend_on_threads_or_slice_size(threads, monkeypatch):
    x = sample((300, 1000), torch.bfloat16, seed=31)
    expected, state = bnb_quantize(x, 64, "nf4")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for elements in (1 << 12, 1 << 18, 1 << 22):
            monkeypatch.setattr(fast4bit, "SLICE_ELEMENTS", elements)
            packed, absmax = quantize_4bit_fast(x, nf4_code(), 64)
            assert torch.equal(packed, expected) and torch.equal(absmax, state.absmax)
            y = dequantize_4bit_fast(packed, absmax, nf4_code(), x.shape, 64, torch.bfloat16)
            assert torch.equal(y, bnbf.dequantize_4bit(expected, state))
    finally:
        torch.set_num_threads(previous)


@FAST
@given(st.integers(1, 5000), st.sampled_from(BLOCKSIZES), st.sampled_from(DTYPES), st.sampled_from(["nf4", "fp4"]),
       st.sampled_from([1, 64, 100, 1 << 12]), st.integers(0, 2**31 - 1))
def test_fast_equals_lesson_over_many_slices(n, blocksize, dtype, quant_type, slice_elements, seed):
    """Slices of whole blocks (at least one), the last one partial or odd: the same bytes and values."""
    x = sample((n,), dtype, seed)
    code = CODES[quant_type]()
    previous = fast4bit.SLICE_ELEMENTS
    fast4bit.SLICE_ELEMENTS = slice_elements  # (hypothesis runs examples in one test call: no monkeypatch)
    try:
        packed, absmax = quantize_4bit_fast(x, code, blocksize)
        y = dequantize_4bit_fast(packed, absmax, code, (n,), blocksize, dtype)
    finally:
        fast4bit.SLICE_ELEMENTS = previous
    expected_packed, expected_absmax = quantize_4bit(x, code, blocksize)
    assert torch.equal(packed, expected_packed) and torch.equal(bits(absmax), bits(expected_absmax))
    assert torch.equal(y, dequantize_4bit(packed, absmax, code, (n,), blocksize, dtype))


def test_fast_quantize_counts_nan_in_the_whole_tensor(monkeypatch):
    monkeypatch.setattr(fast4bit, "SLICE_ELEMENTS", 64)
    x = torch.ones(64 * 10)
    x[[3, 200, 500]] = float("nan")  # three slices
    with pytest.raises(ValueError, match=r"x must be finite: it holds 3 NaN"):
        quantize_4bit_fast(x, nf4_code())


def test_the_fast_path_leaves_no_process_wide_state():
    """No thread count changed, no thread left running, nothing kept between calls."""
    threads, alive = torch.get_num_threads(), threading.active_count()
    x = sample((1024, 1024), torch.bfloat16, seed=5)
    packed, absmax = quantize_4bit_fast(x, nf4_code())
    dequantize_4bit_fast(packed, absmax, nf4_code(), x.shape, 64, torch.bfloat16)
    assert torch.get_num_threads() == threads and threading.active_count() == alive
    assert not [name for name in vars(fast4bit) if name.startswith("_") and name.isupper()]  # no module-level state


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_cuda_path_computes_the_lesson_values(compiled):
    """The function CUDA runs under torch.compile, checked here on the CPU (inductor compiles for the CPU too):
    the same values as the lesson's dequantize_4bit, eager and compiled, for odd counts and partial blocks."""
    fn = fast4bit._compiled_lookup_multiply() if compiled else fast4bit._lookup_multiply
    for shape, dtype in [((300, 70), torch.bfloat16), ((7,), torch.float16), ((64, 128), torch.float32)]:
        x = sample(shape, dtype, seed=3)
        packed, absmax = quantize_4bit(x, nf4_code())
        expected = dequantize_4bit(packed, absmax, nf4_code(), shape, 64, dtype)
        got = fn(packed.reshape(-1), absmax, nf4_code(), x.numel(), 64, dtype).view(shape)
        assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1536, 576), (3, 37), (1001,)], ids=str)
def test_cuda_gives_the_cpu_bytes_and_values(shape, quant_type):
    x = sample(shape, torch.bfloat16, seed=41)
    code = CODES[quant_type]()
    cpu_packed, cpu_absmax = quantize_4bit(x, code)
    for quantize in (quantize_4bit, quantize_4bit_fast):
        packed, absmax = quantize(x.cuda(), code)
        assert packed.is_cuda and absmax.is_cuda
        assert torch.equal(packed.cpu(), cpu_packed) and torch.equal(bits(absmax.cpu()), bits(cpu_absmax))
    expected = dequantize_4bit(cpu_packed, cpu_absmax, code, shape, 64, torch.bfloat16)
    for dequantize in (dequantize_4bit, dequantize_4bit_fast):
        y = dequantize(cpu_packed.cuda(), cpu_absmax.cuda(), code, shape, 64, torch.bfloat16)
        assert y.is_cuda and torch.equal(y.cpu(), expected)


@pytest.mark.gpu
def test_cuda_dequantize_equals_bitsandbytes_kernel():
    x = sample((4096, 4096), torch.bfloat16, seed=43).cuda()
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = dequantize_4bit_fast(packed, state.absmax, nf4_code(), x.shape, 64, torch.bfloat16)
    assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))
