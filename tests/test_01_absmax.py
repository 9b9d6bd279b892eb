"""Chapter 1, absmax block quantization: the chapter's battery (qlora_edu/ch01_absmax/checks.py) on the package and
on the solution notebook, its known mistakes caught, device handling, and how a failing check reports."""

from __future__ import annotations

import pytest
import torch
from chapter_battery import battery_tests

from qlora_edu import absmax_dequantize, absmax_quantize, check
from qlora_edu.checks import ChecksFailed

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("01_absmax")


def _scales_7_8(x, bits=4, blocksize=64):
    codes, scales = absmax_quantize(x, bits=bits, blocksize=blocksize)
    return codes, scales * 7 / 8


def test_report_shows_expected_got_and_hint(capsys):
    _scales_7_8.__name__ = "absmax_quantize"
    assert check(_scales_7_8, raise_on_failure=False) is False
    out = capsys.readouterr().out
    assert "expected:" in out and "got:" in out and "hint:" in out and "First failing case" in out


def test_a_failing_check_raises_after_its_report(capsys):
    """A notebook run by a script must stop on a failed check; in JupyterLab it shows as one red line."""
    _scales_7_8.__name__ = "absmax_quantize"
    with pytest.raises(ChecksFailed, match="cases did not pass") as err:
        check(_scales_7_8)
    assert "First failing case" in capsys.readouterr().out
    assert len(err.value._render_traceback_()) == 1


def test_check_rejects_bad_arguments():
    with pytest.raises(ValueError, match="functions"):
        check()
    with pytest.raises(TypeError, match="functions"):
        check(3)

    def not_a_course_function():
        pass

    with pytest.raises(ValueError, match="no case uses"):
        check(not_a_course_function)


@pytest.mark.parametrize(("call", "error", "name"), [
    (lambda: absmax_dequantize(torch.zeros(4, dtype=torch.int8), torch.ones(1, dtype=torch.float64), 4),
     TypeError, "scales"),
    (lambda: absmax_dequantize(torch.zeros(4, dtype=torch.int8), torch.ones(2), 4), ValueError, "scales"),
    (lambda: absmax_quantize(torch.ones(4), bits=4.0), TypeError, "bits"),
])
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def _exact_scales(x, bits, blocksize):
    """absmax / qmax computed in float64 and rounded once to float32: the correctly rounded quotient."""
    flat = x.detach().flatten().double()
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    return (flat.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).float()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_scales_are_correctly_rounded_quotients(bits):
    """The scales are IEEE divisions absmax / qmax, on every device (see the CUDA test below for why it matters)."""
    x = torch.randn(37, 70, generator=torch.Generator().manual_seed(bits)) * 0.02
    _, scales = absmax_quantize(x, bits=bits, blocksize=64)
    assert torch.equal(scales, _exact_scales(x, bits, 64))


@pytest.mark.gpu
def test_cuda_gives_the_cpu_result():
    x = torch.randn(37, 70) * 0.02
    codes, scales = absmax_quantize(x.cuda(), bits=4, blocksize=64)
    assert codes.is_cuda and scales.is_cuda
    cpu_codes, cpu_scales = absmax_quantize(x, bits=4, blocksize=64)
    assert torch.equal(codes.cpu(), cpu_codes) and torch.equal(scales.cpu(), cpu_scales)
    assert torch.equal(scales.cpu(), _exact_scales(x, 4, 64))
    assert torch.equal(absmax_dequantize(codes, scales, 64).cpu(), absmax_dequantize(cpu_codes, cpu_scales, 64))


@pytest.mark.gpu
def test_cuda_divides_by_a_number_as_a_multiplication():
    """Why absmax_quantize divides by a tensor: CUDA computes `t / 7` as t * (1/7), one ulp off the CPU's quotient
    on about half the values (measured on an H200, 2026-12-04: the scales' last bits differed)."""
    absmax = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) + 0.5
    by_number = (absmax.cuda() / 7).cpu()
    assert torch.equal(by_number, absmax * torch.tensor(1 / 7, dtype=torch.float32))  # the reciprocal's product
    assert not torch.equal(by_number, absmax / 7)  # ... which is not the CPU's correctly rounded quotient
    # A tensor divisor on the device: IEEE division, the CPU's bits.
    assert torch.equal((absmax.cuda() / absmax.cuda().new_tensor(7)).cpu(), absmax / 7)
