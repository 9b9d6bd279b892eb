"""Chapter 3, double quantization: the chapter's battery (qlora_edu/ch03_double_quant/checks.py) on the package and
on the solution notebook, its known mistakes caught, and the parity sweeps against bitsandbytes 0.50.2 on CPU:
the dynamic map, the 65536-point grid rounding, codes / offset / absmax2 of compress_statistics=True,
dequantization, the grid-vs-nearest rate, bad input; NF4Tensor; the storage arithmetic
(qlora_edu.ch03_double_quant.storage).
The `gpu` tests check NF4 storage on CUDA against the CPU and against bitsandbytes' CUDA kernel."""

from __future__ import annotations

import importlib
import logging
import math

import pytest
import torch
from chapter_battery import battery_tests, control_passes
from hypothesis import given
from hypothesis import strategies as st

from qlora_edu import (
    LLAMA_SHAPES,
    NF4Tensor,
    bits_per_param,
    dequantize_4bit,
    dequantize_nf4,
    double_dequantize,
    double_quant_savings_bytes,
    double_quantize,
    dynamic_map,
    nf4_code,
    quantize_4bit,
    quantize_nf4,
    quantized_bytes,
    quantized_linear_params,
    rounding_mismatch_rate,
    total_params,
)
from qlora_edu.ch03_double_quant.double_quant import grid_lookup_table
from qlora_edu.ch03_double_quant.storage import GB, LlamaShape
from qlora_edu.checks import property_settings

checks = importlib.import_module("qlora_edu.ch03_double_quant.checks")

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # no warning about the optional `kernels` package
bnbf = pytest.importorskip("bitsandbytes.functional")

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("03_double_quant")


@pytest.mark.parametrize("name", ["dynamic_map", "double_quantize", "double_dequantize"])
def test_the_mistakes_pass_with_every_switch_off(name):
    """The control: the re-implementations the mistakes are built from pass the battery with no mistake on."""
    fn = {
        "dynamic_map": lambda signed=True: checks._dynamic_map(signed),
        "double_quantize": lambda absmax, blocksize=256, rounding="grid": checks._double_quantize(
            absmax, blocksize, rounding),
        "double_dequantize": lambda codes, offset, absmax2, blocksize=256: checks._double_dequantize(
            codes, offset, absmax2, blocksize),
    }[name]
    assert control_passes(name, fn)

FAST = property_settings(30)


def bnb_double_quantize(absmax: torch.Tensor, blocksize: int = 256):
    """What bitsandbytes.functional.quantize_4bit(compress_statistics=True) does with the constants."""
    offset = absmax.mean()
    codes, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=blocksize)
    return codes, offset, state2.absmax


