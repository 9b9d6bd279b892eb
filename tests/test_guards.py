"""The guard primitives' one exception policy, and the inputs a format cannot store, rejected by name (issue 20).

Policy (``qlora_edu.common.guards``): a wrong type is a TypeError, a wrong value a ValueError, a CUDA device where
there is none a ``CudaUnavailableError`` (a RuntimeError), in every chapter.
"""

from __future__ import annotations

import pytest
import torch

from qlora_edu.ch01_absmax.absmax import absmax_quantize
from qlora_edu.ch02_nf4.nf4 import nf4_code
from qlora_edu.ch02_nf4.quant4bit import quantize_4bit
from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4, quantize_nf4
from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.ch04_memory.memory import training_memory
from qlora_edu.common.guards import CudaUnavailableError, check_choice, check_device, check_dtype_choice

NO_CUDA = not torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ one policy


def test_a_wrong_type_is_a_type_error_and_a_wrong_value_a_value_error():
    with pytest.raises(TypeError, match="compute_dtype must be a torch.dtype"):
        check_dtype_choice("compute_dtype", "bf16", (torch.bfloat16, torch.float16))
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        check_dtype_choice("compute_dtype", torch.int8, (torch.bfloat16, torch.float16))
    with pytest.raises(TypeError, match="method must be a str"):
        check_choice("method", 3, ("peft", "scratch"))
    with pytest.raises(ValueError, match="method must be one of"):
        check_choice("method", "qlora", ("peft", "scratch"))


def test_the_same_bad_compute_dtype_gets_the_same_error_in_chapters_7_and_8():
    """Before: a TypeError in chapter 7's guard, a ValueError in chapter 8's for the same int8 compute dtype."""
    from qlora_edu.ch07_qlora.guards import check_quant_options
    from qlora_edu.common.training_setup import bnb_config

    for bad, kind in ((torch.int8, ValueError), ("bfloat16", TypeError)):
        with pytest.raises(kind, match="compute_dtype"):
            check_quant_options(64, True, bad)
        with pytest.raises(kind, match="compute_dtype"):
            bnb_config(bad)


@pytest.mark.skipif(not NO_CUDA, reason="checks what happens without CUDA; this machine has a CUDA device")
def test_no_cuda_is_one_named_error_everywhere():
    """Every place that can be asked for CUDA raises CudaUnavailableError naming the argument."""
    from qlora_edu.ch04_memory.guards import check_device as _  # noqa: F401 (the chapter takes the primitive)
    from qlora_edu.ch05_optimizers.paging import paging_demo_cuda
    from qlora_edu.common.device import pick_compute

    calls = [lambda: check_device("device", "cuda"), lambda: pick_compute("cuda"),
             lambda: paging_demo_cuda(device="cuda")]
    for call in calls:
        with pytest.raises(CudaUnavailableError, match="cuda"):
            call()
    assert issubclass(CudaUnavailableError, RuntimeError)


def test_a_device_string_that_names_no_device_is_a_value_error():
    with pytest.raises(ValueError, match="device must name a device"):
        check_device("device", "gpu0")
    with pytest.raises(TypeError, match="device must be one of"):
        check_device("device", 0.5)


# ------------------------------------------------------------------------------- what a format cannot store


def test_absmax_rejects_float64_values_beyond_float32():
    """Before: scale inf and codes 0, silently. The scales are float32, so the guard names x and the range."""
    x = torch.tensor([1e39, 1.0, -2.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x holds values beyond float32's range \(max \|x\| = 1e\+39"):
        absmax_quantize(x)
    codes, scales = absmax_quantize(torch.tensor([3e38, 1.0], dtype=torch.float64))  # within range: fine
    assert torch.isfinite(scales).all()


@pytest.mark.parametrize("fn", [lambda x: quantize_4bit(x, nf4_code(), 64), lambda x: quantize_nf4(x)],
                         ids=["quantize_4bit", "quantize_nf4"])
def test_4bit_quantizers_name_the_float32_range_not_nan(fn):
    """Before: "x must be finite: it holds 0 NaN or inf value(s)", a false message."""
    x = torch.full((128,), 1e39, dtype=torch.float64)
    with pytest.raises(ValueError, match="beyond float32's range"):
        fn(x)


def test_double_quantization_rejects_constants_whose_mean_overflows():
    """Before: float32 weights near 2e38 gave an infinite offset and dequantized to all NaN."""
    x = torch.full((4096,), 2e38)
    with pytest.raises(ValueError, match="offset, would overflow"):
        quantize_nf4(x)
    t = quantize_nf4(x, double_quant=False)  # without double quantization the format stores them
    assert torch.equal(dequantize_nf4(t), x)


def test_nf4tensor_built_by_hand_is_checked_where_it_is_built():
    """Before: a wrong shape or blocksize dequantized to truncated or mis-scaled values."""
    t = quantize_nf4(torch.randn(8, 64))
    parts = dict(packed=t.packed, absmax=t.absmax, shape=t.shape, dtype=t.dtype, blocksize=t.blocksize,
                 double_quant=True, offset=t.offset, absmax2=t.absmax2, blocksize2=t.blocksize2)
    assert torch.equal(dequantize_nf4(NF4Tensor(**parts)), dequantize_nf4(t))
    bad = [(dict(shape=(8, 32)), ValueError, "packed must hold 128"),
           (dict(shape=(16, 64)), ValueError, "packed must hold 512"),
           (dict(blocksize=128), ValueError, "absmax must hold 4"),
           (dict(blocksize=48), ValueError, "blocksize must be a power of two"),
           (dict(double_quant=False), TypeError, "absmax must have dtype torch.float32"),
           (dict(absmax2=t.absmax2[:0]), ValueError, "absmax2 must hold 1"),
           (dict(dtype=torch.int8), TypeError, "dtype must be a floating-point"),
           (dict(packed=t.packed.float()), TypeError, "packed must have dtype torch.uint8")]
    for change, kind, message in bad:
        with pytest.raises(kind, match=message):
            NF4Tensor(**(parts | change))


# --------------------------------------------------------------------------- what the memory model covers


def _llama(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 256}
                          | overrides))


def test_training_memory_rejects_models_it_does_not_describe():
    """Before: a Mixtral config gave Mistral's 6.96 GiB, a BERT config 0.35 GiB."""
    from transformers import BertConfig, MistralConfig, MixtralConfig

    with pytest.raises(ValueError, match="'mixtral' config"):
        training_memory(MixtralConfig(), "qlora", batch_size=1, seq_len=512)
    with pytest.raises(ValueError, match="'bert' config"):
        training_memory(BertConfig(), "qlora", batch_size=1, seq_len=128)
    moe = _llama()
    moe.num_local_experts = 8
    with pytest.raises(ValueError, match="mixture of experts"):
        training_memory(moe, "qlora", batch_size=1, seq_len=16)
    assert training_memory(MistralConfig(), "qlora", batch_size=1, seq_len=512).total > 0  # covered


def test_training_memory_rejects_what_the_model_cannot_do():
    with pytest.raises(ValueError, match=r"seq_len \(512\) must not exceed the model's max_position_embeddings"):
        training_memory(_llama(), "qlora", batch_size=1, seq_len=512)
    with pytest.raises(ValueError, match=r"lora_r \(65\) must not exceed the smallest side"):
        training_memory(_llama(), "qlora", batch_size=1, seq_len=16, lora_r=65)
    assert training_memory(_llama(), "qlora", batch_size=1, seq_len=16, lora_r=64).total > 0
