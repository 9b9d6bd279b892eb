"""Argument checks of chapter 7 (:mod:`qlora_edu.ch07_qlora.qlora`, QLoRA from scratch).

One guard per public function, ``check_<function>_args``, called as the function's first line. Each raises a
``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value) that names the argument and says
what was expected, so a wrong call fails before any tensor is touched. The adapter arguments (``r``, ``alpha``,
``dropout``, ``target_modules``) are chapter 6's and checked by :mod:`qlora_edu.ch06_lora.guards`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.ch06_lora.guards import (
    check_alpha,
    check_apply_lora_args,
    check_dropout,
    check_lora_forward_args,
    check_model,
    check_rank,
    check_target_modules,
)
from qlora_edu.ch06_lora.lora import LoRALinear
from qlora_edu.common.guards import (
    check_bool,
    check_device,
    check_dtype_choice,
    check_float_tensor,
    check_instance,
    check_int,
    check_power_of_two,
    check_tensor,
)

__all__ = [
    "COMPUTE_DTYPES",
    "check_apply_qlora_args",
    "check_compare_training_args",
    "check_compute_dtype",
    "check_copy_adapters_to_peft_args",
    "check_nf4_from_linear_args",
    "check_nf4_linear_args",
    "check_nf4_linear_module_args",
    "check_nf4_matmul_args",
    "check_nf4_weight",
    "check_qlora_from_linear_args",
    "check_quant_options",
    "check_saved_tensor_log_args",
    "check_trace_flow_args",
]

#: dtypes the dequantized NF4 weight may be multiplied in (QLoRA uses bfloat16)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_compute_dtype(compute_dtype: object) -> torch.dtype:
    """``compute_dtype`` must be one of :data:`COMPUTE_DTYPES` (bfloat16, float16, float32)."""
    return check_dtype_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)


def check_quant_options(blocksize: object, double_quant: object, compute_dtype: object) -> None:
    """``blocksize`` a power of two in 32..4096, ``double_quant`` a bool, ``compute_dtype`` bf16/fp16/fp32."""
    check_power_of_two("blocksize", blocksize, low=32, high=4096)
    check_bool("double_quant", double_quant)
    check_compute_dtype(compute_dtype)


def check_nf4_weight(weight: object):
    """``weight`` must be an :class:`~qlora_edu.ch03_double_quant.nf4_tensor.NF4Tensor` holding a 2-D ``(out, in)``
    matrix."""
    check_instance("weight", weight, NF4Tensor, "from quantize_nf4")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must hold a 2-D (out_features, in_features) matrix, got shape {tuple(weight.shape)}")
    return weight


def _check_x_for(x: object, weight) -> torch.Tensor:
    check_float_tensor("x", x, finite=False)  # reading every activation for NaN on every call would cost a pass
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have in_features = {weight.shape[1]} as its last dimension, "
                         f"got shape {tuple(x.shape)}")
    if weight.packed.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.packed.device}")
    return x


def _check_frozen_bias(bias: object, out_features: int, device: torch.device, dtype: torch.dtype | None) -> None:
    if bias is None:
        return
    check_tensor("bias", bias)
    dtype_ok = bias.dtype.is_floating_point if dtype is None else bias.dtype == dtype
    if tuple(bias.shape) != (out_features,) or not dtype_ok or bias.device != device:
        want = "floating-point" if dtype is None else f"of x's dtype {dtype}"
        raise ValueError(f"bias must be None or a ({out_features},) tensor {want} on {device}, "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if bias.requires_grad:
        raise ValueError("bias must be frozen (requires_grad=False): the 4-bit layer computes no bias gradient")


def check_nf4_matmul_args(x: object, weight: object, bias: object) -> None:
    """Guard of ``nf4_matmul(x, weight, bias)``: ``x`` (..., in) in a compute dtype, ``weight`` an NF4Tensor of
    shape (out, in) on ``x``'s device, ``bias`` None or a frozen (out,) tensor in ``x``'s dtype."""
    check_float_tensor("x", x, finite=False)
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be in a compute dtype {COMPUTE_DTYPES}, got {x.dtype}")
    check_nf4_weight(weight)
    _check_x_for(x, weight)
    _check_frozen_bias(bias, weight.shape[0], x.device, x.dtype)


def check_nf4_linear_args(x: object, weight: object, bias: object, compute_dtype: object) -> None:
    """Guard of ``nf4_linear(x, weight, bias, compute_dtype)``: ``x`` (..., in) floating point (any float dtype),
    ``weight`` an NF4Tensor (out, in) on ``x``'s device, ``bias`` None or a frozen floating (out,) tensor there,
    ``compute_dtype`` bf16/fp16/fp32."""
    check_nf4_weight(weight)
    _check_x_for(x, weight)
    _check_frozen_bias(bias, weight.shape[0], x.device, None)
    check_compute_dtype(compute_dtype)


def check_nf4_linear_module_args(weight: object, bias: object, compute_dtype: object) -> None:
    """Guard of ``NF4Linear(weight, bias, compute_dtype)``: a 2-D NF4Tensor, a matching bias or None."""
    check_nf4_weight(weight)
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != weight.packed.device:
            raise ValueError(f"bias must be None or a ({weight.shape[0]},) tensor on {weight.packed.device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")
    check_compute_dtype(compute_dtype)


def check_nf4_from_linear_args(base: object, blocksize: object, double_quant: object, compute_dtype: object) -> None:
    """Guard of ``NF4Linear.from_linear(base, blocksize, double_quant, compute_dtype)``."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
    check_float_tensor("base.weight", base.weight.detach())  # a NaN weight would quantize to garbage
    check_quant_options(blocksize, double_quant, compute_dtype)


