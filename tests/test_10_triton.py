"""Chapter 10, the fused NF4 dequantization kernel in Triton: the chapter's battery (qlora_edu/ch10_triton/checks.py) on
the package and on the solution notebook, its known mistakes caught, and the package's wrapper
(``dequantize_nf4_triton``) against the course's ``dequantize_nf4`` and bitsandbytes, bit for bit.

On a CPU every kernel runs in Triton's interpreter (so shapes stay small); the `gpu` tests run the compiled kernel on
CUDA (`make test-gpu`), where the bfloat16 cast is the GPU's own and is checked too.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import re

import pytest
import torch
from chapter_battery import battery_tests
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT
from qlora_edu import NF4Tensor, dequantize_nf4, quantize_nf4
from qlora_edu.checks import check_functions, property_settings

tl = pytest.importorskip("triton.language", reason="triton is not installed (it ships Linux wheels only)")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # no warning about the optional `kernels` package
bnbf = pytest.importorskip("bitsandbytes.functional")

from qlora_edu.ch10_triton.nf4_triton import (  # noqa: E402 - after the skip: the kernel needs triton
    dequantize_nf4_triton,
    launch_nf4_dequantize,
    nf4_dequantize_kernel,
    nf4_dequantize_ptx,
    triton_dequantize_applies,
)
from qlora_edu.ch10_triton.roofline import (  # noqa: E402
    H200_BANDWIDTH,
    dequantize_traffic_bytes,
    measured_nf4_gpu_times,
    roofline_seconds,
)

checks = importlib.import_module("qlora_edu.ch10_triton.checks")

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("10_triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def control_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    checks._reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                             BLOCKSIZE, BLOCKSIZE2, BLOCKS)


def test_the_mistakes_pass_with_every_switch_off():
    """The control: the kernel the mistakes are built from passes the battery with no switch on (every case that
    runs here passes; chapter_battery.control_passes would count the CUDA case's skip on a CPU as a failure)."""
    outcomes = check_functions({"nf4_dequantize_kernel": control_kernel}, verbose=False)
    assert not [o.case.name for o in outcomes if o.failed]
    assert any(o.passed for o in outcomes)


def sample(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))).to(dtype)


