"""Argument checks of chapters 6 and 7 (:mod:`qlora_edu.lora`, :mod:`qlora_edu.qlora`).

One guard per public function, ``check_<function>_args``, called as the function's first line. Each
raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value) that names the
argument and says what was expected, so a wrong call fails before any tensor is touched.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from qlora_edu.validation import check_bool, check_float_tensor, check_int, check_power_of_two, check_tensor

__all__ = [
    "ADAPTER_DTYPES",
    "COMPUTE_DTYPES",
    "check_adapter_dtype",
    "check_alpha",
    "check_apply_bnb_4bit_args",
    "check_apply_lora_args",
    "check_apply_qlora_args",
    "check_compare_training_args",
    "check_compute_dtype",
    "check_config_or_shape",
    "check_copy_adapters_to_peft_args",
    "check_device",
    "check_dropout",
    "check_linear_base",
    "check_lora_forward_args",
    "check_lora_linear_args",
    "check_lora_param_count_args",
    "check_model",
    "check_nf4_from_linear_args",
    "check_nf4_linear_args",
    "check_nf4_matmul_args",
    "check_qlora_from_linear_args",
    "check_quant_options",
    "check_rank",
    "check_replace_linears_args",
    "check_saved_tensor_log_args",
    "check_target_modules",
    "check_trace_flow_args",
]

#: dtypes the adapters may be kept in (peft keeps them in float32 unless told otherwise)
ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: dtypes the dequantized NF4 weight may be multiplied in (QLoRA uses bfloat16)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Primitives of these two chapters


def check_rank(r: object) -> int:
    """``r`` must be an int >= 1 (the rank of the update ``B A``)."""
    return check_int("r", r, low=1)


def check_alpha(alpha: object) -> float:
    """``alpha`` must be a finite real number > 0 (int or float, not bool); the update is scaled by alpha / r."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"alpha must be a number (int or float), got {type(alpha).__name__}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    return float(alpha)


def check_dropout(dropout: object) -> float:
    """``dropout`` must be a probability in [0, 1) (int 0 allowed)."""
    if isinstance(dropout, bool) or not isinstance(dropout, int | float):
        raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def check_adapter_dtype(adapter_dtype: object) -> torch.dtype:
    """``adapter_dtype`` must be one of :data:`ADAPTER_DTYPES`."""
    if adapter_dtype not in ADAPTER_DTYPES:
        raise TypeError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {adapter_dtype!r}")
    return adapter_dtype


def check_compute_dtype(compute_dtype: object) -> torch.dtype:
    """``compute_dtype`` must be one of :data:`COMPUTE_DTYPES` (bfloat16, float16, float32)."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    return compute_dtype


def check_model(model: object) -> nn.Module:
    """``model`` must be a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_target_modules(target_modules: object) -> tuple[str, ...]:
    """``target_modules`` must be a non-empty list/tuple/set of non-empty module names like ``"q_proj"``.

    A bare string is refused: peft reads a string as a regular expression, a list as name suffixes, and
    silently matching something else than meant is worse than an error.
    """
    if isinstance(target_modules, str) or not isinstance(target_modules, Collection):
        raise TypeError("target_modules must be a list of module names, e.g. ['q_proj', 'v_proj'], "
                        f"got {type(target_modules).__name__}")
    names = tuple(target_modules)
    if not names:
        raise ValueError("target_modules must name at least one module, got an empty collection")
    for name in names:
        if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
            raise ValueError(f"target_modules must hold module names like 'q_proj' or 'layers.0.mlp.up_proj', "
                             f"got {name!r}")
    return names


def check_linear_base(base: object, base_class: type = nn.Linear) -> nn.Module:
    """``base`` must be an instance of ``base_class`` (``nn.Linear`` for LoRA, ``NF4Linear`` for QLoRA) with a
    floating-point weight if it has one."""
    if not isinstance(base, base_class):
        raise TypeError(f"base must be a {base_class.__module__}.{base_class.__name__}, got {type(base).__name__}")
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.dtype.is_floating_point:
        raise TypeError(f"base must have a floating-point weight, got dtype {weight.dtype}")
    return base


