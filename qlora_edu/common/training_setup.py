"""One model set-up for training: full fine-tuning, LoRA, QLoRA (peft + bitsandbytes) and QLoRA from scratch.

Every place of the course that trains or measures a model (chapter 4's memory probes, chapter 7's comparison with
the libraries, chapter 8's fine-tune, the labs, the benchmarks) sets it up here, so the four recipes are written once:

* ``"full"``: every weight trained (checkpointing: ``gradient_checkpointing_enable``).
* ``"lora"``: the base frozen, peft's LoRA (:func:`lora_config`) on the target projections; with checkpointing the
  embeddings' output is made to require grad (``enable_input_require_grads``), or a checkpointed block whose inputs
  and weights are all frozen would hand no gradient to the adapters inside it.
* ``"qlora"``: the QLoRA paper's recipe with the libraries: the base's decoder linears as bitsandbytes
  ``Linear4bit`` (loaded with :func:`bnb_config`, NF4 + double quantization + ``compute_dtype`` matmuls, or
  swapped in here by :func:`apply_bnb_4bit` when the model is still dense), peft's
  ``prepare_model_for_kbit_training`` (freeze, upcast the 16-bit weights left dense to float32, checkpointing),
  then LoRA.
* ``"qlora_scratch"``: the same recipe with the course's own layers (chapter 7's ``apply_qlora``) and by hand what
  ``prepare_model_for_kbit_training`` does.

:func:`load_for_training` loads a model by name or folder (:func:`qlora_edu.common.base_model.load_base_model`) and
sets it up; :func:`setup_training` sets up a model already loaded. The adapters' random initialization draws from a
fork of torch's generator seeded with ``seed``: the same seed gives the same adapters whatever ran before, and the
caller's random state is left alone (``seed=None`` draws from the caller's generator instead).

:func:`make_optimizer` builds an optimizer from its one name (:data:`OPTIMIZERS`). :data:`LLAMA_TARGETS` is the one
list of the seven Llama projections (chapter 6 teaches it and exports it; it lives here, below every chapter, so
chapter 4's memory model and this set-up use the same tuple without importing a later chapter).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from qlora_edu.common.guards import check_bool, check_choice, check_dtype_choice, check_int, check_number
from qlora_edu.common.names import LLAMA_TARGETS, OPTIMIZERS, check_targets  # noqa: F401

__all__ = [
    "METHODS",
    "apply_bnb_4bit",
    "bnb_config",
    "load_for_training",
    "lora_config",
    "make_optimizer",
    "setup_training",
    "to_bnb_linear4bit",
]

METHODS = ("full", "lora", "qlora", "qlora_scratch")

_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Guards (common code keeps its guards beside it)


def _check_model(name: str, value: object) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (a transformers model), got {type(value).__name__}")
    return value


def _check_adapters(r: object, alpha: object, dropout: object, targets: object) -> tuple[str, ...]:
    check_int("r", r, low=1)
    check_number("alpha", alpha, low=0.0)
    check_number("dropout", dropout, low=0.0, high=1.0, high_open=True)
    return check_targets("targets", targets)


def _check_quant(blocksize: object, double_quant: object, compute_dtype: object) -> None:
    check_choice("blocksize", check_int("blocksize", blocksize, low=1), (32, 64, 128, 256, 512, 1024, 2048, 4096))
    check_bool("double_quant", double_quant)
    check_dtype_choice("compute_dtype", compute_dtype, _COMPUTE_DTYPES)


# ----------------------------------------------------------------------------------------------
# The libraries' configurations, written once


def bnb_config(compute_dtype: torch.dtype = torch.bfloat16):
    """The QLoRA paper's ``BitsAndBytesConfig``: NF4 (transformers' default is FP4, so it must be asked for), double
    quantization (the constants from 0.5 to 0.127 bits a weight), matmuls in ``compute_dtype``."""
    check_dtype_choice("compute_dtype", compute_dtype, _COMPUTE_DTYPES)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def lora_config(r: int = 64, alpha: float = 16.0, dropout: float = 0.05, targets: Sequence[str] = LLAMA_TARGETS):
    """peft's ``LoraConfig``: rank ``r``, scale ``alpha / r``, ``dropout`` on the adapters' input, adapters on
    ``targets``, no bias, a causal LM (the QLoRA paper's values are the defaults)."""
    targets = _check_adapters(r, alpha, dropout, targets)
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                      task_type="CAUSAL_LM")


