"""Chapter 7: QLoRA from scratch, a LoRA layer whose frozen weight is stored in 4 bits (Dettmers et al., 2023).

QLoRA is chapter 6's LoRA with one change: the frozen ``W`` is kept as an
:class:`~qlora_edu.ch03_double_quant.nf4_tensor.NF4Tensor`
(NF4 codes plus double-quantized constants, chapter 3: 4.127 bits a weight instead of 16) and is turned back
into numbers only for the moment a matmul needs it:

    NF4 storage (uint8 codes + 8-bit constants) --dequantize--> W (out, in), compute dtype (bf16), temporary
    y = W x + b                                      in the compute dtype, then cast to x's dtype
      + (alpha / r) * B A dropout(x)                 the adapters, float32, the only trainable part

The computation is never done in 4 bits: 4 bits is only how ``W`` is *stored*. Gradients flow through
``W x`` to ``x`` (the layers below need them) but never into ``W``.

**Memory.** A plain ``F.linear(x, dequantize(W))`` would let autograd keep the dequantized ``W`` (out x in,
16 bits a weight) alive until backward, for every layer: the 4-bit storage would buy nothing during training.
:class:`NF4Matmul` is a ``torch.autograd.Function`` that keeps only the NF4 storage (which the layer holds
anyway) and dequantizes a second time in backward, where ``dL/dx = dL/dy W``. That is what bitsandbytes'
``MatMul4Bit`` does too. The price: one more dequantization per layer and step (three with gradient
checkpointing: forward, recomputed forward, backward). It does not shrink with the batch: at 4,096 tokens a
GPU dequantization is a fraction of the matmul it feeds, at 512 tokens several times it (chapter 7, section 6b),
which is why QLoRA's tokens/s trail LoRA's.

The layers:

* :func:`nf4_linear`: the frozen path as a function, ``x`` cast to the compute dtype, :class:`NF4Matmul`
  (+ ``b``), the result cast back to ``x``'s dtype.
* :class:`NF4Linear`: a frozen linear layer holding its weight as NF4 (buffers, so ``.to(device)`` moves
  them), ``forward(x) = nf4_linear(x, W, b, compute_dtype)``. Equal, bit for bit,
  to bitsandbytes' ``Linear4bit`` (train mode) built from the same weight.
* :class:`QLoRALinear`: :class:`~qlora_edu.ch06_lora.lora.LoRALinear` with an :class:`NF4Linear` as its base, nothing
  else changed (peft's ``tuners/lora`` does the same: the 4-bit layer only swaps the base).
* :func:`apply_qlora`: every selected ``nn.Linear`` of a model becomes a QLoRALinear, everything else frozen.

Shapes: ``x`` ``(..., in)``, ``y`` ``(..., out)``; ``A`` ``(r, in)``, ``B`` ``(out, r)``, float32.

The end of the module shows what flows where (:func:`trace_flow`). The instruments and harnesses around the layer
(what autograd keeps, :class:`~qlora_edu.ch07_qlora.tools.SavedTensorLog`; training next to peft + bitsandbytes,
:func:`~qlora_edu.ch07_qlora.tools.compare_training`) are in :mod:`qlora_edu.ch07_qlora.tools`; bitsandbytes' twin of
the layer is :func:`qlora_edu.common.training_setup.to_bnb_linear4bit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4, quantize_nf4
from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.ch06_lora.lora import LoRALinear, replace_linears
from qlora_edu.ch07_qlora.guards import (
    check_apply_qlora_args,
    check_nf4_from_linear_args,
    check_nf4_linear_args,
    check_nf4_linear_module_args,
    check_nf4_matmul_args,
    check_qlora_from_linear_args,
    check_trace_flow_args,
)

__all__ = [
    "FlowStep",
    "NF4Linear",
    "NF4Matmul",
    "QLoRALinear",
    "apply_qlora",
    "nf4_linear",
    "nf4_matmul",
    "trace_flow",
]


# ----------------------------------------------------------------------------------------------
# The 4-bit matmul, with a backward that keeps no dequantized weight


class NF4Matmul(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` stored as an :class:`NF4Tensor`, saving no dequantized ``W`` for backward.

    ``forward(ctx, x, weight, bias)``: ``x`` ``(..., in)`` in the compute dtype, ``weight`` an NF4Tensor of
    shape ``(out, in)``, ``bias`` ``(out,)`` in ``x``'s dtype or None. Returns ``(..., out)`` in ``x``'s dtype.
    ``backward`` returns ``dL/dx = dL/dy W`` and no gradient for ``W`` or ``b`` (both frozen).
    Call it through :func:`nf4_matmul`, which checks the arguments.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # BEGIN SOLUTION
        # Hint: dequantize the weight, in x's dtype, and apply it as a linear layer (x W^T + bias). For backward
        # Hint: keep only the 4-bit storage on ctx (the layer holds those bytes anyway), never the dense weight:
        # Hint: that is the memory QLoRA saves. End with `out`: the line below returns it.
        w = dequantize_nf4(weight).to(x.dtype)
        out = F.linear(x, w, bias)
        ctx.weight = weight  # `w` dies when forward returns: only the NF4 bytes stay reachable
        # END SOLUTION
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        grad_x = None
        # BEGIN SOLUTION
        # Hint: y = x W^T, so dL/dx = dL/dy W, with W dequantized again from the storage kept on ctx, in
        # Hint: grad_out's dtype; only if x needs a gradient (ctx.needs_input_grad).
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_out, dequantize_nf4(ctx.weight).to(grad_out.dtype))
        # END SOLUTION
        return grad_x, None, None


def nf4_matmul(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for an NF4-stored ``W``, differentiable in ``x`` only (:class:`NF4Matmul`).

    Args:
        x: ``(..., in)`` in a compute dtype (bfloat16, float16 or float32).
        weight: an NF4Tensor of shape ``(out, in)`` on ``x``'s device; dequantized to its ``dtype``, then
            cast to ``x.dtype``.
        bias: None, or a frozen ``(out,)`` tensor in ``x``'s dtype.

    Returns:
        ``(..., out)`` in ``x``'s dtype, equal to ``F.linear(x, dequantize_nf4(weight).to(x.dtype), bias)``.
    """
    check_nf4_matmul_args(x, weight, bias)
    return NF4Matmul.apply(x, weight, bias)


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None,
               compute_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """QLoRA's frozen path: ``y = x W^T + b`` with ``W`` stored in NF4, computed in ``compute_dtype``, returned in
    ``x``'s dtype (what bitsandbytes' ``Linear4bit`` does in its forward).

    Args:
        x: ``(..., in)``, any floating dtype (float32 activations, bf16 ones, ...).
        weight: an NF4Tensor of shape ``(out, in)`` on ``x``'s device (its ``dtype``, the original weight's,
            does not matter here: it is dequantized straight into ``compute_dtype``).
        bias: None or a frozen ``(out,)`` floating tensor (cast to ``compute_dtype`` for the sum).
        compute_dtype: the dtype of the dequantized weight and of the matmul (bfloat16 in QLoRA).

    Returns:
        ``(..., out)`` in ``x.dtype``: ``F.linear(x.to(cd), dequantize(W).to(cd), b.to(cd)).to(x.dtype)``,
        differentiable in ``x`` only, keeping no dequantized ``W`` for backward (:class:`NF4Matmul`).
    """
    check_nf4_linear_args(x, weight, bias, compute_dtype)
    # BEGIN SOLUTION
    # Hint: one nf4_matmul in compute_dtype: x, the weight and the bias (if any) in compute_dtype, the result
    # Hint: back in x's dtype. An NF4Tensor can dequantize straight into another dtype (see its `dtype` field).
    # Hint: End with `out`: the line below returns it.
    w = dataclasses.replace(weight, dtype=compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    out = nf4_matmul(x.to(compute_dtype), w, b).to(x.dtype)
    # END SOLUTION
    return out


# ----------------------------------------------------------------------------------------------
# The frozen 4-bit linear layer


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes' ``Linear4bit``, from scratch).

    Args:
        weight: the NF4Tensor of the ``(out_features, in_features)`` weight (from :func:`quantize_nf4`).
        bias: None or the ``(out_features,)`` bias (kept frozen, in its own dtype).
        compute_dtype: the dtype the weight is dequantized to and the matmul runs in (bfloat16 in QLoRA).

    The NF4Tensor's tensors are registered as buffers (``packed``, ``absmax``, ``offset``, ``absmax2``):
    they move with ``.to(device)`` and appear in ``state_dict()``, but ``.to(dtype)`` / ``.half()`` leave
    them alone (they are codes and constants, not float weights).
    """

    _STORAGE = ("packed", "absmax", "offset", "absmax2")

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        check_nf4_linear_module_args(weight, bias, compute_dtype)
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.weight_dtype, self.blocksize, self.blocksize2 = weight.dtype, weight.blocksize, weight.blocksize2
        self.double_quant = weight.double_quant
        for name in self._STORAGE:
            self.register_buffer(name, getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, base: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Quantize ``base.weight`` to NF4 (``quantize_nf4(weight, blocksize, double_quant)``) and keep its bias.

        Args:
            base: an ``nn.Linear`` (not changed; drop it to free its full-precision weight).
            blocksize: weights per absmax block (64 in QLoRA).
            double_quant: quantize the constants to 8 bits too (QLoRA: yes).
            compute_dtype: see the class.
        """
        check_nf4_from_linear_args(base, blocksize, double_quant, compute_dtype)
        return cls(quantize_nf4(base.weight.detach(), blocksize, double_quant), base.bias, compute_dtype)

    @property
    def nf4_weight(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (its ``dtype`` is the original weight's).

        Built (and checked) once per set of stored tensors, not on every forward pass: the checks cost ~18 us a
        weight, a few milliseconds a step for a 7B model. It is rebuilt when a buffer is replaced (``.to(device)``
        moves them into new tensors); ``load_state_dict`` copies into the same tensors, so the cache stays valid.
        """
        parts = (self.packed, self.absmax, self.offset, self.absmax2)
        cached = self.__dict__.get("_nf4_cache")
        if cached is None or any(a is not b for a, b in zip(cached[0], parts, strict=True)):
            weight = NF4Tensor(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                               self.weight_dtype, self.blocksize, self.double_quant, self.offset, self.absmax2,
                               self.blocksize2)
            cached = self.__dict__["_nf4_cache"] = (parts, weight)
        return cached[1]

    @property
    def quantized_numel(self) -> int:
        """Weights stored in 4 bits, for :func:`qlora_edu.ch06_lora.lora.count_parameters`."""
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` computed in ``compute_dtype``, returned in ``x``'s dtype (:func:`nf4_linear`)."""
        return nf4_linear(x, self.nf4_weight, self.bias, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .half call fn on every parameter and buffer. The 4-bit storage may move to
        # another device but must keep its dtypes: take it out, let nn.Module handle the rest (the bias),
        # then move the storage to where fn sends a uint8 tensor (fn never changes an integer dtype).
        stored = {name: self._buffers.pop(name) for name in self._STORAGE}
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, dtype=torch.uint8, device=stored["packed"].device)).device
            for name, t in stored.items():
                self._buffers[name] = None if t is None else t.to(device)
        return self

    def extra_repr(self) -> str:
        bits = 8 * sum(t.numel() * t.element_size() for t in self.buffers()) / self.quantized_numel
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"NF4 blocksize={self.blocksize}, double_quant={self.double_quant}, {bits:.3f} bits/weight, "
                f"compute_dtype={self.compute_dtype}")


# ----------------------------------------------------------------------------------------------
# QLoRA = LoRA on an NF4 base


class QLoRALinear(LoRALinear):
    """:class:`~qlora_edu.ch06_lora.lora.LoRALinear` whose frozen base is an :class:`NF4Linear`:
    ``y = NF4Linear(x) + (alpha / r) * B A dropout(x)``, the output in ``x``'s dtype.

    Build it with :meth:`from_linear`. ``lora_A``, ``lora_B``, ``scaling``, ``forward`` and ``merge`` are
    LoRALinear's; only the base differs.
    """

    base_class = NF4Linear

    @classmethod
    def from_linear(cls, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> QLoRALinear:
        """Quantize ``base`` to NF4 and put adapters on it.

        Args:
            base: the ``nn.Linear`` to replace (not changed).
            r, alpha, dropout: as in :class:`~qlora_edu.ch06_lora.lora.LoRALinear` (adapters float32, on ``base``'s
            device).
            blocksize, double_quant, compute_dtype: as in :meth:`NF4Linear.from_linear`.
        """
        check_qlora_from_linear_args(base, r, alpha, dropout, blocksize, double_quant, compute_dtype)
        return cls(NF4Linear.from_linear(base, blocksize, double_quant, compute_dtype), r, alpha, dropout)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight dequantized to its original dtype (what :meth:`merge` adds ``B A`` to)."""
        return dequantize_nf4(self.base.nf4_weight)


def apply_qlora(model: nn.Module, target_modules: Sequence[str], r: int, alpha: float, dropout: float = 0.0,
                blocksize: int = 64, double_quant: bool = True,
                compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Turn ``model`` into a QLoRA model: the selected linears become :class:`QLoRALinear`, all else frozen.

    Each replaced ``nn.Linear`` is dropped as soon as it is quantized, so its full-precision weight is freed
    (unless something else holds it). Embeddings, norms and ``lm_head`` keep their dtype (QLoRA quantizes
    the decoder's linear layers only).

    Args:
        model: a Hugging Face model (or any ``nn.Module``); changed in place.
        target_modules: e.g. :data:`~qlora_edu.ch06_lora.lora.LLAMA_TARGETS`, matched like peft's list form.
        r, alpha, dropout: the adapters (:class:`~qlora_edu.ch06_lora.lora.LoRALinear`).
        blocksize, double_quant, compute_dtype: the 4-bit base (:class:`NF4Linear`).

    Returns:
        ``model``; only its ``lora_A`` / ``lora_B`` parameters are trainable.
    """
    check_apply_qlora_args(model, target_modules, r, alpha, dropout, blocksize, double_quant, compute_dtype)
    return replace_linears(model, target_modules, lambda linear: QLoRALinear.from_linear(
        linear, r, alpha, dropout, blocksize, double_quant, compute_dtype))


# ----------------------------------------------------------------------------------------------
# What flows where, and what autograd keeps


class FlowStep(NamedTuple):
    """One row of :func:`trace_flow`: a real tensor of the computation."""

    step: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    bytes: int


def trace_flow(layer: QLoRALinear, x: torch.Tensor) -> list[FlowStep]:
    """The tensors of one QLoRALinear forward, in order, with their dtypes, shapes and sizes.

    The steps the QLoRA diagram draws: NF4 storage -> dequantize -> matmul in the compute dtype -> + (alpha/r)
    B A x -> output; only A and B are trainable. Dropout is left out (as in eval mode). The output row is
    ``layer(x)`` itself, computed by the layer; the other rows are the same operations done one by one.

    Args:
        layer: a :class:`QLoRALinear`.
        x: ``(..., in_features)`` input.

    Returns:
        a list of :class:`FlowStep` ``(step, dtype, shape, bytes)``.
    """
    check_trace_flow_args(layer, x)
    steps: list[FlowStep] = []

    def log(step: str, t: torch.Tensor) -> torch.Tensor:
        steps.append(FlowStep(step, t.dtype, tuple(t.shape), t.numel() * t.element_size()))
        return t

    base, stored = layer.base, layer.base.nf4_weight
    with torch.no_grad():
        log("input x", x)
        log("stored: NF4 codes, two a byte (frozen)", stored.packed)
        kind = "8-bit codes of the absmax constants" if stored.double_quant else "absmax constants"
        log(f"stored: {kind}, one a block of {stored.blocksize}", stored.absmax)
        if stored.double_quant:
            log(f"stored: second-level constants, one per {stored.blocksize2} constants", stored.absmax2)
            log("stored: offset (mean of the constants)", stored.offset)
        x_c = log("x cast to the compute dtype", x.to(base.compute_dtype))
        w = log("dequantized W (temporary, freed after the matmul)",
                dequantize_nf4(dataclasses.replace(stored, dtype=base.compute_dtype)))
        bias = None if base.bias is None else base.bias.to(base.compute_dtype)
        log("W x + b in the compute dtype (frozen path)", F.linear(x_c, w, bias))
        del w
        log("A (trainable)", layer.lora_A)
        log("B (trainable)", layer.lora_B)
        a_x = log("A x (rank r)", F.linear(x.to(layer.lora_A.dtype), layer.lora_A))
        log("(alpha / r) B A x", F.linear(a_x, layer.lora_B) * layer.scaling)
        was_training = layer.training
        try:
            log("output W x + b + (alpha / r) B A x, in x's dtype", layer.eval()(x))
        finally:
            layer.train(was_training)
    return steps