def check_qlora_from_linear_args(base: object, r: object, alpha: object, dropout: object, blocksize: object,
                                 double_quant: object, compute_dtype: object) -> None:
    """Guard of ``QLoRALinear.from_linear(base, r, alpha, dropout, blocksize, double_quant, compute_dtype)``."""
    check_nf4_from_linear_args(base, blocksize, double_quant, compute_dtype)
    check_rank(r)
    check_alpha(alpha)
    check_dropout(dropout)


def check_apply_qlora_args(model: object, target_modules: object, r: object, alpha: object, dropout: object,
                           blocksize: object, double_quant: object, compute_dtype: object) -> None:
    """Guard of ``apply_qlora(model, target_modules, r, alpha, dropout, blocksize, double_quant, compute_dtype)``."""
    check_apply_lora_args(model, target_modules, r, alpha, dropout)
    check_quant_options(blocksize, double_quant, compute_dtype)


def check_copy_adapters_to_peft_args(model: object, peft_model: object, adapter: object) -> None:
    """Guard of ``copy_adapters_to_peft(model, peft_model, adapter)``."""
    check_model(model)
    check_model(peft_model)
    if not isinstance(adapter, str) or not adapter:
        raise TypeError(f"adapter must be the adapter's name, a non-empty str (peft's default: 'default'), "
                        f"got {adapter!r}")


def check_saved_tensor_log_args(exclude: object) -> None:
    """Guard of ``SavedTensorLog(exclude)``: None or an ``nn.Module``."""
    if exclude is not None:
        check_model(exclude)


def check_trace_flow_args(layer: object, x: object) -> None:
    """Guard of ``trace_flow(layer, x)``: a QLoRALinear (a LoRALinear whose base holds an NF4Tensor) and an input
    it accepts. (Checked by what the layer is made of: this module sits below the one that defines QLoRALinear.)"""
    if not (isinstance(layer, LoRALinear) and isinstance(getattr(layer.base, "nf4_weight", None), NF4Tensor)):
        raise TypeError(f"layer must be a QLoRALinear (QLoRALinear.from_linear(...)), got {type(layer).__name__}")
    check_lora_forward_args(x, layer.in_features)


def check_compare_training_args(steps: object, r: object, alpha: object, lr: object, batch: object, seq: object,
                                seed: object, compute_dtype: object, target_modules: object, device: object,
                                model: object = None, tokens: object = None, progress: object = False
                                ) -> torch.device:
    """Guard of ``compare_training(...)``; returns the device as a ``torch.device``. ``model`` None or an
    ``nn.Module``; ``tokens`` None or a 2-D integer tensor of at least two tokens a row; ``progress`` a bool."""
    check_int("steps", steps, low=1)
    check_rank(r)
    check_alpha(alpha)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    check_int("batch", batch, low=1)
    check_int("seq", seq, low=2)  # a causal LM loss needs at least two tokens
    check_int("seed", seed, low=0)
    check_compute_dtype(compute_dtype)
    check_target_modules(target_modules)
    if model is not None:
        check_model(model)
    if tokens is not None:
        check_tensor("tokens", tokens)
        if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must be a (batch, seq >= 2) tensor of token ids (int64), got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
    check_bool("progress", progress)
    return check_device("device", device)