def to_bnb_linear4bit(base: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                      compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """bitsandbytes' ``Linear4bit`` (NF4) built from ``base``'s weight, quantized on ``base``'s device.

    What ``from_pretrained(quantization_config=bnb_config())`` does to each decoder linear, for a model already in
    memory (a random-weight model, a copy). On the CPU its packed codes and constants are byte for byte those of
    chapter 3's ``quantize_nf4(base.weight, blocksize, double_quant)`` (grid rounding), so the two can be compared
    exactly. Compare in train mode: in eval mode under ``torch.no_grad()`` on AVX512-BF16 CPUs bitsandbytes
    repacks the weight for a bf16 kernel (approximating the constants).
    """
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
    _check_quant(blocksize, double_quant, compute_dtype)
    if not bool(torch.isfinite(base.weight.detach()).all()):
        raise ValueError("base.weight must be finite (a NaN or inf weight quantizes to garbage)")
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


def apply_bnb_4bit(model: nn.Module, targets: Sequence[str] = LLAMA_TARGETS, blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Every ``nn.Linear`` named one of ``targets`` (the last part of its name, as peft matches a list) becomes a
    bitsandbytes ``Linear4bit`` (:func:`to_bnb_linear4bit`), everything frozen; ``model.is_loaded_in_4bit`` is set
    as ``from_pretrained`` sets it (peft's ``prepare_model_for_kbit_training`` reads it). Returns ``model``
    (changed in place), the bitsandbytes twin of chapter 7's ``apply_qlora`` base."""
    _check_model("model", model)
    targets = check_targets("targets", targets)
    _check_quant(blocksize, double_quant, compute_dtype)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"targets {list(targets)} match no nn.Linear of the model")
    model.requires_grad_(False)
    for name in names:  # one layer at a time: each full-precision weight is freed as soon as it is quantized
        model.set_submodule(name, to_bnb_linear4bit(model.get_submodule(name), blocksize, double_quant,
                                                    compute_dtype))
    model.is_loaded_in_4bit = True
    return model


# ----------------------------------------------------------------------------------------------
# The set-up


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Run on a fork of torch's CPU generator seeded with ``seed`` (``None``: on the caller's generator)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _checkpointing(model: nn.Module, reentrant: bool | None) -> None:
    kwargs = {} if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    model.gradient_checkpointing_enable(**kwargs)


def _has_bnb_4bit(model: nn.Module) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def setup_training(model: nn.Module, method: str, *, r: int = 64, alpha: float = 16.0, dropout: float = 0.05,
                   targets: Sequence[str] = LLAMA_TARGETS, gradient_checkpointing: bool = True,
                   reentrant: bool | None = True, prepare_kbit: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16, seed: int | None = 0,
                   quantize: Sequence[str] = LLAMA_TARGETS) -> nn.Module:
    """Set a loaded model up for training with ``method`` (see the module docstring); returns it in train mode.

    Args:
        model: a transformers causal LM. For ``"qlora"`` it may hold bitsandbytes 4-bit layers already (loaded with
            :func:`bnb_config`) or be dense (its ``quantize`` linears are then swapped by :func:`apply_bnb_4bit`);
            for ``"qlora_scratch"`` it is dense and chapter 7's ``apply_qlora`` quantizes the ``targets``.
        method: one of :data:`METHODS`.
        r, alpha, dropout, targets: the adapters (unused by ``"full"``).
        gradient_checkpointing: recompute each decoder layer in the backward instead of keeping its activations.
        reentrant: the checkpointing kind (``use_reentrant``); True, peft's default, asked for explicitly (torch
            warns when it is left implicit, and only the reentrant kind lets ``saved_tensors_hooks`` see the
            recomputed layer's tensors); None leaves it to transformers and peft, as chapter 4's GPU measurements
            did.
        prepare_kbit: ``"qlora"``: call ``prepare_model_for_kbit_training``; ``"qlora_scratch"``: upcast the
            frozen 16-bit weights to float32 as it does.
        compute_dtype: the dtype of the 4-bit matmuls when this function quantizes.
        seed: seeds the adapters' initialization on a fork of torch's generator (None: the caller's generator).
        quantize: ``"qlora"`` on a dense model: the projections stored in 4 bits (QLoRA quantizes all seven,
            whichever get adapters).

    Returns:
        the model to train (a ``PeftModel`` for ``"lora"`` / ``"qlora"``); its trainable parameters are the
        adapters (every weight for ``"full"``).
    """
    _check_model("model", model)
    check_choice("method", method, METHODS)
    targets = _check_adapters(r, alpha, dropout, targets)
    check_bool("gradient_checkpointing", gradient_checkpointing)
    if reentrant is not None:
        check_bool("reentrant", reentrant)
    check_bool("prepare_kbit", prepare_kbit)
    check_dtype_choice("compute_dtype", compute_dtype, _COMPUTE_DTYPES)
    if seed is not None:
        check_int("seed", seed, low=0)
    quantize = check_targets("quantize", quantize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation of the gradient_checkpointing_* names
        if method == "full":
            model.requires_grad_(True)
            if gradient_checkpointing:
                _checkpointing(model, reentrant)
            return model.train()
        if method == "qlora_scratch":
            from qlora_edu.ch07_qlora.qlora import apply_qlora  # the one upward import: the course's own layer

            with _seeded(seed):
                model = apply_qlora(model, targets, r, alpha, dropout, compute_dtype=compute_dtype)
            if prepare_kbit:  # what prepare_model_for_kbit_training does to the weights left dense
                for p in model.parameters():
                    if not p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                        p.data = p.data.float()
            if gradient_checkpointing:
                _checkpointing(model, reentrant)
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
            return model.train()
        from peft import get_peft_model, prepare_model_for_kbit_training

        if method == "qlora" and not _has_bnb_4bit(model):
            apply_bnb_4bit(model, quantize, compute_dtype=compute_dtype)
        if method == "qlora" and prepare_kbit:
            kwargs = {} if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    **kwargs)
        else:
            model.requires_grad_(False)
            if gradient_checkpointing:
                _checkpointing(model, reentrant)
                model.enable_input_require_grads()
        with _seeded(seed):
            model = get_peft_model(model, lora_config(r, alpha, dropout, targets))
    return model.train()


def load_for_training(method: str, name_or_path: str | Path | None = None, *,
                      device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                      compute_dtype: torch.dtype = torch.bfloat16, progress: bool = True, **setup):
    """Load a model (:func:`~qlora_edu.common.base_model.load_base_model`) and :func:`setup_training` it.

    Args:
        method: one of :data:`METHODS`; ``"qlora"`` loads the base in 4 bits (:func:`bnb_config` of
            ``compute_dtype``), the others load it dense.
        name_or_path: ``None`` for the bundled SmolLM2-135M-Instruct (or ``$QLORA_EDU_MODEL``), else a Llama-style
            hub id or local folder.
        device: ``None`` keeps it on the CPU; ``"cuda"`` loads it there.
        dtype: the dtype of the weights that are not stored in 4 bits.
        compute_dtype: the 4-bit layers' matmul dtype.
        progress: show loading progress.
        **setup: the keywords of :func:`setup_training` (``r``, ``alpha``, ``dropout``, ``targets``, ``seed``, ...).

    Returns:
        ``(model, tokenizer)``.
    """
    check_choice("method", method, METHODS)
    check_dtype_choice("compute_dtype", compute_dtype, _COMPUTE_DTYPES)
    from qlora_edu.common.base_model import load_base_model

    quantization = bnb_config(compute_dtype) if method == "qlora" else None
    model, tokenizer = load_base_model(name_or_path, dtype=dtype, device=device, quantization_config=quantization,
                                       progress=progress)
    return setup_training(model, method, compute_dtype=compute_dtype, **setup), tokenizer


# ----------------------------------------------------------------------------------------------
# The optimizer


def make_optimizer(params: Iterable[nn.Parameter], name: str = "adamw", lr: float = 2e-4, *,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                   fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (:data:`OPTIMIZERS`) over ``params``.

    * ``"adamw"``: two float32 states a parameter, updated in place: ``torch.optim.AdamW`` (``fused`` passed on;
      None lets torch choose) when every parameter is float32 (torch keeps its states in the parameters' dtype),
      else bitsandbytes' ``AdamW32bit`` (float32 states for 16-bit weights).
    * ``"adamw8bit"``, ``"paged_adamw"``, ``"paged_adamw8bit"``: bitsandbytes' ``AdamW8bit``, ``PagedAdamW32bit``
      (the QLoRA paper's; on a CPU there is nothing to page and it runs as a plain AdamW), ``PagedAdamW8bit``.
    * ``"sgd"``: ``torch.optim.SGD`` (no state; ``betas``, ``eps`` unused).
    """
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError(f"params must be an iterable of parameters, got {type(params).__name__}")
    params = list(params)
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise ValueError("params must be a non-empty list of tensors (the parameters to train)")
    check_choice("name", name, OPTIMIZERS)
    check_number("lr", lr, low=0.0, low_open=True)
    check_number("weight_decay", weight_decay, low=0.0)
    if fused is not None:
        check_bool("fused", fused)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    kwargs = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw" and all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, fused=fused, **kwargs)
    import bitsandbytes as bnb

    classes = {"adamw": bnb.optim.AdamW32bit, "adamw8bit": bnb.optim.AdamW8bit,
               "paged_adamw": bnb.optim.PagedAdamW32bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        return classes[name](params, **kwargs)