def constants(kind: str, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian-weights":  # the absmax of Gaussian weights, blocksize 64
        _, a = quantize_4bit(torch.randn(m * 64, generator=g) * 0.02, nf4_code(), 64)
        return a
    if kind == "lognormal":
        return torch.exp(torch.randn(m, generator=g) * 2)
    if kind == "dense-shuffled":  # dense in [0, 2]: every grid-cell boundary has values within ~1e-6
        return torch.linspace(0, 2, m)[torch.randperm(m, generator=g)]
    if kind == "all-equal":  # centred values all 0: absmax2 = 0
        return torch.full((m,), 0.75)
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------ dynamic map


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bit_identical(signed):
    got = dynamic_map(signed)
    expected = bnbf.create_dynamic_map(signed=signed)
    assert got.dtype == torch.float32 and got.shape == (256,)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


def test_dynamic_map_structure():
    m = dynamic_map(True)
    assert m[127] == 0 and m[255] == 1 and abs(float(m[0]) + 0.99297) < 1e-5
    # 127 magnitudes a sign: 2**i of them between 10**(i-6) * 0.1 and 10**(i-6) for i = 0..6
    positive = m[(m > 0) & (m < 1)]
    for i in range(7):
        lo, hi = 0.1 * 10.0 ** (i - 6), 10.0 ** (i - 6)
        assert int(((positive > lo) & (positive < hi)).sum()) == 2**i
    assert torch.equal(-m[:127].flip(0), positive)
    u = dynamic_map(False)
    assert u[0] == 0 and u[255] == 1 and bool((u[1:] > u[:-1]).all())


# ------------------------------------------------------------------------------------------ grid rounding


def test_grid_lookup_table_matches_bitsandbytes_on_all_65536_grid_points():
    # One probe per grid point g: a value that snaps to g, in blocks whose absmax is 1 (first element).
    g = torch.arange(65536)
    probes = (g.double() * 2 / 65535 - 1).float()
    snapped = (((probes + 1) * 0.5) * 65535 + 0.5).to(torch.int64)
    assert torch.equal(snapped, g)
    rows = -(-65536 // 255)
    body = torch.nn.functional.pad(probes, (0, rows * 255 - 65536)).view(rows, 255)
    blocks = torch.cat([torch.ones(rows, 1), body], dim=1)
    signed_map = bnbf.create_dynamic_map(signed=True)
    codes, state = bnbf.quantize_blockwise(blocks.flatten(), code=signed_map, blocksize=256)
    assert bool((state.absmax == 1).all())
    expected = codes.view(rows, 256)[:, 1:].flatten()[:65536].to(torch.int32)
    assert torch.equal(grid_lookup_table(dynamic_map(True)), expected)


@pytest.mark.parametrize("kind, m", [
    ("gaussian-weights", 4096 + 3), ("lognormal", 1000), ("dense-shuffled", 1 << 20), ("all-equal", 300),
    ("lognormal", 1), ("lognormal", 2), ("lognormal", 255), ("lognormal", 256), ("lognormal", 257),
])
def test_double_quantize_matches_bitsandbytes(kind, m):
    absmax = constants(kind, m)
    codes, offset, absmax2 = double_quantize(absmax)
    e_codes, e_offset, e_absmax2 = bnb_double_quantize(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == (m,)
    assert torch.equal(offset, e_offset)
    assert torch.equal(absmax2, e_absmax2)
    assert torch.equal(codes, e_codes)


@pytest.mark.parametrize("blocksize", [32, 64, 1024, 4096])
def test_double_quantize_other_blocksizes_match_bitsandbytes(blocksize):
    absmax = constants("gaussian-weights", 5000, seed=blocksize)
    codes, offset, absmax2 = double_quantize(absmax, blocksize=blocksize)
    e_codes, e_offset, e_absmax2 = bnb_double_quantize(absmax, blocksize)
    assert torch.equal(offset, e_offset) and torch.equal(absmax2, e_absmax2) and torch.equal(codes, e_codes)


def test_all_equal_constants_give_code_0_with_grid_and_127_with_nearest():
    absmax = constants("all-equal", 300)
    grid, offset, absmax2 = double_quantize(absmax, rounding="grid")
    nearest, _, _ = double_quantize(absmax, rounding="nearest")
    assert bool((absmax2 == 0).all()) and bool((grid == 0).all()) and bool((nearest == 127).all())
    for codes in (grid, nearest):
        assert torch.equal(double_dequantize(codes, offset, absmax2), absmax)


@pytest.mark.parametrize("kind", ["gaussian-weights", "lognormal", "dense-shuffled"])
def test_nearest_rounding_is_exactly_nearest(kind):
    absmax = constants(kind, 20000, seed=1)
    codes, offset, absmax2 = double_quantize(absmax, rounding="nearest")
    table = bnbf.create_dynamic_map(signed=True).double()
    centred = torch.nn.functional.pad(absmax - offset, (0, (-absmax.numel()) % 256))
    scaled = (centred.view(-1, 256) * (1 / absmax2)[:, None]).flatten()[: absmax.numel()]
    best = (scaled.double()[:, None] - table[None, :]).abs().argmin(dim=1)  # first (lower) index on ties
    assert torch.equal(codes.long(), best)


def test_grid_vs_nearest_mismatch_rate_is_small():
    # The facts: about 0.15% of the constants. Measured here: ~0.18% for float32 Gaussian weights.
    absmax = constants("gaussian-weights", 32768)
    rate = rounding_mismatch_rate(absmax)
    assert 0.0005 < rate < 0.004
    grid, offset, absmax2 = double_quantize(absmax, rounding="grid")
    nearest, _, _ = double_quantize(absmax, rounding="nearest")
    assert abs(float((grid != nearest).float().mean()) - rate) < 1e-12
    # Near 0 the map's codes are closer together than a grid cell (2/65535), so the two can be several
    # codes apart there; but the grid's error is never worse than the nearest code's by more than a cell.
    table = dynamic_map(True).double()
    scaled = ((absmax - offset).view(-1, 256) * (1 / absmax2)[:, None]).flatten().double()
    err_grid = (table[grid.long()] - scaled).abs()
    err_nearest = (table[nearest.long()] - scaled).abs()
    assert bool((err_grid <= err_nearest + 2 / 65535 + 1e-9).all())


def test_seven_codes_around_zero_are_unreachable_on_the_cpu_grid():
    # The grid has 65535 cells, so no grid point sits at 0: the points nearest 0 are +-1/65535 = +-1.5e-5,
    # whose nearest codes are +-2.1e-5 (indices 123 and 131). The 7 codes in between, |v| < 1e-5 and
    # 0.0 itself (index 127), are never produced by bitsandbytes' CPU kernel.
    reachable = set(grid_lookup_table(dynamic_map(True)).unique().tolist())
    assert sorted(set(range(256)) - reachable) == [124, 125, 126, 127, 128, 129, 130]


# ------------------------------------------------------------------------------------------ dequantize


@pytest.mark.parametrize("kind, m", [("gaussian-weights", 4099), ("lognormal", 257), ("all-equal", 300)])
def test_double_dequantize_matches_bitsandbytes(kind, m):
    absmax = constants(kind, m)
    codes, state2 = bnbf.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    offset = absmax.mean()
    expected = bnbf.dequantize_blockwise(codes, state2) + offset
    assert torch.equal(double_dequantize(codes, offset, state2.absmax), expected)
    assert torch.equal(double_dequantize(codes, float(offset), state2.absmax), expected)


@FAST
@given(st.integers(1, 2000), st.sampled_from(["grid", "nearest"]), st.integers(0, 2**31 - 1))
def test_double_dequantize_error_is_within_half_a_step(m, rounding, seed):
    absmax = constants("lognormal", m, seed)
    codes, offset, absmax2 = double_quantize(absmax, rounding=rounding)
    back = double_dequantize(codes, offset, absmax2)
    # the widest step of the signed map is 0.9/64 (its top decade); the grid can add one grid cell
    step = 0.9 / 64 / 2 + (2 / 65535 if rounding == "grid" else 0)
    per_constant = absmax2.repeat_interleave(256)[:m].double()
    assert bool(((back.double() - absmax.double()).abs() <= per_constant * step * 1.001 + 1e-6).all())


# ------------------------------------------------------------------------------------------ quantize_nf4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, blocksize", [
    ((300, 70), 64), ((64, 1024), 64), ((33, 18), 32), ((1000,), 128), ((16, 4096), 256), ((4096,), 64),
], ids=str)
def test_quantize_nf4_matches_bitsandbytes_compress_statistics(shape, blocksize, dtype):
    g = torch.Generator().manual_seed(blocksize)
    x = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    packed, state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    t = quantize_nf4(x, blocksize=blocksize)
    assert t.double_quant and t.blocksize2 == 256
    assert torch.equal(t.packed, packed)
    assert torch.equal(t.absmax, state.absmax)
    assert torch.equal(t.offset, state.offset)
    assert torch.equal(t.absmax2, state.state2.absmax)
    assert torch.equal(dequantize_nf4(t), bnbf.dequantize_4bit(packed, state).reshape(shape))


def test_quantize_nf4_of_a_constant_tensor():
    x = torch.ones(4096)  # every block's absmax is 1: the constants all equal their mean
    packed, state = bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    t = quantize_nf4(x)
    assert torch.equal(t.absmax, state.absmax) and torch.equal(t.absmax2, state.state2.absmax)
    assert torch.equal(dequantize_nf4(t), x)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call, error, name", [
    (lambda: double_quantize(torch.ones(10, dtype=torch.int64)), TypeError, "absmax"),
    (lambda: double_quantize(torch.tensor([1.0, float("nan")])), ValueError, "absmax"),
    (lambda: double_quantize(torch.empty(0)), ValueError, "absmax"),
    (lambda: double_quantize(torch.ones(10), blocksize=100), ValueError, "blocksize"),
    (lambda: double_quantize(torch.ones(10), rounding="round"), ValueError, "rounding"),
    (lambda: double_dequantize(torch.zeros(10, dtype=torch.int64), 0.0, torch.ones(1)), TypeError, "codes"),
    (lambda: double_dequantize(torch.zeros(10, dtype=torch.uint8), "0", torch.ones(1)), TypeError, "offset"),
    (lambda: double_dequantize(torch.zeros(10, dtype=torch.uint8), torch.ones(2), torch.ones(1)), ValueError,
     "offset"),
    (lambda: double_dequantize(torch.zeros(10, dtype=torch.uint8), 0.0, torch.ones(2)), ValueError,
     "absmax2"),
    (lambda: double_dequantize(torch.zeros(10, dtype=torch.uint8), 0.0, torch.ones(1).double()), TypeError,
     "absmax2"),
    (lambda: dynamic_map(1), TypeError, "signed"),
    (lambda: quantize_nf4(torch.ones(10), double_quant=1), TypeError, "double_quant"),
    (lambda: double_quantize(torch.tensor([0.5, -0.25, 1.0])), ValueError, "non-negative"),
    (lambda: quantize_nf4(torch.ones(10), rounding="up"), ValueError, "rounding"),
    (lambda: quantize_nf4(torch.ones(10), blocksize2=100), ValueError, "blocksize2"),
], ids=["int-absmax", "nan-absmax", "empty-absmax", "blocksize-100", "rounding-name", "int64-codes",
        "str-offset", "offset-2-values", "absmax2-length", "float64-absmax2", "int-signed",
        "int-double_quant", "negative-absmax", "nf4-rounding-name", "blocksize2-100"])
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# ------------------------------------------------------------------------------------------ NF4Tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 38), (64, 100), (2, 3, 50), (300, 258)], ids=str)
def test_quantize_nf4_round_trip_matches_bitsandbytes(shape, dtype):
    g = torch.Generator().manual_seed(23)
    x = (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))).to(dtype)
    for double_quant in (False, True):
        t = quantize_nf4(x, double_quant=double_quant)
        packed, state = bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=double_quant)
        assert isinstance(t, NF4Tensor) and t.shape == shape and t.dtype == dtype
        assert torch.equal(t.packed, packed) and torch.equal(t.absmax, state.absmax)
        y = dequantize_nf4(t)
        assert y.shape == shape and y.dtype == dtype
        if x.shape[-1] % 2 == 0:  # even last dim: bitsandbytes' C++ kernel (odd ones compile a fallback)
            assert torch.equal(y, bnbf.dequantize_4bit(packed, state).reshape(shape))