def check_config_or_shape(config_or_shape: object) -> object:
    """``config_or_shape`` must be a transformers Llama-style config (positive int ``hidden_size``,
    ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size``), a
    ``qlora_edu.storage.LlamaShape``, a LLaMA-1 name (``"7B"``, ``"13B"``, ``"33B"``, ``"65B"``) or a tuple of
    positive ints ``(hidden, intermediate, n_layers[, vocab])``."""
    from qlora_edu.storage import LLAMA_SHAPES, LlamaShape

    what = ("config_or_shape must be a transformers config, a LlamaShape, a name like '7B' or a tuple of positive "
            "ints (hidden, intermediate, n_layers[, vocab])")
    if hasattr(config_or_shape, "hidden_size"):
        for attr in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            check_int(f"config_or_shape.{attr}", getattr(config_or_shape, attr, None), low=1)
        return config_or_shape
    if isinstance(config_or_shape, LlamaShape):
        return config_or_shape
    if isinstance(config_or_shape, str):
        key = config_or_shape.upper().removeprefix("LLAMA-").removeprefix("LLAMA")
        if key not in LLAMA_SHAPES:
            raise ValueError(f"config_or_shape must name one of {sorted(LLAMA_SHAPES)}, got {config_or_shape!r}")
        return config_or_shape
    if isinstance(config_or_shape, tuple) and len(config_or_shape) in (3, 4):
        for i, value in enumerate(config_or_shape):
            check_int(f"config_or_shape[{i}]", value, low=1)
        return config_or_shape
    raise TypeError(f"{what}, got {config_or_shape!r}")


# ----------------------------------------------------------------------------------------------
# Chapter 6: qlora_edu.lora


def check_lora_linear_args(base: object, r: object, alpha: object, dropout: object, adapter_dtype: object,
                           base_class: type = nn.Linear) -> None:
    """Guard of ``LoRALinear(base, r, alpha, dropout, adapter_dtype=...)`` (``base_class``: the layer kind the
    adapter class wraps)."""
    check_linear_base(base, base_class)
    check_rank(r)
    check_alpha(alpha)
    check_dropout(dropout)
    check_adapter_dtype(adapter_dtype)


def check_lora_forward_args(x: object, in_features: int) -> torch.Tensor:
    """Guard of a (Q)LoRA layer's forward: ``x`` a floating tensor whose last dimension is ``in_features``.

    Finiteness is not checked (that would read every activation on every call); NaN flows through as it
    does through ``nn.Linear``.
    """
    check_float_tensor("x", x, finite=False)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features = {in_features} as its last dimension, got shape {tuple(x.shape)}")
    return x


def check_apply_lora_args(model: object, target_modules: object, r: object, alpha: object, dropout: object) -> None:
    """Guard of ``apply_lora(model, target_modules, r, alpha, dropout)``."""
    check_model(model)
    check_target_modules(target_modules)
    check_rank(r)
    check_alpha(alpha)
    check_dropout(dropout)


def check_replace_linears_args(model: object, target_modules: object, make_layer: object) -> None:
    """Guard of ``replace_linears(model, target_modules, make_layer)``."""
    check_model(model)
    check_target_modules(target_modules)
    if not callable(make_layer):
        raise TypeError(f"make_layer must be a function nn.Linear -> nn.Module, got {type(make_layer).__name__}")


def check_lora_param_count_args(config_or_shape: object, r: object, target_modules: object) -> None:
    """Guard of ``lora_param_count`` / ``trainable_percent(config_or_shape, r, target_modules)``."""
    from qlora_edu.lora import LLAMA_TARGETS

    check_config_or_shape(config_or_shape)
    check_rank(r)
    names = check_target_modules(target_modules)
    unknown = sorted(set(names) - set(LLAMA_TARGETS))
    if unknown:
        raise ValueError(f"target_modules must be among {list(LLAMA_TARGETS)}, got {unknown}")


# ----------------------------------------------------------------------------------------------
# Chapter 7: qlora_edu.qlora


def check_quant_options(blocksize: object, double_quant: object, compute_dtype: object) -> None:
    """``blocksize`` a power of two in 32..4096, ``double_quant`` a bool, ``compute_dtype`` bf16/fp16/fp32."""
    check_power_of_two("blocksize", blocksize, low=32, high=4096)
    check_bool("double_quant", double_quant)
    check_compute_dtype(compute_dtype)


