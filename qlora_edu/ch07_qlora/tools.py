"""Chapter 7's tools: instruments and harnesses around the QLoRA layer of :mod:`qlora_edu.ch07_qlora.qlora`.

Not lesson code (the learner writes :mod:`~qlora_edu.ch07_qlora.qlora`; the exercise imports these from here):

* :class:`SavedTensorLog`: records what autograd saves for backward (``saved_tensors_hooks``), the instrument that
  shows :class:`~qlora_edu.ch07_qlora.qlora.NF4Matmul` keeps no dequantized weight.
* :func:`compare_training`: trains one random Llama two ways, ours (``apply_qlora``) and peft + bitsandbytes, from
  the one set-up of :mod:`qlora_edu.common.training_setup`, and returns both loss curves
  (:class:`TrainingComparison`); :func:`copy_adapters_to_peft` gives both sides the same adapters.
* :func:`tiny_llama_config`: the small random Llama of the fast checks and the tests.

The bitsandbytes twins of the course's layer (``to_bnb_linear4bit``, ``apply_bnb_4bit``) are part of the model
set-up: :mod:`qlora_edu.common.training_setup`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from qlora_edu.ch05_optimizers.optim import training_losses
from qlora_edu.ch06_lora.lora import LLAMA_TARGETS, LoRALinear, count_parameters, lora_parameters
from qlora_edu.ch07_qlora.guards import (
    check_compare_training_args,
    check_copy_adapters_to_peft_args,
    check_saved_tensor_log_args,
)
from qlora_edu.common.training_setup import setup_training

__all__ = [
    "SavedTensorLog",
    "TrainingComparison",
    "compare_training",
    "copy_adapters_to_peft",
    "tiny_llama_config",
]


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
# Ours next to peft + bitsandbytes


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
    """Train one random Llama two ways, ours (:func:`~qlora_edu.ch07_qlora.qlora.apply_qlora`) and peft +
    bitsandbytes, and return both loss curves.

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
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # the random model's weights, then the adapters' initialization
    if model is None:
        reference = LlamaForCausalLM(tiny_llama_config() if config is None else config).to(device)
    else:
        reference = copy.deepcopy(model).to(device)
    # both sides from the one set-up, adapters drawn from the generator seeded above; no dropout, no checkpointing,
    # nothing upcast, and only the adapted projections in 4 bits, so the two compute the same function
    same = dict(r=r, alpha=alpha, dropout=0.0, targets=target_modules, gradient_checkpointing=False,
                prepare_kbit=False, compute_dtype=compute_dtype, seed=None)
    ours = setup_training(copy.deepcopy(reference), "qlora_scratch", **same)
    theirs = setup_training(reference, "qlora", quantize=target_modules, **same)
    copy_adapters_to_peft(ours, theirs)
    if tokens is None:
        tokens = torch.randint(ours.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device)

    # chapter 5's loop (the optimizer step of a lesson) on the one batch, for each side
    curves = [training_losses(trained, tokens[None], torch.optim.AdamW(params, lr=lr), steps, progress=progress,
                              desc=f"training, {side}")
              for side, trained, params in (("ours", ours, lora_parameters(ours)),
                                            ("peft + bitsandbytes", theirs,
                                             [p for p in theirs.parameters() if p.requires_grad]))]
    return TrainingComparison(curves[0], curves[1], (count_parameters(ours)[0], count_parameters(theirs)[0]))
