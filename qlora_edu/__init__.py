"""qlora_edu: the companion package of the QLoRA course.

Every function a learner writes in the exercises lives here, under the same name, and is checked by
the same test battery (``qlora_edu.checks``) against bitsandbytes, peft and torch.

Chapter by chapter:

* 1  absmax block quantization ........ :mod:`qlora_edu.absmax`
* 2  the NF4 data type ................ :mod:`qlora_edu.nf4`, :mod:`qlora_edu.packing`, :mod:`qlora_edu.quant4bit`
* 3  double quantization .............. :mod:`qlora_edu.double_quant`

and around them: :mod:`qlora_edu.base_model` (the offline SmolLM2-135M base model),
:mod:`qlora_edu.device` (which device and dtype a notebook runs on), :mod:`qlora_edu.checks`.
Importing the package loads torch and nothing from the network.
"""

from qlora_edu.absmax import absmax_dequantize, absmax_quantize
from qlora_edu.checks import check

__version__ = "0.1.0"

__all__ = [
    "absmax_quantize",
    "absmax_dequantize",
    "check",
]
