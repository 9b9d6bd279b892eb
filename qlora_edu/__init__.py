"""qlora_edu: the companion package of the QLoRA course.

Every function a learner writes in the exercises lives here, under the same name, and is checked by
the same test battery (``qlora_edu.checks``) against bitsandbytes, peft and torch.

Chapter by chapter:

* 1  absmax block quantization ........ :mod:`qlora_edu.absmax`
* 2  the NF4 data type ................ :mod:`qlora_edu.nf4`, :mod:`qlora_edu.packing`, :mod:`qlora_edu.quant4bit`
* 3  double quantization .............. :mod:`qlora_edu.double_quant`, :mod:`qlora_edu.nf4_tensor`

and around them: :mod:`qlora_edu.base_model` (the offline SmolLM2-135M base model),
:mod:`qlora_edu.device` (which device and dtype a notebook runs on), :mod:`qlora_edu.checks`.
Importing the package loads torch and nothing from the network.
"""

from qlora_edu.absmax import absmax_dequantize, absmax_quantize
from qlora_edu.base_model import base_model_info, load_base_model
from qlora_edu.checks import check
from qlora_edu.device import Compute, gpu_available, pick_compute, skip_reason_no_gpu
from qlora_edu.double_quant import (
    double_dequantize,
    double_quantize,
    dynamic_map,
    grid_lookup_table,
    rounding_mismatch_rate,
)
from qlora_edu.nf4 import fp4_code, int4_code, nf4_code
from qlora_edu.nf4_tensor import NF4Tensor, dequantize_nf4, quantize_nf4
from qlora_edu.packing import pack_4bit, unpack_4bit
from qlora_edu.perplexity import perplexity, reference_text, replace_linear_weights
from qlora_edu.quant4bit import dequantize_4bit, quantize_4bit
from qlora_edu.storage import (
    LLAMA_SHAPES,
    bits_per_param,
    double_quant_savings_bytes,
    quantized_bytes,
    quantized_linear_params,
    total_params,
)

__version__ = "0.1.0"

__all__ = [
    "absmax_quantize",
    "absmax_dequantize",
    "check",
    "nf4_code",
    "fp4_code",
    "int4_code",
    "pack_4bit",
    "unpack_4bit",
    "quantize_4bit",
    "dequantize_4bit",
    "NF4Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "dynamic_map",
    "double_quantize",
    "double_dequantize",
    "grid_lookup_table",
    "rounding_mismatch_rate",
    "LLAMA_SHAPES",
    "quantized_linear_params",
    "total_params",
    "bits_per_param",
    "double_quant_savings_bytes",
    "quantized_bytes",
    "load_base_model",
    "base_model_info",
    "Compute",
    "pick_compute",
    "gpu_available",
    "skip_reason_no_gpu",
    "perplexity",
    "reference_text",
    "replace_linear_weights",
]
