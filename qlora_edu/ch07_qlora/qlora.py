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
checkpointing: forward, recomputed forward, backward).

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

The end of the module compares with the real thing (bitsandbytes + peft): :func:`to_bnb_linear4bit`,
:func:`compare_training`, and shows what flows where (:func:`trace_flow`) and what autograd keeps
(:class:`SavedTensorLog`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor, dequantize_nf4, quantize_nf4
from qlora_edu.ch06_lora.lora import LLAMA_TARGETS, LoRALinear, count_parameters, lora_parameters, replace_linears
from qlora_edu.ch07_qlora.guards import (
    check_apply_bnb_4bit_args,
    check_apply_qlora_args,
    check_compare_training_args,
    check_copy_adapters_to_peft_args,
    check_nf4_from_linear_args,
    check_nf4_linear_args,
    check_nf4_linear_module_args,
    check_nf4_matmul_args,
    check_qlora_from_linear_args,
    check_saved_tensor_log_args,
    check_trace_flow_args,
)
from qlora_edu.common.progress import progress_bar

__all__ = [
    "FlowStep",
    "NF4Linear",
    "NF4Matmul",
    "QLoRALinear",
    "SavedTensorLog",
    "TrainingComparison",
    "apply_bnb_4bit",
    "apply_qlora",
    "compare_training",
    "copy_adapters_to_peft",
    "nf4_linear",
    "nf4_matmul",
    "tiny_llama_config",
    "to_bnb_linear4bit",
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
        # Hint: w = dequantize_nf4(weight) is (out, in) in the weight's dtype: cast it to x.dtype, then
        # Hint: out = F.linear(x, w, bias). For backward keep only the 4-bit storage: ctx.weight = weight
        # Hint: (a plain attribute, the layer holds those bytes anyway); do NOT ctx.save_for_backward(w).
        # Hint: End with `out`: the line below returns it.
        w = dequantize_nf4(weight).to(x.dtype)
        out = F.linear(x, w, bias)
        ctx.weight = weight  # `w` dies when forward returns: only the NF4 bytes stay reachable
        # END SOLUTION
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        grad_x = None
        # BEGIN SOLUTION
        # Hint: y = x W^T, so dL/dx = dL/dy @ W: dequantize ctx.weight again, cast to grad_out.dtype, matmul
        # Hint: (torch.matmul handles the leading batch dims). Only if ctx.needs_input_grad[0].
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
    # Hint: three casts around one nf4_matmul: x to compute_dtype, the bias (if any) to compute_dtype, the
    # Hint: result back to x.dtype. For the weight, dataclasses.replace(weight, dtype=compute_dtype) is an
    # Hint: NF4Tensor that dequantizes straight into compute_dtype (the same bits as dequantizing to its own
    # Hint: dtype and casting, without the float32 copy). End with `out`: the line below returns it.
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
        """The stored weight as an NF4Tensor (its ``dtype`` is the original weight's)."""
        return NF4Tensor(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.blocksize, self.double_quant, self.offset, self.absmax2,
                         self.blocksize2)

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


class _Held:
    """What :class:`SavedTensorLog` hands autograd for one saved tensor; releases its bytes when dropped."""

    __slots__ = ("tensor", "release")

    def __init__(self, tensor: torch.Tensor, release: Callable[[], None]):
        self.tensor, self.release = tensor, release

    def __del__(self):
        self.release()


class SavedTensorLog:
    """Records what autograd saves for backward while the ``with`` block is active.

    ``with SavedTensorLog(exclude=model) as log: loss = model(...).loss; loss.backward()`` then
    ``log.records`` lists ``(shape, dtype, nbytes)`` of every saved tensor and ``log.peak_bytes`` the most
    bytes held for backward at once (distinct storages: a tensor saved by three layers counts once).
    Tensors that share storage with ``exclude``'s parameters or buffers (weights saved by ``F.linear`` for
    the input's gradient) are not activations and are left out.

    With gradient checkpointing use ``use_reentrant=True``: the non-reentrant kind saves through its own
    hooks, which hide the recomputed layer's tensors from this log.
    """

    def __init__(self, exclude: nn.Module | None = None):
        check_saved_tensor_log_args(exclude)
        self.exclude = exclude
        self.records: list[tuple[tuple[int, ...], torch.dtype, int]] = []
        self.live_bytes = self.peak_bytes = 0
        self._held: dict[int, list[int]] = {}  # storage address -> [bytes, how many saves hold it]
        self._skip: set[int] = set()

    def __enter__(self) -> SavedTensorLog:
        module_tensors = [] if self.exclude is None else [*self.exclude.parameters(), *self.exclude.buffers()]
        self._skip = {t.untyped_storage().data_ptr() for t in module_tensors}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor | _Held:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._skip or storage.nbytes() == 0:
            return t
        self.records.append((tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        entry = self._held.setdefault(key, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.live_bytes += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        # detach(): the same storage without the autograd history (holding t itself could tie a reference
        # cycle through t.grad_fn and free the memory later than autograd normally does)
        return _Held(t.detach(), functools.partial(self._release, key))

    def _release(self, key: int) -> None:
        entry = self._held[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._held[key]

    @staticmethod
    def _unpack(held: torch.Tensor | _Held) -> torch.Tensor:
        return held.tensor if isinstance(held, _Held) else held


# ----------------------------------------------------------------------------------------------
# The real thing: bitsandbytes' Linear4bit and peft's LoRA, for comparison


def to_bnb_linear4bit(base: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                      compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """bitsandbytes' ``Linear4bit`` (NF4) built from ``base``'s weight, quantized on ``base``'s device.

    On the CPU its packed codes and constants are byte for byte those of
    ``quantize_nf4(base.weight, blocksize, double_quant)`` (grid rounding), so the two layers can be compared
    exactly. Compare in train mode: in eval mode under ``torch.no_grad()`` on AVX512-BF16 CPUs bitsandbytes
    repacks the weight for a bf16 kernel (approximating the constants).
    """
    check_nf4_from_linear_args(base, blocksize, double_quant, compute_dtype)
    import bitsandbytes as bnb

    device = base.weight.device
    layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                              device="meta")
    # Params4bit shares base.weight's storage until it quantizes, then holds only the 4-bit bytes
    layer.weight = bnb.nn.Params4bit(base.weight.detach(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4", module=layer)
    if base.bias is not None:
        layer.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # Params4bit quantizes when it is moved to a (non-meta) device


def apply_bnb_4bit(model: nn.Module, target_modules: Sequence[str], blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The bitsandbytes twin of :func:`apply_qlora`'s base: the selected linears become ``Linear4bit`` (NF4),
    everything frozen. Put peft's LoRA on it with ``get_peft_model``. Returns ``model`` (changed in place)."""
    check_apply_bnb_4bit_args(model, target_modules, blocksize, double_quant, compute_dtype)
    return replace_linears(model, target_modules,
                           lambda linear: to_bnb_linear4bit(linear, blocksize, double_quant, compute_dtype))


def copy_adapters_to_peft(model: nn.Module, peft_model: nn.Module, adapter: str = "default") -> int:
    """Copy every (Q)LoRA layer's ``A`` and ``B`` of ``model`` into the same-named layer of ``peft_model``
    (a ``PeftModel`` built on an identical copy of the original model). Returns the number of layers copied."""
    check_copy_adapters_to_peft_args(model, peft_model, adapter)
    copied = 0
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                twin = peft_model.get_submodule(f"base_model.model.{name}")
                twin.lora_A[adapter].weight.copy_(layer.lora_A)
                twin.lora_B[adapter].weight.copy_(layer.lora_B)
                copied += 1
    return copied


def tiny_llama_config(**overrides):
    """A small random Llama (2 layers, hidden 128, MLP 256, 4 heads / 2 KV heads, vocab 256) for fast checks.

    Every dimension is a multiple of 64, so each weight row is whole NF4 blocks (bitsandbytes 0.50.2
    dequantizes some other multi-row shapes wrongly on AVX512 CPUs). Keyword arguments override fields.
    """
    from transformers import LlamaConfig

    fields = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                  tie_word_embeddings=True)
    return LlamaConfig(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class TrainingComparison:
    """Loss curves of the same training through ours and through peft + bitsandbytes."""

    ours: list[float]
    peft: list[float]
    trainable: tuple[int, int]  # trainable parameters: ours, peft's

    @property
    def max_abs_diff(self) -> float:
        return max(abs(a - b) for a, b in zip(self.ours, self.peft, strict=True))


def compare_training(steps: int = 30, *, r: int = 8, alpha: float = 16, lr: float = 1e-3, batch: int = 4,
                     seq: int = 32, seed: int = 0, compute_dtype: torch.dtype = torch.bfloat16,
                     target_modules: Sequence[str] = LLAMA_TARGETS, config=None,
                     device: str | torch.device = "cpu", model: nn.Module | None = None,
                     tokens: torch.Tensor | None = None, progress: bool = False) -> TrainingComparison:
    """Train one random Llama two ways, ours (:func:`apply_qlora`) and peft + bitsandbytes, and return both
    loss curves.

    Both start from the same weights (the same NF4 bytes), the same adapters (ours, copied into peft's), and
    see the same batch of random tokens every step (so the loss falls: the model memorizes it), with
    ``torch.optim.AdamW(lr=lr)`` on the adapters. peft's side is what ``get_peft_model`` builds on
    ``Linear4bit`` layers: adapters in float32, everything else frozen.

    Args:
        steps: optimizer steps.
        r, alpha: the adapters (no dropout, so both sides compute the same function).
        lr: AdamW learning rate.
        batch, seq: the batch of token ids.
        seed: seeds the model, the adapters and the tokens.
        compute_dtype: dtype of the 4-bit matmuls.
        target_modules: which projections get adapters.
        config: a transformers ``LlamaConfig`` (default :func:`tiny_llama_config`).
        device: where both models train. On CUDA bitsandbytes rounds the double-quantized constants to the
            nearest code and ``quantize_nf4`` to its CPU grid, so ~0.2% of the constants differ slightly.
        model: a Hugging Face causal LM to start from instead of a random Llama (``config`` and ``seed``'s
            weights are then unused); it is copied twice and not changed.
        tokens: a ``(batch, seq)`` batch of token ids to train on instead of random ones (``batch``, ``seq``
            are then unused).
        progress: show a progress bar per side.

    Returns:
        a :class:`TrainingComparison` with the per-step losses of both.
    """
    device = check_compare_training_args(steps, r, alpha, lr, batch, seq, seed, compute_dtype, target_modules, device,
                                         model, tokens, progress)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # the adapters' initialization (and the random model's weights)
    if model is None:
        reference = LlamaForCausalLM(tiny_llama_config() if config is None else config).to(device)
    else:
        reference = copy.deepcopy(model).to(device)
    ours = apply_qlora(copy.deepcopy(reference), target_modules, r, alpha, 0.0, 64, True, compute_dtype)
    theirs = apply_bnb_4bit(reference, target_modules, 64, True, compute_dtype)
    theirs = get_peft_model(theirs, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                               target_modules=list(target_modules)))
    copy_adapters_to_peft(ours, theirs)
    if tokens is None:
        tokens = torch.randint(ours.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device)

    curves = []
    for side, trained, params in (("ours", ours, lora_parameters(ours)),
                                  ("peft + bitsandbytes", theirs, [p for p in theirs.parameters() if p.requires_grad])):
        trained.train()
        optimizer = torch.optim.AdamW(params, lr=lr)
        losses = []
        for _ in progress_bar(range(steps), desc=f"training, {side}", enabled=progress):
            loss = trained(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    return TrainingComparison(curves[0], curves[1], (count_parameters(ours)[0], count_parameters(theirs)[0]))