@pytest.mark.parametrize("n", [1, 63, 64 * 256, 64 * 256 + 65, 64 * 1000 + 3])
def test_dequantize_nf4_is_the_lesson_functions_composed(n):
    """dequantize_nf4's own route (tables kept per device, no padding copy) gives the bits of
    double_dequantize followed by dequantize_4bit, for whole and partial second-level blocks."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    t = quantize_nf4(x)
    absmax = double_dequantize(t.absmax, t.offset, t.absmax2, t.blocksize2)
    assert torch.equal(dequantize_nf4(t), dequantize_4bit(t.packed, absmax, nf4_code(), t.shape, 64, t.dtype))


def test_nf4tensor_nbytes():
    rows, cols = 1024, 4096
    x = torch.randn(rows, cols, dtype=torch.bfloat16)
    n, n_blocks = rows * cols, rows * cols // 64
    plain = quantize_nf4(x, double_quant=False)
    assert plain.nbytes == n // 2 + 4 * n_blocks
    assert plain.bits_per_param == 4.5
    dq = quantize_nf4(x)
    # packed codes, the constants' 8-bit codes, the offset, absmax2
    assert dq.nbytes == n // 2 + n_blocks + 4 + 4 * (n_blocks // 256)
    assert round(dq.bits_per_param, 3) == 4.127


# ------------------------------------------------------------------------------------------ storage



def test_bits_per_param():
    assert bits_per_param(64, double_quant=False) == 4.5
    with_dq = bits_per_param(64, double_quant=True, blocksize2=256)
    assert with_dq == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert round(bits_per_param(), 3) == 4.127
    assert bits_per_param(32, double_quant=False) == 5.0
    assert bits_per_param(4096, double_quant=False) == 4 + 32 / 4096


def test_bits_per_param_agrees_with_what_an_nf4tensor_stores():
    x = torch.randn(512, 2048)
    for double_quant in (False, True):
        t = quantize_nf4(x, double_quant=double_quant)
        offset_bits = 32 / x.numel() if double_quant else 0.0  # the one float32 offset per tensor
        assert math.isclose(t.bits_per_param, bits_per_param(double_quant=double_quant) + offset_bits)


# Hand-counted: layers * (4 h^2 + 3 h i); totals add 2 V h (embedding + lm_head) and (2 L + 1) h (norms).
EXPECTED = {
    "7B": (6_476_005_376, 6_738_415_616),
    "13B": (12_687_769_600, 13_015_864_320),
    "33B": (32_102_154_240, 32_528_943_616),
    "65B": (64_760_053_760, 65_285_660_672),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_llama_parameter_counts(name):
    linear, total = EXPECTED[name]
    s = LLAMA_SHAPES[name]
    assert s.vocab == 32000
    per_layer = 4 * s.hidden**2 + 3 * s.hidden * s.intermediate
    assert quantized_linear_params(name) == linear == s.n_layers * per_layer
    assert total_params(name) == total
    assert quantized_linear_params(name.lower()) == quantized_linear_params(f"llama-{name}") == linear
    assert quantized_linear_params((s.hidden, s.intermediate, s.n_layers)) == linear
    assert quantized_linear_params(LlamaShape(s.hidden, s.intermediate, s.n_layers)) == linear


def test_double_quant_savings():
    saved = {name: double_quant_savings_bytes(quantized_linear_params(name)) / GB for name in EXPECTED}
    assert saved["65B"] == pytest.approx(3.020, abs=1e-3)  # the QLoRA paper: "about 3 GB" for 65B
    assert saved["33B"] == pytest.approx(1.497, abs=1e-3)
    assert saved["13B"] == pytest.approx(0.592, abs=1e-3)
    assert saved["7B"] == pytest.approx(0.302, abs=1e-3)  # not the 0.4 GB some notes claim
    n = 10**9
    assert double_quant_savings_bytes(n) == n * 0.373046875 / 8
    assert quantized_bytes(n, double_quant=False) - quantized_bytes(n) == double_quant_savings_bytes(n)


@pytest.mark.parametrize("call, error, name", [
    (lambda: bits_per_param(48), ValueError, "blocksize"),
    (lambda: bits_per_param(64, blocksize2=100), ValueError, "blocksize2"),
    (lambda: bits_per_param(64, double_quant="yes"), TypeError, "double_quant"),
    (lambda: double_quant_savings_bytes(-1), ValueError, "n_params"),
    (lambda: double_quant_savings_bytes(1.5), TypeError, "n_params"),
    (lambda: quantized_linear_params("70B"), ValueError, "model"),
    (lambda: quantized_linear_params(7), TypeError, "model"),
    (lambda: quantized_linear_params((4096, 0, 32)), ValueError, "intermediate"),
], ids=["blocksize-48", "blocksize2-100", "str-double_quant", "negative-n", "float-n", "unknown-model",
        "int-model", "zero-intermediate"])
def test_storage_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1536, 576), (11008, 4096)], ids=str)
def test_cuda_nf4_storage(shape):
    """On CUDA: the CPU's packed bytes, and with rounding="nearest" bitsandbytes' CUDA codes of the constants
    (its kernel rounds to the exactly nearest code; qlora_edu/reference/gpu-facts.md)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    cpu = quantize_nf4(x)
    gpu = quantize_nf4(x.cuda(), rounding="nearest")
    assert gpu.device.type == "cuda" and torch.equal(gpu.packed.cpu(), cpu.packed)
    packed, state = bnbf.quantize_4bit(x.cuda(), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(gpu.packed, packed)
    assert torch.equal(gpu.absmax, state.absmax) and torch.equal(gpu.absmax2, state.state2.absmax)
    y = dequantize_nf4(gpu)
    assert y.is_cuda and torch.equal(y, bnbf.dequantize_4bit(packed, state))
