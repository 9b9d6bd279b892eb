"""Chapter 6: LoRA, low-rank adapters on a frozen linear layer (Hu et al., 2021), the way peft does it.

A linear layer computes ``y = W x + b`` with ``W`` of shape ``(out, in)``. Fine-tuning changes ``W`` to
``W + dW``. LoRA's bet: the useful ``dW`` has low rank, so write it as a product of two thin matrices and
train only those:

    y = W x + b + (alpha / r) * B A dropout(x)        A: (r, in)   B: (out, r)   r << min(in, out)

* ``W`` and ``b`` are frozen (``requires_grad = False``): no gradient, no optimizer state for them.
* ``A`` starts random (``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in ``+-1/sqrt(in)``, the default of
  ``nn.Linear``, of peft and of ``loralib``, the LoRA paper's code; the paper's text draws ``A`` from a Gaussian,
  peft's ``init_lora_weights="gaussian"``), ``B`` starts at zero: ``B A = 0``, so training starts exactly at the
  pretrained model, and the first gradient step moves ``B`` (``dL/dB = s * g (A x)^T`` is not zero).
* ``alpha / r`` (``scaling``) keeps the size of the update roughly independent of ``r``: doubling the rank
  does not double the learning rate that works.
* The adapters are kept in float32 even when the model is bf16 (peft's default ``autocast_adapter_dtype``):
  their updates are small relative to their values, and bf16's 8-bit mantissa would round many of them
  away. The input is cast to the adapters' dtype for the adapter path, and the sum back to the output dtype.

Trainable parameters: ``r * (in + out)`` per adapted linear, against ``in * out`` frozen ones. For a
4096 x 4096 projection at ``r = 16``: 131,072 trainable vs 16,777,216 frozen (0.78%).
:func:`lora_param_count` does the sum for a whole model; the module docstring of
:mod:`qlora_edu.ch03_double_quant.storage`
has the LLaMA-1 shapes.

Shapes: ``x`` is ``(..., in)`` (any leading dims: batch, sequence), ``y`` is ``(..., out)``.

:func:`apply_lora` swaps the matching ``nn.Linear`` modules of a Hugging Face model for :class:`LoRALinear`
(matched like peft's ``target_modules``: by name, or by name suffix after a dot) and freezes the rest.
:mod:`qlora_edu.ch07_qlora.qlora` (chapter 7) reuses all of this and only swaps the frozen base for a 4-bit one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.ch03_double_quant.storage import LLAMA_SHAPES, LlamaShape
from qlora_edu.ch06_lora.guards import (
    check_apply_lora_args,
    check_config_or_shape,
    check_lora_forward_args,
    check_lora_linear_args,
    check_lora_param_count_args,
    check_model,
    check_replace_linears_args,
    check_target_modules,
)
from qlora_edu.common.names import LLAMA_TARGETS

__all__ = [
    "LLAMA_ATTENTION",
    "LLAMA_MLP",
    "LLAMA_TARGETS",
    "LoRALinear",
    "apply_lora",
    "base_param_count",
    "count_parameters",
    "find_target_linears",
    "llama_linear_shapes",
    "lora_param_count",
    "lora_parameters",
    "replace_linears",
    "trainable_percent",
]

#: The seven linear projections of a Llama decoder layer, by their names in transformers: ``LLAMA_TARGETS`` (the
#: course's one list, kept with the model set-up in :mod:`qlora_edu.common.training_setup`), attention's four and the
#: MLP's three.
LLAMA_ATTENTION = LLAMA_TARGETS[:4]  # q_proj, k_proj, v_proj, o_proj
LLAMA_MLP = LLAMA_TARGETS[4:]  # gate_proj, up_proj, down_proj


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: ``y = base(x) + (alpha / r) * B A dropout(x)``.

    Args:
        base: the layer to adapt, an ``nn.Linear`` (``in_features -> out_features``). It is frozen in place
            (its parameters get ``requires_grad = False``) and kept as ``.base``.
        r: rank of the update, >= 1.
        alpha: the update is scaled by ``alpha / r`` (``.scaling``).
        dropout: dropout probability on the adapter path's input (0 disables it, as in peft).
        adapter_dtype: dtype of ``A`` and ``B`` (keyword only; float32 by default, as peft).

    Attributes:
        lora_A: ``nn.Parameter`` of shape ``(r, in_features)``, uniform in ``+-1/sqrt(in_features)``.
        lora_B: ``nn.Parameter`` of shape ``(out_features, r)``, zeros.
        scaling: ``alpha / r``.
    """

    #: the kind of layer this adapter wraps (chapter 7's QLoRALinear wraps an NF4Linear instead)
    base_class: type[nn.Module] = nn.Linear

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, *,
                 adapter_dtype: torch.dtype = torch.float32):
        check_lora_linear_args(base, r, alpha, dropout, adapter_dtype, self.base_class)
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        # the base's device: nn.Linear has a weight; chapter 7's NF4Linear keeps its 4-bit weight in buffers
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        # BEGIN SOLUTION
        # Hint: two trainable parameters, self.lora_A and self.lora_B, in adapter_dtype on `device`: A maps
        # Hint: in_features down to r, B maps r up to out_features, so that B @ A has base.weight's shape.
        # Hint: Their values come next, in reset_lora_parameters.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=adapter_dtype, device=device))
        # END SOLUTION
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """peft's default initialization: ``A`` as ``nn.Linear`` initializes its weight, ``B = 0``.

        ``kaiming_uniform_(a=sqrt(5))`` draws from ``U(-bound, bound)`` with
        ``bound = sqrt(6 / ((1 + a^2) * fan_in)) = 1 / sqrt(in_features)``.
        """
        # BEGIN SOLUTION
        # Hint: as peft (and nn.Linear for its own weight): A random, uniform in +-1/sqrt(in_features); B zero, so
        # Hint: B A = 0 and the layer starts as exactly the base layer. (Not both zero: then no gradient would
        # Hint: ever move them.)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        # END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + scaling * B A dropout(x)``; ``x`` is ``(..., in_features)``, the result
        ``(..., out_features)`` in the dtype of ``base(x)`` (the input's dtype)."""
        check_lora_forward_args(x, self.in_features)
        result = self.base(x)  # W x + b, frozen
        # BEGIN SOLUTION
        # Hint: the adapter path runs in the adapters' dtype: dropout on the input, then A, then B, times the
        # Hint: scaling. Add it to `result` in that dtype and round the sum back to result.dtype once, as peft
        # Hint: does (the bf16 check compares bits). End with `out`: the line below returns it.
        h = self.dropout(x.to(self.lora_A.dtype))
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        out = (result + update).to(result.dtype)
        # END SOLUTION
        return out

    def base_weight(self) -> torch.Tensor:
        """The frozen ``W`` as a dense ``(out_features, in_features)`` tensor in its own dtype."""
        return self.base.weight.detach()

    def merge(self) -> nn.Linear:
        """A NEW ``nn.Linear`` computing the same function (dropout aside): weight ``W + scaling * B A``.

        The sum is taken in float32 (or float64 if ``W`` is) and rounded once to ``W``'s dtype; the
        base layer is not changed, so the adapters can keep training or be merged again.
        """
        weight = self.base_weight()
        bias = self.base.bias
        # BEGIN SOLUTION
        # Hint: a NEW layer (never self.base changed in place) whose weight is W + scaling * B A, the sum worked
        # Hint: out in float32 (or float64 if W is) and rounded once to W's dtype, with the base's bias.
        # Hint: End with `merged`: the line below returns it.
        work = torch.promote_types(weight.dtype, torch.float32)
        delta = (self.lora_B.detach().to(work) @ self.lora_A.detach().to(work)) * self.scaling
        # skip_init: no random initialization to overwrite (and no draw from torch's global RNG)
        merged = torch.nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=bias is not None,
                                          device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(weight.to(work) + delta)
            if bias is not None:
                merged.bias.copy_(bias)
        # END SOLUTION
        return merged

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:g}, adapter_dtype={self.lora_A.dtype}")


