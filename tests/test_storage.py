"""Bits per parameter and the memory double quantization saves on LLaMA-1 (qlora_edu.storage)."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_edu import (
    LLAMA_SHAPES,
    bits_per_param,
    double_quant_savings_bytes,
    quantize_nf4,
    quantized_bytes,
    quantized_linear_params,
    total_params,
)
from qlora_edu.storage import GB, LlamaShape


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
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
