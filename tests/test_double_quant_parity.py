"""Double quantization against bitsandbytes 0.50.2 on CPU: the dynamic map, the 65536-point grid rounding,
codes / offset / absmax2 of compress_statistics=True, dequantization, the grid-vs-nearest rate, bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qlora_edu import (
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    dynamic_map,
    nf4_code,
    quantize_4bit,
    quantize_nf4,
    rounding_mismatch_rate,
)
from qlora_edu.checks import property_settings
from qlora_edu.double_quant import grid_lookup_table

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # no warning about the optional `kernels` package
bnbf = pytest.importorskip("bitsandbytes.functional")

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
], ids=["int-absmax", "nan-absmax", "empty-absmax", "blocksize-100", "rounding-name", "int64-codes",
        "str-offset", "offset-2-values", "absmax2-length", "float64-absmax2", "int-signed",
        "int-double_quant"])
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