# ----------------------------------------------------------------------------------------------
# A whole model


def _matches_target(name: str, target_modules: Sequence[str]) -> bool:
    """peft's rule for a list of ``target_modules``: the full module name, or its suffix after a dot."""
    return any(name == target or name.endswith("." + target) for target in target_modules)


def find_target_linears(model: nn.Module, target_modules: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` pairs of ``model`` that ``target_modules`` selects, all ``nn.Linear``.

    Args:
        model: any ``nn.Module`` (a Hugging Face model: names like ``model.layers.0.self_attn.q_proj``).
        target_modules: names such as ``["q_proj", "v_proj"]``; a module matches when its name equals one,
            or ends with ``"." + one``.

    Returns:
        the matching modules in ``model.named_modules()`` order.

    Raises:
        ValueError: nothing matches (peft raises too: a typo must not train nothing).
        TypeError: a match is not an ``nn.Linear`` (e.g. ``"mlp"``, or a layer that already has adapters).
    """
    check_target_modules(target_modules)
    found = []
    for name, module in model.named_modules():
        if not name or not _matches_target(name, target_modules):
            continue
        if type(module) is not nn.Linear:  # exact type: a LoRALinear or a 4-bit layer must not be wrapped again
            raise TypeError(f"target_modules selects {name!r}, a {type(module).__name__}; only torch.nn.Linear "
                            "layers can be adapted (already adapted? then build the model afresh)")
        found.append((name, module))
    if not found:
        examples = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"target_modules {list(target_modules)} match no module of the model; its linear "
                         f"layers are named like {examples}")
    return found


def replace_linears(model: nn.Module, target_modules: Sequence[str],
                    make_layer: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Freeze every parameter of ``model``, then swap each selected ``nn.Linear`` for ``make_layer(linear)``
    (whose own new parameters, the adapters, stay trainable). Returns ``model`` (changed in place).

    Args:
        model: any ``nn.Module``.
        target_modules: names matched as in :func:`find_target_linears`.
        make_layer: builds the replacement from the original ``nn.Linear``.
    """
    check_replace_linears_args(model, target_modules, make_layer)
    names = [name for name, _ in find_target_linears(model, target_modules)]  # all found before anything changes
    model.requires_grad_(False)
    for name in names:
        # no reference to the old layer outlives this line: unless make_layer keeps it (LoRA does, QLoRA does
        # not), its full-precision weight is freed here, one layer at a time
        model.set_submodule(name, make_layer(model.get_submodule(name)))
    return model


def apply_lora(model: nn.Module, target_modules: Sequence[str], r: int, alpha: float,
               dropout: float = 0.0) -> nn.Module:
    """Turn ``model`` into a LoRA model: the selected linears become :class:`LoRALinear`, all else frozen.

    Args:
        model: a Hugging Face model (or any ``nn.Module``); changed in place.
        target_modules: module names matched like peft's list form, e.g. :data:`LLAMA_TARGETS` (all seven
            projections) or ``["q_proj", "v_proj"]`` (the LoRA paper's choice).
        r, alpha, dropout: as in :class:`LoRALinear`.

    Returns:
        ``model``; only its ``lora_A`` / ``lora_B`` parameters have ``requires_grad = True``.
    """
    check_apply_lora_args(model, target_modules, r, alpha, dropout)
    return replace_linears(model, target_modules, lambda linear: LoRALinear(linear, r, alpha, dropout))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters of every (Q)LoRA layer in ``model``: ``[A_1, B_1, A_2, B_2, ...]`` (for the optimizer)."""
    check_model(model)
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, as peft's ``print_trainable_parameters`` reports them.

    Shared (tied) parameters count once. Weights stored in 4 bits outside ``parameters()`` (chapter 7's
    ``NF4Linear``, which says so with a ``quantized_numel`` attribute) count with their logical size, as
    peft counts bitsandbytes' ``Params4bit`` (two weights a byte).
    """
    check_model(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(getattr(m, "quantized_numel", 0) for m in model.modules())
    return trainable, total


# ----------------------------------------------------------------------------------------------
# Counting without building a model


def llama_linear_shapes(config_or_shape: object) -> tuple[int, dict[str, tuple[int, int]], int]:
    """The seven projections of a Llama-style decoder layer as ``name -> (in_features, out_features)``.

    Args:
        config_or_shape: a transformers config (``LlamaConfig``: reads ``hidden_size``,
            ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
            ``head_dim``, ``vocab_size``, ``tie_word_embeddings``), a
            :class:`qlora_edu.ch03_double_quant.storage.LlamaShape`,
            a LLaMA-1 name (``"7B"``, ``"13B"``, ``"33B"``, ``"65B"``) or a tuple
            ``(hidden, intermediate, n_layers[, vocab])``. The last three are LLaMA-1: every head has its own
            key and value (k, v are ``hidden x hidden``), untied embeddings.

    Returns:
        ``(n_layers, shapes, other)`` where ``other`` counts the parameters outside the seven projections
        (embeddings, ``lm_head`` unless tied, RMSNorm weights).
    """
    check_config_or_shape(config_or_shape)
    if hasattr(config_or_shape, "hidden_size"):  # a transformers config: grouped-query attention possible
        c = config_or_shape
        h, inter, n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
        q_out = c.num_attention_heads * head_dim
        kv_out = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * head_dim
        vocab, tied = c.vocab_size, bool(getattr(c, "tie_word_embeddings", False))
    else:  # LLaMA-1: one key and value head per query head, untied embeddings
        if isinstance(config_or_shape, str):
            shape = LLAMA_SHAPES[config_or_shape.upper().removeprefix("LLAMA-").removeprefix("LLAMA")]
        elif isinstance(config_or_shape, tuple):
            shape = LlamaShape(*config_or_shape)
        else:
            shape = config_or_shape
        h, inter, n_layers, vocab, tied = shape.hidden, shape.intermediate, shape.n_layers, shape.vocab, False
        q_out = kv_out = h
    shapes = {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    other = vocab * h * (1 if tied else 2) + (2 * n_layers + 1) * h  # embeddings (+ lm_head), RMSNorms
    return n_layers, shapes, other


def lora_param_count(config_or_shape: object, r: int, target_modules: Sequence[str] = LLAMA_TARGETS) -> int:
    """Trainable parameters of LoRA at rank ``r`` on ``target_modules``: ``n_layers * sum r * (in + out)``.

    Args:
        config_or_shape: see :func:`llama_linear_shapes` (a ``LlamaConfig``, ``"7B"``, a tuple, ...).
        r: the rank.
        target_modules: a subset of :data:`LLAMA_TARGETS`.

    Returns:
        the number of adapter parameters (``A`` and ``B`` of every adapted projection of every layer).
    """
    check_lora_param_count_args(config_or_shape, r, target_modules)
    n_layers, shapes, _ = llama_linear_shapes(config_or_shape)
    return n_layers * sum(r * (shapes[name][0] + shapes[name][1]) for name in set(target_modules))


def base_param_count(config_or_shape: object) -> int:
    """All parameters of the model without adapters (134,515,008 for the course model, 6,738,415,616
    for LLaMA-1 7B); see :func:`llama_linear_shapes` for the argument."""
    check_config_or_shape(config_or_shape)
    n_layers, shapes, other = llama_linear_shapes(config_or_shape)
    return n_layers * sum(i * o for i, o in shapes.values()) + other


def trainable_percent(config_or_shape: object, r: int, target_modules: Sequence[str] = LLAMA_TARGETS) -> float:
    """``100 * lora / (base + lora)``: the "trainable%" that peft's ``print_trainable_parameters`` prints."""
    check_lora_param_count_args(config_or_shape, r, target_modules)
    lora = lora_param_count(config_or_shape, r, target_modules)
    return 100 * lora / (base_param_count(config_or_shape) + lora)