def check_nf4_linear_args(weight: object, bias: object, compute_dtype: object) -> None:
    """Guard of ``NF4Linear(weight, bias, compute_dtype)``: a 2-D NF4Tensor, a matching bias or None."""
    from qlora_edu.nf4_tensor import NF4Tensor  # here, not at the top: the lessons import validation

    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"weight must be an NF4Tensor (from quantize_nf4), got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must hold a 2-D (out_features, in_features) matrix, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != weight.packed.device:
            raise ValueError(f"bias must be None or a ({weight.shape[0]},) tensor on {weight.packed.device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")
    check_compute_dtype(compute_dtype)


def check_nf4_from_linear_args(base: object, blocksize: object, double_quant: object, compute_dtype: object) -> None:
    """Guard of ``NF4Linear.from_linear`` / ``to_bnb_linear4bit(base, blocksize, double_quant, compute_dtype)``."""
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


def check_apply_bnb_4bit_args(model: object, target_modules: object, blocksize: object, double_quant: object,
                              compute_dtype: object) -> None:
    """Guard of ``apply_bnb_4bit(model, target_modules, blocksize, double_quant, compute_dtype)``."""
    check_model(model)
    check_target_modules(target_modules)
    check_quant_options(blocksize, double_quant, compute_dtype)


def check_copy_adapters_to_peft_args(model: object, peft_model: object, adapter: object) -> None:
    """Guard of ``copy_adapters_to_peft(model, peft_model, adapter)``."""
    check_model(model)
    check_model(peft_model)
    if not isinstance(adapter, str) or not adapter:
        raise TypeError(f"adapter must be the adapter's name, a non-empty str (peft's default: 'default'), "
                        f"got {adapter!r}")


def check_nf4_matmul_args(x: object, weight: object, bias: object) -> None:
    """Guard of ``nf4_matmul(x, weight, bias)``: ``x`` (..., in) in a compute dtype, ``weight`` an NF4Tensor of
    shape (out, in) on ``x``'s device, ``bias`` None or (out,) in ``x``'s dtype."""
    from qlora_edu.nf4_tensor import NF4Tensor  # here, not at the top: validation must not import the lessons

    check_float_tensor("x", x, finite=False)
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be in a compute dtype {COMPUTE_DTYPES}, got {x.dtype}")
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"weight must be an NF4Tensor (from quantize_nf4), got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight must hold a 2-D (out_features, in_features) matrix, got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have in_features = {weight.shape[1]} as its last dimension, "
                         f"got shape {tuple(x.shape)}")
    if weight.packed.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.packed.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be None or a ({weight.shape[0]},) tensor of x's dtype {x.dtype} on "
                             f"{x.device}, got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
        if bias.requires_grad:
            raise ValueError("bias must be frozen (requires_grad=False): nf4_matmul computes no bias gradient")


def check_saved_tensor_log_args(exclude: object) -> None:
    """Guard of ``SavedTensorLog(exclude)``: None or an ``nn.Module``."""
    if exclude is not None:
        check_model(exclude)


def check_trace_flow_args(layer: object, x: object) -> None:
    """Guard of ``trace_flow(layer, x)``: a QLoRALinear and an input it accepts."""
    from qlora_edu.qlora import QLoRALinear

    if not isinstance(layer, QLoRALinear):
        raise TypeError(f"layer must be a QLoRALinear, got {type(layer).__name__}")
    check_lora_forward_args(x, layer.in_features)


def check_device(device: object) -> torch.device:
    """``device`` must name a torch device that exists here (``"cpu"``, ``"cuda"``, a ``torch.device``)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch.device or a string like 'cpu' or 'cuda', got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {str(device)!r} but torch.cuda.is_available() is False; use 'cpu'")
    return device


def check_compare_training_args(steps: object, r: object, alpha: object, lr: object, batch: object, seq: object,
                                seed: object, compute_dtype: object, target_modules: object,
                                device: object) -> torch.device:
    """Guard of ``compare_training(...)``; returns the device as a ``torch.device``."""
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
    return check_device(device)

