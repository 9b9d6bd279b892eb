"""Chapter 3: what 4-bit storage costs, in bits per parameter and in gigabytes of real models.

**Bits per parameter.** An NF4 weight costs its 4-bit code plus its share of the quantization constants:

* one float32 ``absmax`` per block of ``blocksize = 64`` weights: ``32 / 64 = 0.5`` bit, so
  ``4 + 32/64 = 4.5`` bits/param;
* with double quantization the constant is an 8-bit code (``8 / 64 = 0.125`` bit) and every 256 of them
  share one float32 ``absmax2`` (``32 / (64 * 256) = 0.00195`` bit):
  ``4 + 8/64 + 32/(64*256) = 4.126953125 ~ 4.127`` bits/param (the one float32 ``offset`` a tensor is
  negligible and not counted).

Double quantization saves ``0.5 - 0.126953125 = 0.373046875`` bits per parameter: ``n * 0.373 / 8`` bytes.

**Which parameters.** QLoRA quantizes the linear layers of the transformer blocks: in LLaMA the attention
projections ``q, k, v, o`` (``hidden x hidden`` each, LLaMA-1 has no grouped-query attention) and the MLP
``gate, up, down`` (``hidden x intermediate`` each). The token embedding, the ``lm_head`` and the RMSNorm
weights stay in 16 bits. Per layer: ``4 h^2 + 3 h i`` parameters.

**The numbers** (LLaMA-1; ``quantized_linear_params`` and ``double_quant_savings_bytes``):

======  ==============  ===================  ===================
model   linear params   saved by DQ (GB)     saved by DQ (GiB)
======  ==============  ===================  ===================
7B       6,476,005,376  0.302                0.281
13B     12,687,769,600  0.592                0.551
33B     32,102,154,240  1.497                1.394
65B     64,760,053,760  3.020                2.812
======  ==============  ===================  ===================

The QLoRA paper's "about 3 GB for a 65B model" is right (0.373 bits x 65e9 params / 8 = 3.0 GB). Figures
like "0.5 GB for 65B" (6x too small) or "0.4 GB for 7B" (a third too large) are not. Counting all
parameters instead of the quantized linears changes little: 0.314 GB for 7B, 3.04 GB for 65B.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_edu.common.guards import check_int, check_power_of_two

__all__ = ["LLAMA_SHAPES", "LlamaShape", "quantized_linear_params", "total_params", "bits_per_param",
           "double_quant_savings_bytes", "quantized_bytes"]

GB = 10**9
GiB = 2**30


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that decide a LLaMA model's parameter count."""

    hidden: int
    intermediate: int
    n_layers: int
    vocab: int = 32000


#: LLaMA-1 (Touvron et al., 2023), from the released configs. "33B" is the model often called 30B.
LLAMA_SHAPES: dict[str, LlamaShape] = {
    "7B": LlamaShape(hidden=4096, intermediate=11008, n_layers=32),
    "13B": LlamaShape(hidden=5120, intermediate=13824, n_layers=40),
    "33B": LlamaShape(hidden=6656, intermediate=17920, n_layers=60),
    "65B": LlamaShape(hidden=8192, intermediate=22016, n_layers=80),
}


def _shape(model: object) -> LlamaShape:
    if isinstance(model, LlamaShape):
        return model
    if isinstance(model, str):
        key = model.upper().removeprefix("LLAMA-").removeprefix("LLAMA")
        if key not in LLAMA_SHAPES:
            raise ValueError(f"model must be one of {sorted(LLAMA_SHAPES)} or a tuple "
                             f"(hidden, intermediate, n_layers), got {model!r}")
        return LLAMA_SHAPES[key]
    if isinstance(model, tuple) and len(model) in (3, 4):
        for name, value in zip(("hidden", "intermediate", "n_layers", "vocab"), model, strict=False):
            check_int(name, value, low=1)
        return LlamaShape(*model)
    raise TypeError(f"model must be a name like '7B', a LlamaShape or a tuple (hidden, intermediate, "
                    f"n_layers), got {type(model).__name__}")


def quantized_linear_params(model: str | LlamaShape | tuple[int, ...]) -> int:
    """Parameters in the linear layers QLoRA quantizes: ``n_layers * (4 h^2 + 3 h i)``.

    Args:
        model: ``"7B"``, ``"13B"``, ``"33B"``, ``"65B"`` (LLaMA-1), a :class:`LlamaShape`, or a tuple
            ``(hidden, intermediate, n_layers)``.

    Returns:
        the count of q, k, v, o, gate, up and down weights over all layers (no embeddings, lm_head, norms).
    """
    s = _shape(model)
    return s.n_layers * (4 * s.hidden * s.hidden + 3 * s.hidden * s.intermediate)


def total_params(model: str | LlamaShape | tuple[int, ...]) -> int:
    """All parameters: the quantized linears + embedding and lm_head (``2 V h``, untied) + RMSNorms
    (``2 h`` a layer + ``h`` final). 6,738,415,616 for LLaMA-1 7B."""
    s = _shape(model)
    return quantized_linear_params(s) + 2 * s.vocab * s.hidden + (2 * s.n_layers + 1) * s.hidden


def bits_per_param(blocksize: int = 64, double_quant: bool = True, blocksize2: int = 256) -> float:
    """Storage of a 4-bit weight per parameter: ``4 + 32/blocksize`` bits, or with double quantization
    ``4 + 8/blocksize + 32/(blocksize * blocksize2)``: 4.5 and 4.126953125 at the defaults."""
    check_power_of_two("blocksize", blocksize, low=32, high=4096)
    check_power_of_two("blocksize2", blocksize2, low=32, high=4096)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)
    return 4 + 32 / blocksize


def double_quant_savings_bytes(n_params: int, blocksize: int = 64, blocksize2: int = 256) -> float:
    """Bytes saved by double quantization on ``n_params`` weights:
    ``n_params * (bits_per_param(double_quant=False) - bits_per_param(double_quant=True)) / 8``,
    i.e. ``n_params * 0.373046875 / 8`` at the defaults (3.02e9 bytes for LLaMA-1 65B's linears)."""
    check_int("n_params", n_params, low=0)
    saved_bits = (bits_per_param(blocksize, False, blocksize2) - bits_per_param(blocksize, True, blocksize2))
    return n_params * saved_bits / 8


def quantized_bytes(n_params: int, blocksize: int = 64, double_quant: bool = True,
                    blocksize2: int = 256) -> float:
    """Bytes of ``n_params`` weights stored in 4 bits with their constants: ``n_params * bits / 8``."""
    check_int("n_params", n_params, low=0)
    return n_params * bits_per_param(blocksize, double_quant, blocksize2) / 8
