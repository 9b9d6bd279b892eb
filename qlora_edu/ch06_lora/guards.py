"""Argument checks of chapter 6 (:mod:`qlora_edu.ch06_lora.lora`); chapter 7 reuses the primitives here
(:mod:`qlora_edu.ch07_qlora.guards`).

One guard per public function, ``check_<function>_args``, called as the function's first line. Each
raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value) that names the
argument and says what was expected, so a wrong call fails before any tensor is touched.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from qlora_edu.ch03_double_quant.storage import LLAMA_SHAPES, LlamaShape
from qlora_edu.common.guards import check_dtype_choice, check_float_tensor, check_int
from qlora_edu.common.names import LLAMA_TARGETS

__all__ = [
    "ADAPTER_DTYPES",
    "check_adapter_dtype",
    "check_alpha",
    "check_apply_lora_args",
    "check_config_or_shape",
    "check_dropout",
    "check_linear_base",
    "check_lora_forward_args",
    "check_lora_linear_args",
    "check_lora_param_count_args",
    "check_model",
    "check_rank",
    "check_replace_linears_args",
    "check_target_modules",
]

#: dtypes the adapters may be kept in (peft keeps them in float32 unless told otherwise)
ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: dtypes the dequantized NF4 weight may be multiplied in (QLoRA uses bfloat16)


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
    return check_dtype_choice("adapter_dtype", adapter_dtype, ADAPTER_DTYPES)



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
    ``qlora_edu.ch03_double_quant.storage.LlamaShape``, a LLaMA-1 name (``"7B"``, ``"13B"``, ``"33B"``, ``"65B"``) or a
    tuple of
    positive ints ``(hidden, intermediate, n_layers[, vocab])``."""

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
# Chapter 6: qlora_edu.ch06_lora.lora


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

    check_config_or_shape(config_or_shape)
    check_rank(r)
    names = check_target_modules(target_modules)
    unknown = sorted(set(names) - set(LLAMA_TARGETS))
    if unknown:
        raise ValueError(f"target_modules must be among {list(LLAMA_TARGETS)}, got {unknown}")