def as_dtype(t: NF4Tensor, dtype: torch.dtype) -> NF4Tensor:
    return dataclasses.replace(t, dtype=dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ----------------------------------------------------------------------------------- exact on a CPU


@property_settings(12)
@given(shape=st.sampled_from([(1,), (2,), (63,), (65,), (3, 37), (5, 3, 33), (130, 7), (4096,), (4097,)]),
       blocksize=st.sampled_from([32, 64, 256]), blocksize2=st.sampled_from([32, 256]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_triton_equals_dequantize_nf4(shape, blocksize, blocksize2, dtype, seed):
    """Every shape (1-D, odd sizes, partial blocks at both levels), every output dtype, several block sizes: the
    same bits as the course's dequantize_nf4 (on a CPU the kernel runs in the interpreter; bfloat16 through its
    float32 output, see the next test)."""
    t = quantize_nf4(sample(shape, torch.bfloat16, seed), blocksize=blocksize, blocksize2=blocksize2)
    assert same_bits(dequantize_nf4_triton(t, dtype), dequantize_nf4(as_dtype(t, dtype)))


def test_default_dtype_is_the_weights():
    t = quantize_nf4(sample((3, 37), torch.float16, 0))
    out = dequantize_nf4_triton(t)
    assert out.dtype == torch.float16 and out.shape == (3, 37)


def test_odd_shape_equals_bitsandbytes():
    """An odd last dimension (a pad nibble, bitsandbytes' compiled fallback: seconds once) in float32 and float16, on
    the bytes bitsandbytes stored: the same bits as its dequantize_4bit."""
    x = sample((5, 3, 33), torch.bfloat16, 1)
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    weight = NF4Tensor(packed, state.absmax, x.shape, torch.bfloat16, 64, True, state.offset, state.state2.absmax, 256)
    for dtype in (torch.float32, torch.float16):
        expected = checks._bnb_dequantize(packed, state, x.shape, dtype)
        assert same_bits(dequantize_nf4_triton(weight, dtype), expected)


def test_the_interpreter_truncates_to_bfloat16():
    """Why bfloat16 goes through float32 on a CPU: written by the kernel in the interpreter, bfloat16 is the float32
    value truncated (its top 16 bits), not rounded to nearest even as torch (and a GPU) round. If a Triton release
    fixes this, this test fails and dequantize_nf4_triton's float32 detour can go."""
    t = quantize_nf4(sample((300, 70), torch.float32, 2))
    out = torch.empty(t.numel, dtype=torch.bfloat16)
    launch_nf4_dequantize(nf4_dequantize_kernel, t, out)
    exact = dequantize_nf4_triton(t, torch.float32).flatten()
    truncated = (exact.view(torch.int32) >> 16).to(torch.int16)
    assert torch.equal(out.view(torch.int16), truncated)
    assert not torch.equal(out, exact.to(torch.bfloat16))


def test_a_stub_reads_as_not_implemented():
    """The exercise's stub raises NotImplementedError inside the kernel: the launcher lets it through as such (the
    battery reports TODO, not a failure)."""
    def stub(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
             BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
        raise NotImplementedError("nf4_dequantize_kernel: write this part")

    with pytest.raises(NotImplementedError, match="write this part"):
        launch_nf4_dequantize(stub, quantize_nf4(torch.randn(64)), torch.empty(64))


def test_a_nested_jit_call_is_explained():
    def uses_cdiv(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                  BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
        tl.cdiv(n, BLOCKSIZE)

    with pytest.raises(RuntimeError, match="interpreter"):
        launch_nf4_dequantize(uses_cdiv, quantize_nf4(torch.randn(64)), torch.empty(64))


def test_compiles_for_an_h200_as_intended():
    """Compiled for compute capability 9.0 (H100 / H200) on this CPU, down to PTX: no fused multiply-add (so the
    constant is rounded twice, as bitsandbytes rounds it; with fusion allowed the compiler does fuse), bf16 by
    round-to-nearest-even conversions, and 16-byte vector stores."""
    ptx = nf4_dequantize_ptx(90, torch.bfloat16, fp_fusion=False)
    assert "fma.rn.f32" not in ptx
    assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx)
    assert "st.global.v4.b32" in ptx
    assert "fma.rn.f32" in nf4_dequantize_ptx(90, torch.bfloat16, fp_fusion=True)


# ----------------------------------------------------------------------------------- where it applies, bad input


def test_applies_only_on_cuda_with_double_quant():
    t = quantize_nf4(torch.randn(64))
    assert not triton_dequantize_applies(t)  # on a CPU: the interpreter is exact but slow
    assert not triton_dequantize_applies(torch.randn(64))
    assert not triton_dequantize_applies(None)


def test_bad_input_names_the_argument():
    t = quantize_nf4(torch.randn(64))
    with pytest.raises(TypeError, match="weight"):
        dequantize_nf4_triton(torch.randn(64))
    with pytest.raises(ValueError, match="weight"):
        dequantize_nf4_triton(quantize_nf4(torch.randn(64), double_quant=False))
    with pytest.raises(ValueError, match="dtype"):
        dequantize_nf4_triton(t, torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        dequantize_nf4_triton(t, "bf16")
    with pytest.raises(ValueError, match="out"):
        launch_nf4_dequantize(nf4_dequantize_kernel, t, torch.empty(63))
    with pytest.raises(TypeError, match="kernel"):
        launch_nf4_dequantize("kernel", t, torch.empty(64))


# ----------------------------------------------------------------------------------- the roofline's numbers


def test_traffic_bytes_by_hand():
    """4096 x 4096 to bf16: 8 MiB of codes + 262,144 constant codes + 1,024 absmax2 x 4 B + the offset + the two
    tables (64 + 1,024 B) read, 32 MiB written."""
    expected = 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * 1024 + 4 + 64 + 1024 + 2 * 4096 * 4096
    assert dequantize_traffic_bytes((4096, 4096), torch.bfloat16) == expected
    assert dequantize_traffic_bytes((3,), torch.float32) == 2 + 1 + 4 + 4 + 64 + 1024 + 12
    assert roofline_seconds(expected, H200_BANDWIDTH) == pytest.approx(expected / 4.8e12)
    with pytest.raises(ValueError, match="bandwidth"):
        roofline_seconds(10, 0.0)


def test_measured_table_is_read_consistently():
    """The four H200 rows of gpu-runs.md, and each printed ratio is the quotient of its two times (to rounding)."""
    table = measured_nf4_gpu_times()
    assert set(table) == {(576, 576), (1536, 576), (4096, 4096), (11008, 4096)}
    for row in table.values():
        assert row["dequantize_ratio"] == pytest.approx(row["dequantize_nf4"] / row["bnb_dequantize_4bit"], abs=0.03)
        assert row["quantize_ratio"] == pytest.approx(row["quantize_nf4"] / row["bnb_quantize_4bit"], abs=0.03)


def test_benchmark_without_cuda_says_so_and_exits_0(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run (make gpu-check runs it)")
    spec = importlib.util.spec_from_file_location("bench_triton_nf4", ROOT / "benchmarks" / "bench_triton_nf4.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1,), (5, 3, 33), (2, 4097), (576, 576), (1536, 576), (4096, 4096), (11008, 4096)])
def test_gpu_compiled_kernel_equals_dequantize_nf4_and_bitsandbytes(shape):
    """Compiled on CUDA, bf16 / fp16 / fp32: the same bits as dequantize_nf4 on the course's bytes, and as
    bitsandbytes' CUDA dequantize_4bit on bitsandbytes' bytes."""
    x = sample(shape, torch.bfloat16, 3).cuda()
    t = quantize_nf4(x)
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = NF4Tensor(packed, state.absmax, x.shape, torch.bfloat16, 64, True, state.offset, state.state2.absmax, 256)
    assert triton_dequantize_applies(t)
    codec = importlib.import_module("qlora_edu.ch03_double_quant.nf4_codec")
    torch_path = getattr(codec, "dequantize_nf4_torch", dequantize_nf4)  # the torch path, once the kernel is hooked in
    for dtype in DTYPES:
        assert same_bits(dequantize_nf4_triton(t, dtype), torch_path(as_dtype(t, dtype))), dtype
        assert same_bits(dequantize_nf4_triton(theirs, dtype), checks._bnb_dequantize(packed, state, shape, dtype))
