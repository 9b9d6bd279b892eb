"""Chapter 8: the full QLoRA fine-tune of a real model, the standard recipe, one choice at a time.

The recipe (Dettmers et al., 2023, and the defaults of their code, ``artidoro/qlora``):

1. **Load the base in 4 bits**: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)`` (:func:`bnb_config`). NF4 because the
   weights are roughly normal (chapter 2; transformers' default is FP4, so it must be asked for), double
   quantization because it takes the constants from 0.5 to 0.127 bits a weight (chapter 3), bf16 compute
   because the 4-bit codes are only storage: every matmul runs on dequantized bf16 weights (float16 on GPUs
   without bf16, float32 on CPUs without bf16 instructions: whatever :func:`qlora_edu.common.device.pick_compute`
   says).
2. **prepare_model_for_kbit_training** (peft): freezes every weight, upcasts every weight that is not 4-bit
   (embeddings, norms, ``lm_head``) to float32 for stable training, and turns on gradient checkpointing
   with input gradients. Its cost is memory: the embeddings and head in float32 instead of bf16.
3. **LoRA on all seven linear projections** of every decoder layer (q, k, v, o, gate, up, down):
   ``LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05)`` in the paper (:func:`lora_config`); the paper found
   that adapting every linear layer, not only q and v, is what matches full fine-tuning.
4. **Paged AdamW** (bitsandbytes' ``PagedAdamW``, 32-bit states, weight decay 0): its states live in CUDA
   unified memory and move to the host if the GPU runs out (chapter 5). On a CPU there is nothing to page:
   bitsandbytes warns "Paged optimizers are not supported on CPU" and runs it as a plain AdamW.
5. **The schedule**: learning rate 2e-4, constant after a linear warm-up over the first 3% of the steps
   ("constant a bit better than cosine, and has advantage for analysis"), gradient clipping at norm 0.3
   ("tuned and works well for all models tested"), loss on the responses only.

**A CPU budget changes two numbers.** The paper trains thousands of steps; two CPU cores afford about seventy
(batch 8) in six minutes. :func:`default_config` keeps the recipe and, on a CPU, raises the learning rate to
1e-3 and takes ``r = 16`` (``alpha = 16``, so ``alpha / r = 1`` instead of the paper's 0.25): a larger
effective step, so the short run gets somewhere; the notebook measures what the paper's values give in the
same steps. On a GPU it uses the paper's values and a longer budget.

**The loop** (:func:`train`) is a plain PyTorch loop, not ``transformers.Trainer``: every step is visible.
Batch ``k`` is a pure function of the seed and ``k`` (:func:`batch_indices`), so a run can stop anywhere and
resume from a checkpoint (adapter, optimizer states, step, RNG state: :func:`save_checkpoint`) to exactly the
numbers of an uninterrupted run. Adapters are saved in PEFT's format, atomically (:func:`atomic_directory`:
written into a temporary sibling folder, then renamed over the old one), so a crash mid-save keeps the previous
adapter.

**Evaluation** (:func:`evaluate`) generates greedily for the held-out orders and scores them exactly
(:func:`qlora_edu.ch08_finetune.instruct_data.score_answers`). One bitsandbytes quirk matters here: on a CPU with
AVX512-BF16,
a ``Linear4bit`` in eval mode under ``no_grad`` permanently repacks its weight for a bf16 inference kernel
(approximate constants, and training through it afterwards is not supported). :func:`inference_mode` therefore
puts the model in eval mode (no dropout) but leaves the 4-bit layers' flag in train mode.

``python -m qlora_edu.ch08_finetune.finetune --help`` runs the same fine-tune from a terminal (:func:`main`); its last
line of
output is one JSON object with the scores before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from qlora_edu.ch06_lora.lora import LLAMA_TARGETS
from qlora_edu.ch08_finetune.guards import (
    check_atomic_directory_args,
    check_batch_indices_args,
    check_bnb_config_args,
    check_build_optimizer_args,
    check_calibration_step_seconds_args,
    check_default_config_args,
    check_evaluate_args,
    check_finetune_config,
    check_generate_replies_args,
    check_inference_mode_args,
    check_learning_rate_at_args,
    check_load_checkpoint_args,
    check_load_finetuned_args,
    check_load_qlora_model_args,
    check_lora_config_args,
    check_memory_summary_args,
    check_paper_config_args,
    check_prepare_qlora_args,
    check_run_finetune_args,
    check_save_adapter_args,
    check_save_checkpoint_args,
    check_train_args,
)
from qlora_edu.ch08_finetune.instruct_data import (
    Example,
    build_messages,
    collate_examples,
    load_dataset,
    paired_bootstrap_interval,
    score_answers,
    sign_test_p_value,
)
from qlora_edu.common import settings
from qlora_edu.common.progress import progress_bar

__all__ = [
    "CPU_BUDGET_STEPS",
    "REFERENCE_STEP_SECONDS",
    "EvalResult",
    "FinetuneConfig",
    "TrainResult",
    "atomic_directory",
    "batch_indices",
    "bnb_config",
    "build_optimizer",
    "calibration_step_seconds",
    "default_config",
    "evaluate",
    "generate_replies",
    "inference_mode",
    "learning_rate_at",
    "load_checkpoint",
    "load_finetuned",
    "load_qlora_model",
    "lora_config",
    "memory_summary",
    "paper_config",
    "prepare_qlora",
    "run_finetune",
    "save_adapter",
    "save_checkpoint",
    "train",
]

#: Optimizer steps of the default CPU run at batch 8. A step took 8.6 s on the two-core machine the course was built
#: on (about twice the time of the reference machine of ``environment-facts.md``; the notebook prints the step time
#: it measured, the load it ran under and the calibrated estimate), so training takes about 9 minutes there, inside
#: the 10-minute budget, and reaches 198/200 on the held-out orders (8.5 minutes, 108 tokens/s).
CPU_BUDGET_STEPS = 60
GPU_BUDGET_STEPS = 500
SMOKE_STEPS = 3
CHECKPOINT = "checkpoint"
ADAPTER = "adapter"
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every choice of a fine-tune, with the QLoRA paper's values as defaults (``artidoro/qlora``).

    Attributes:
        steps: optimizer steps (the paper's code: ``max_steps``; 1875 for Guanaco on OASST1).
        batch_size: examples a step (the paper: 1 a device x 16 accumulated = 16).
        learning_rate: peak learning rate (2e-4).
        warmup_ratio: fraction of the steps with a linear warm-up from 0 (0.03); then constant.
        max_grad_norm: clip the gradients' global norm to this (0.3).
        lora_r, lora_alpha, lora_dropout: the adapters (64, 16, 0.05; the paper used 0.1 up to 13B).
        target_modules: projections that get adapters (all seven linear layers of a Llama block).
        optimizer: ``"paged_adamw_32bit"`` (the paper's), ``"paged_adamw_8bit"`` or ``"adamw"`` (torch's).
        weight_decay: AdamW's decoupled weight decay (0.0: the paper regularizes with dropout only).
        gradient_checkpointing: recompute each layer in the backward instead of keeping its activations.
        seed: seeds the adapters' initialization, the batch order and dropout.
        save_every: write a checkpoint every this many steps (0: only at the end).
        eval_size: held-out examples to score (None: all of them).
        max_new_tokens: generation budget of an answer (the held-out answers take 32-40 tokens with the end token).
    """

    steps: int
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=LLAMA_TARGETS)
    optimizer: str = "paged_adamw_32bit"
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    seed: int = 0
    save_every: int = 0
    eval_size: int | None = None
    max_new_tokens: int = 48

    def __post_init__(self):
        check_finetune_config(self, OPTIMIZERS)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (``target_modules`` as a list)."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def paper_config(steps: int = 1875, **overrides) -> FinetuneConfig:
    """The QLoRA paper's recipe (``artidoro/qlora`` defaults) for ``steps`` steps; keywords override fields."""
    check_paper_config_args(steps)
    return replace(FinetuneConfig(steps=steps), **overrides)


def default_config(device: str | torch.device = "cpu", smoke: bool | None = None, **overrides) -> FinetuneConfig:
    """The course's defaults for a device: the paper's recipe, with a budget the device affords.

    * ``cuda``: the paper's hyperparameters, batch 16, :data:`GPU_BUDGET_STEPS` steps.
    * ``cpu``: batch 8, :data:`CPU_BUDGET_STEPS` steps (about 9 minutes on two cores), learning rate 1e-3 and
      ``r = 16, alpha = 16``: a short run needs bigger steps than the paper's 2e-4 at ``alpha / r = 0.25``.
    * ``smoke`` (default: ``QLORA_EDU_SMOKE``): 3 steps of batch 2, 8 held-out examples, for CI.

    Keywords override any field of :class:`FinetuneConfig`.
    """
    device, smoke = check_default_config_args(device, smoke)
    smoke = settings.smoke_mode() if smoke is None else smoke
    if device.type == "cuda":
        config = paper_config(GPU_BUDGET_STEPS, batch_size=16)
    else:
        config = paper_config(CPU_BUDGET_STEPS, batch_size=8, learning_rate=1e-3, lora_r=16, lora_alpha=16.0)
    if smoke:
        config = replace(config, steps=SMOKE_STEPS, batch_size=2, eval_size=8)
    return replace(config, **overrides)


def learning_rate_at(step: int, config: FinetuneConfig) -> float:
    """The learning rate of step ``step`` (0-based), as transformers' constant schedule with warm-up computes it
    for the paper's ``Trainer``: ``lr * step / warmup`` for the first ``warmup = ceil(warmup_ratio * steps)``
    steps (so the very first step has learning rate 0), then ``lr``."""
    check_learning_rate_at_args(step, config)
    warmup = math.ceil(config.warmup_ratio * config.steps)
    if step >= warmup:
        return config.learning_rate
    return config.learning_rate * step / warmup


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of batch ``step``: epochs of a seeded random permutation, cut into batches.

    A pure function of its arguments (epoch ``e`` is ``randperm(n)`` seeded with ``seed + e``), so a resumed run
    sees the same batches as an uninterrupted one without saving a data loader's state.
    """
    check_batch_indices_args(n_examples, batch_size, step, seed)
    first = step * batch_size
    perms: dict[int, list[int]] = {}
    out: list[int] = []
    for position in range(first, first + batch_size):  # a batch may run into the next epoch
        epoch, offset = divmod(position, n_examples)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.append(perms[epoch][offset])
    return out


# ----------------------------------------------------------------------------------------------
# The model: 4-bit base, prepared, with adapters


def bnb_config(compute_dtype: torch.dtype = torch.bfloat16):
    """The QLoRA paper's ``BitsAndBytesConfig``: NF4, double quantization, ``compute_dtype`` matmuls."""
    check_bnb_config_args(compute_dtype)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def lora_config(config: FinetuneConfig):
    """peft's ``LoraConfig`` for ``config``: adapters on ``config.target_modules``, no bias, causal LM."""
    check_lora_config_args(config)
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")


def prepare_qlora(model: nn.Module, config: FinetuneConfig, *, method: str = "peft",
                  compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Turn a loaded base model into a trainable QLoRA model, the adapters initialized from ``config.seed``.

    Args:
        model: ``"peft"``: a transformers model loaded with :func:`bnb_config` (bitsandbytes ``Linear4bit``
            layers); ``"scratch"``: a full-precision one, quantized here by
            :func:`qlora_edu.ch07_qlora.qlora.apply_qlora`.
        config: the adapters and ``gradient_checkpointing``.
        method: ``"peft"`` (``prepare_model_for_kbit_training`` + ``get_peft_model``, the standard recipe) or
            ``"scratch"`` (the course's own NF4 layers from chapter 7, the same steps by hand).
        compute_dtype: the scratch path's matmul dtype (the peft path takes it from the ``BitsAndBytesConfig``).

    Returns:
        the model to train (a ``PeftModel`` for ``"peft"``); only the adapters require grad.
    """
    check_prepare_qlora_args(model, config, method, compute_dtype, OPTIMIZERS)
    # The adapters' random init (lora_A) draws from torch's global generator: fork it so the same seed gives the
    # same adapters and the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if method == "peft":
            from peft import get_peft_model, prepare_model_for_kbit_training

            # reentrant checkpointing, peft's default, asked for explicitly (torch warns when it is left implicit)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": True})
            return get_peft_model(model, lora_config(config))
        from qlora_edu.ch07_qlora.qlora import apply_qlora

        model = apply_qlora(model, config.target_modules, config.lora_r, config.lora_alpha, config.lora_dropout,
                            compute_dtype=compute_dtype)
        for p in model.parameters():  # what prepare_model_for_kbit_training does to the weights left unquantized
            if not p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        return model


def load_qlora_model(name_or_path: str | Path | None = None, *, config: FinetuneConfig, compute=None,
                     method: str = "peft", progress: bool = True):
    """Load the base model in 4 bits and add the adapters: the recipe's steps 1-3 in one call.

    Args:
        name_or_path: ``None`` for the bundled SmolLM2-135M-Instruct (or ``$QLORA_EDU_MODEL``), else any
            Llama-style hub id or local folder (:func:`qlora_edu.common.base_model.load_base_model`).
        config: the fine-tune's :class:`FinetuneConfig`.
        compute: a :class:`qlora_edu.common.device.Compute` (default :func:`~qlora_edu.common.device.pick_compute`):
        where the
            model goes and the 4-bit layers' compute dtype (also the dtype the other weights are loaded in).
        method: ``"peft"`` (bitsandbytes + peft) or ``"scratch"`` (the course's NF4 layers); see
            :func:`prepare_qlora`.
        progress: show loading progress.

    Returns:
        ``(model, tokenizer)``.
    """
    check_load_qlora_model_args(config, compute, method, progress, OPTIMIZERS)
    from qlora_edu.common.base_model import load_base_model
    from qlora_edu.common.device import pick_compute

    compute = pick_compute() if compute is None else compute
    device = compute.device if compute.device.type == "cuda" else None
    quantization = bnb_config(compute.dtype) if method == "peft" else None
    model, tokenizer = load_base_model(name_or_path, dtype=compute.dtype, device=device,
                                       quantization_config=quantization, progress=progress)
    return prepare_qlora(model, config, method=method, compute_dtype=compute.dtype), tokenizer


def load_finetuned(adapter: str | Path, name_or_path: str | Path | None = None, *, compute=None,
                   progress: bool = True):
    """Reload a saved adapter on a fresh 4-bit base: ``PeftModel.from_pretrained``, for inference.

    The base is loaded and prepared exactly as for training (4-bit, ``prepare_model_for_kbit_training``'s float32
    norms and embeddings, no checkpointing needed), so the reloaded model computes what the trained one did.

    Args:
        adapter: a folder written by :func:`save_adapter` (PEFT format).
        name_or_path, compute, progress: as in :func:`load_qlora_model` (the same base model as in training).

    Returns:
        ``(model, tokenizer)``, the model a ``PeftModel`` in eval mode.
    """
    adapter = check_load_finetuned_args(adapter, compute, progress)
    from peft import PeftModel, prepare_model_for_kbit_training

    from qlora_edu.common.base_model import load_base_model
    from qlora_edu.common.device import pick_compute

    compute = pick_compute() if compute is None else compute
    device = compute.device if compute.device.type == "cuda" else None
    model, tokenizer = load_base_model(name_or_path, dtype=compute.dtype, device=device,
                                       quantization_config=bnb_config(compute.dtype), progress=progress)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(model, str(adapter)).eval(), tokenizer


def build_optimizer(params: Sequence[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    """The optimizer of ``config.optimizer`` over ``params`` (betas 0.9 / 0.999, eps 1e-8 as in the paper's code).

    ``"paged_adamw_32bit"`` is bitsandbytes' ``PagedAdamW`` (on a CPU it warns and runs unpaged),
    ``"paged_adamw_8bit"`` its ``PagedAdamW8bit``, ``"adamw"`` torch's ``AdamW``. The learning rate is set
    every step by :func:`train` (:func:`learning_rate_at`).
    """
    params = check_build_optimizer_args(params, config, OPTIMIZERS)
    kwargs = dict(lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW if config.optimizer == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, **kwargs)


# ----------------------------------------------------------------------------------------------
# Saving atomically, checkpoints, resuming


def _recover(target: Path) -> None:
    """Undo a save that stopped between its two renames: the old folder is back under ``target``."""
    if target.exists():
        return
    leftovers = sorted(target.parent.glob(f".{target.name}.old-*"))
    if leftovers:
        os.replace(leftovers[-1], target)


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """``with atomic_directory(path) as tmp:`` write a folder's files into ``tmp``; on success ``tmp`` replaces
    ``path``, on an exception ``path`` is left exactly as it was and ``tmp`` is deleted.

    ``tmp`` is a sibling of ``path`` (same file system, so a rename is atomic). Replacing a non-empty folder
    takes two renames (old away, new in); a crash between them leaves the old folder as ``.NAME.old-*``, which
    the next save or :func:`load_checkpoint` moves back.
    """
    target = check_atomic_directory_args(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _course_adapters(model: nn.Module) -> dict[str, nn.Module]:
    """The course's own adapter layers (chapter 6's ``LoRALinear``, chapter 7's ``QLoRALinear``) by module name."""
    from qlora_edu.ch06_lora.lora import LoRALinear

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    owned = {f"{name}.{p}" for name in layers for p in ("lora_A", "lora_B")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not layers or trainable != owned:
        raise ValueError("the model's trainable parameters are not exactly the lora_A / lora_B of its adapter layers; "
                         "save_adapter handles a PeftModel or a model from apply_lora / apply_qlora")
    return layers


def _peft_key(module_name: str, matrix: str) -> str:
    """The name peft saves a course adapter's matrix under: ``base_model.model.<module>.lora_A.weight``."""
    return f"base_model.model.{module_name}.{matrix}.weight"


def _write_adapter(model: nn.Module, folder: Path) -> None:
    """PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), for a PeftModel and for the
    course's own adapters alike: peft's ``lora_A.weight`` is ``(r, in)`` and ``lora_B.weight`` ``(out, r)``, the
    shapes of :class:`~qlora_edu.ch06_lora.lora.LoRALinear`'s ``lora_A`` / ``lora_B``, so the scratch path's adapters
    load
    with ``PeftModel.from_pretrained`` on a bitsandbytes base too."""
    if _is_peft(model):
        model.save_pretrained(folder)
        return
    from peft import LoraConfig
    from safetensors.torch import save_file

    layers = _course_adapters(model)
    state = {_peft_key(name, matrix): getattr(m, matrix).detach().contiguous()
             for name, m in layers.items() for matrix in ("lora_A", "lora_B")}
    first = next(iter(layers.values()))
    if len({(m.r, m.alpha) for m in layers.values()}) > 1:
        raise ValueError("the adapter layers have different ranks or alphas; one LoraConfig cannot describe them")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    LoraConfig(r=first.r, lora_alpha=first.alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
               target_modules=sorted({name.rsplit(".", 1)[-1] for name in layers}),
               base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None)
               ).save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _read_adapter(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    device = next(p.device for p in model.parameters() if p.requires_grad)
    saved = load_file(str(folder / "adapter_model.safetensors"), device=str(device))
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, saved)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"the checkpoint's adapter has tensors this model lacks: {unexpected[:3]}")
        return
    layers = _course_adapters(model)
    wanted = {_peft_key(name, matrix): (m, matrix) for name, m in layers.items() for matrix in ("lora_A", "lora_B")}
    if set(saved) != set(wanted):
        raise ValueError("the checkpoint's adapter tensors do not match the model's adapter layers")
    with torch.no_grad():
        for key, (m, matrix) in wanted.items():
            getattr(m, matrix).copy_(saved[key])


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s adapters in PEFT's format into ``path``, atomically (:func:`atomic_directory`).

    ``model`` is a PeftModel (the standard path) or a model with the course's own adapters (the scratch path:
    :func:`qlora_edu.ch07_qlora.qlora.apply_qlora`); either way the folder holds ``adapter_config.json`` and
    ``adapter_model.safetensors``. Reload with ``PeftModel.from_pretrained(base_model, path)``
    (:func:`load_finetuned`). Returns ``path``.
    """
    path = check_save_adapter_args(model, path)
    with atomic_directory(path) as tmp:
        _write_adapter(model, tmp)
    return path


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    history: dict) -> Path:
    """Everything a run needs to continue exactly, in one folder, written atomically.

    Files: the adapter (:func:`save_adapter`'s format), ``optimizer.pt`` (the optimizer's ``state_dict``: both
    Adam moments of every adapter tensor, and its step counts), ``rng_state.pt`` (torch's generator, which
    drives dropout), ``trainer_state.json`` (``step``: steps done, and ``history``: the per-step records).

    Args:
        path: the checkpoint folder (replaced as a whole).
        model, optimizer: the training state.
        step: number of steps done.
        history: JSON-able per-step records (losses, ...) to restore with the state.

    Returns:
        ``path``.
    """
    path = check_save_checkpoint_args(path, model, optimizer, step, history)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    with atomic_directory(path) as tmp:
        _write_adapter(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(device), tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "history": history}, indent=1) + "\n")
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore a :func:`save_checkpoint` folder into ``model`` and ``optimizer`` and torch's RNG.

    Returns:
        ``(step, history)``: the steps done and the records saved with them.
    """
    path = check_load_checkpoint_args(path, model, optimizer)
    _recover(path)
    state = json.loads((path / "trainer_state.json").read_text())
    device = next(p.device for p in model.parameters() if p.requires_grad)
    _read_adapter(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=False))
    rng = torch.load(path / "rng_state.pt", weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return int(state["step"]), state["history"]


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """What :func:`train` measured.

    Attributes:
        losses: the training loss of every step (mean over the batch's response tokens).
        grad_norms: the gradients' global norm before clipping, every step.
        learning_rates: the learning rate of every step.
        step_seconds: wall time of every step run in this call (not of steps restored from a checkpoint).
        tokens: tokens (prompt + response, no padding) of every step.
        widths: the padded length ``T`` of every step's batch.
        steps_done: steps completed in all (including restored ones).
        resumed_from: the step the run resumed at (0 for a fresh run).
        seconds: wall time of this call's steps.
        peak_memory_bytes: ``torch.cuda.max_memory_allocated`` during training on a GPU; None on a CPU.
        checkpoint: the last checkpoint folder, or None.
        optimizer: the optimizer (its states, for memory accounting or further steps).
    """

    losses: list[float]
    grad_norms: list[float]
    learning_rates: list[float]
    step_seconds: list[float]
    tokens: list[int]
    widths: list[int]
    steps_done: int
    resumed_from: int
    seconds: float
    peak_memory_bytes: int | None
    checkpoint: Path | None
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    @property
    def tokens_per_second(self) -> float:
        """Training throughput of this call's steps: tokens processed / wall seconds."""
        measured = self.tokens[self.resumed_from:]
        return sum(measured) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def seconds_per_step(self) -> float:
        """Median wall time of this call's steps."""
        times = sorted(self.step_seconds)
        return times[len(times) // 2] if times else float("nan")


def _device_of(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if p.requires_grad)


def train(model: nn.Module, tokenizer, examples: Sequence[Example], config: FinetuneConfig, *,
          output_dir: str | Path | None = None, resume: bool = False,
          on_step: Callable[[int, float], None] | None = None, progress: bool = True,
          optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """Train the adapters of ``model`` for ``config.steps`` steps (or the rest of them, when resuming).

    One step: the batch of :func:`batch_indices`, collated with the loss on the responses only
    (:func:`~qlora_edu.ch08_finetune.instruct_data.collate_examples`); forward with labels; backward; clip the
    gradients'
    global norm to ``config.max_grad_norm``; an optimizer step at :func:`learning_rate_at`; gradients freed.

    Args:
        model: a model from :func:`load_qlora_model` / :func:`prepare_qlora` (anything whose trainable parameters
            are the adapters and whose forward takes ``input_ids, attention_mask, labels`` and returns ``.loss``).
        tokenizer: its tokenizer (with the chat template).
        examples: the training examples.
        config: the fine-tune's settings.
        output_dir: where checkpoints go (``output_dir/checkpoint``, every ``config.save_every`` steps and at the
            end); None saves nothing.
        resume: continue from ``output_dir/checkpoint`` if it exists.
        on_step: called as ``on_step(step, loss)`` after each step (and after its checkpoint, if any); an
            exception from it stops training, as an interruption would.
        progress: show a progress bar.
        optimizer: an optimizer over the adapters (default: :func:`build_optimizer`).

    Returns:
        a :class:`TrainResult`.
    """
    output_dir = check_train_args(model, tokenizer, examples, config, output_dir, resume, on_step, progress,
                                  OPTIMIZERS)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config) if optimizer is None else optimizer
    device = _device_of(model)
    checkpoint = None if output_dir is None else output_dir / CHECKPOINT
    history = {"losses": [], "grad_norms": [], "learning_rates": [], "tokens": [], "widths": []}
    cuda = device.type == "cuda"
    # Dropout draws from torch's global generator: run on a fork of it, seeded, so the run is reproducible and the
    # caller's random state is untouched; a checkpoint saves (and a resume restores) the fork's state.
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.manual_seed(config.seed)
        start = 0
        if resume and checkpoint is not None and (checkpoint.exists() or any(output_dir.glob(".checkpoint.old-*"))):
            start, history = load_checkpoint(checkpoint, model, optimizer)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        model.train()
        step_seconds: list[float] = []
        bar = progress_bar(desc="QLoRA fine-tune", total=config.steps - start, unit="steps", enabled=progress)
        with bar:
            for step in range(start, config.steps):
                began = time.perf_counter()
                batch = collate_examples(tokenizer, [examples[i] for i in batch_indices(
                    len(examples), config.batch_size, step, config.seed)])
                lr = learning_rate_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            labels=batch["labels"].to(device), use_cache=False)
                out.loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize(device)
                step_seconds.append(time.perf_counter() - began)
                loss = out.loss.detach().item()
                history["losses"].append(loss)
                history["grad_norms"].append(float(norm))
                history["learning_rates"].append(lr)
                history["tokens"].append(int(batch["attention_mask"].sum()))
                history["widths"].append(int(batch["input_ids"].shape[1]))
                bar.update()
                if checkpoint is not None and (step + 1 == config.steps or
                                               (config.save_every and (step + 1) % config.save_every == 0)):
                    save_checkpoint(checkpoint, model, optimizer, step + 1, history)
                if on_step is not None:
                    on_step(step, loss)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return TrainResult(losses=history["losses"], grad_norms=history["grad_norms"],
                       learning_rates=history["learning_rates"], step_seconds=step_seconds, tokens=history["tokens"],
                       widths=history["widths"], steps_done=config.steps, resumed_from=start,
                       seconds=sum(step_seconds), peak_memory_bytes=peak, checkpoint=checkpoint, optimizer=optimizer)


# ----------------------------------------------------------------------------------------------
# Evaluation


@contextlib.contextmanager
def inference_mode(model: nn.Module):
    """Eval mode (dropout off) for generation, except bitsandbytes' ``Linear4bit`` layers, which stay in train mode.

    Why: on a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode under ``no_grad`` repacks its weight, for
    good, into a bf16 inference layout (approximate constants; training through it is not supported). Its
    ``training`` flag changes nothing else, so keeping it True gives the exact NF4 weights, before and after
    training. The previous mode is restored on exit.
    """
    check_inference_mode_args(model)
    import bitsandbytes as bnb

    was_training = model.training
    model.eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.train()
    try:
        yield model
    finally:
        model.train(was_training)


def generate_replies(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 100,
                     max_new_tokens: int = 48, progress: bool = True) -> list[str]:
    """Greedy replies of ``model`` to the prompts of ``examples`` (the chat template, ready for the assistant).

    Batches are left-padded (generation appends on the right) and sorted by length to waste little padding;
    the replies come back in ``examples``' order, decoded without special tokens.
    """
    check_generate_replies_args(model, tokenizer, examples, batch_size, max_new_tokens)
    prompts = [tokenizer.apply_chat_template(build_messages(e), add_generation_prompt=True, tokenize=False)
               for e in examples]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    device = next(model.parameters()).device
    replies: list[str | None] = [None] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        with inference_mode(model), torch.no_grad():
            for chunk in progress_bar(chunks, desc="generating", unit="batches", enabled=progress):
                enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, temperature=None,
                                     top_p=None, top_k=None)
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text in zip(chunk, texts, strict=True):
                    replies[i] = text.strip()
    finally:
        tokenizer.padding_side = old_side
    return replies


@dataclass
class EvalResult:
    """Scores of one evaluation: ``score`` = ``sum(correct) / n``; ``replies`` the generated texts."""

    score: float
    correct: list[bool]
    replies: list[str]
    seconds: float

    @property
    def n(self) -> int:
        return len(self.correct)


def evaluate(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 100,
             max_new_tokens: int = 48, progress: bool = True) -> EvalResult:
    """Generate a reply for each example (:func:`generate_replies`) and score it exactly
    (:func:`~qlora_edu.ch08_finetune.instruct_data.score_answers`)."""
    check_evaluate_args(model, tokenizer, examples, batch_size, max_new_tokens)
    began = time.perf_counter()
    replies = generate_replies(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               progress=progress)
    correct = score_answers(replies, examples)
    return EvalResult(sum(correct) / len(correct), correct, replies, time.perf_counter() - began)


# ----------------------------------------------------------------------------------------------
# Memory


def memory_summary(model: nn.Module, optimizer: torch.optim.Optimizer | None, config: FinetuneConfig, *,
                   seq_len: int, device: str | torch.device = "cpu", peak_bytes: int | None = None) -> dict:
    """The memory of the run, measured where it can be and predicted where not.

    Returns a dict of bytes: ``static`` (:func:`qlora_edu.ch04_memory.memory_probe.static_bytes`: the real tensors of
    the
    frozen weights, adapters, gradients and optimizer states now), ``predicted_total`` and ``predicted_parts``
    (chapter 4's :func:`qlora_edu.ch04_memory.memory.training_memory` for this model, batch, sequence length, rank and
    device), ``measured_peak`` (``peak_bytes``: ``torch.cuda.max_memory_allocated`` on a GPU, else None) and
    ``process_max_rss`` (the process's peak resident memory, everything included: Python, libraries, data).
    If the prediction fails (a model shape chapter 4's model does not cover), ``predicted_*`` are None / empty
    and ``prediction_error`` says why; otherwise ``prediction_error`` is None.
    """
    device = check_memory_summary_args(model, optimizer, config, seq_len, device, peak_bytes, OPTIMIZERS)
    from qlora_edu.ch04_memory.memory_probe import static_bytes

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {"static": static_bytes(model, optimizer), "predicted_total": None, "predicted_parts": {},
           "predicted_peak_phase": None, "prediction_error": None, "measured_peak": peak_bytes,
           "process_max_rss": rss}
    optimizer_name = {"paged_adamw_32bit": "paged_adamw", "paged_adamw_8bit": "paged_adamw8bit",
                      "adamw": "adamw"}[config.optimizer]
    try:  # the prediction is a convenience: a model shape chapter 4 does not cover must not lose the run's numbers
        from qlora_edu.ch04_memory.memory import training_memory

        predicted = training_memory(model.config, "qlora", batch_size=config.batch_size, seq_len=seq_len,
                                    lora_r=config.lora_r, lora_targets=config.target_modules,
                                    gradient_checkpointing=config.gradient_checkpointing, optimizer=optimizer_name,
                                    lora_dropout=config.lora_dropout, device=device.type)
    except Exception as err:  # any failure of the prediction becomes a message, not a crash
        out["prediction_error"] = (f"chapter 4's training_memory could not predict this set-up "
                                   f"({type(err).__name__}: {err}); the measured numbers above still hold")
        return out
    out.update(predicted_total=predicted.total, predicted_peak_phase=predicted.peak_phase,
               predicted_parts={name: getattr(predicted, name) for name in predicted.parts})
    return out


#: Seconds of one QLoRA training step of the course model at batch 8 x 19 tokens (NF4 + double quantization, bf16
#: compute, r = 16 on all seven projections, gradient checkpointing, AdamW) on an unloaded two-core machine of the
#: kind the course is built on: ``/work/shared/reference/environment-facts.md``, "Training speed on two CPU cores".
REFERENCE_STEP_SECONDS = 1.1


def calibration_step_seconds(model: nn.Module, *, steps: int = 3, batch_size: int = 8, seq_len: int = 19,
                             seed: int = 0) -> list[float]:
    """Time ``steps`` training steps on random tokens, the set-up of :data:`REFERENCE_STEP_SECONDS`.

    On a shared machine a step takes longer than on an idle one; timing the documented reference step *now*
    gives the factor by which this machine is slower at the moment, and so an estimate of the idle time of any
    other step measured alongside: ``step_seconds * REFERENCE_STEP_SECONDS / median(calibration)``.

    It trains ``model``'s adapters on random tokens (with a fresh AdamW at lr 1e-4): call it when the model's
    training and evaluation are done, or on a copy.

    Returns:
        the wall seconds of each step (the first one included).
    """
    check_calibration_step_seconds_args(model, steps, batch_size, seq_len, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device = _device_of(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    model.train()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return times


# ----------------------------------------------------------------------------------------------
# The whole run, and the command line


def run_finetune(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 smoke: bool | None = None, output_dir: str | Path = "finetune_output", resume: bool = False,
                 method: str = "peft", progress: bool = True, log: Callable[[str], None] = print,
                 **overrides) -> dict:
    """Load, evaluate, train, evaluate again, save the adapter: what ``python -m qlora_edu.ch08_finetune.finetune``
    runs.

    Args:
        model: hub id or local folder of a Llama-style model (None: the bundled SmolLM2 / ``$QLORA_EDU_MODEL``).
        device, dtype: forced device / dtype names (None: :func:`qlora_edu.common.device.pick_compute` decides).
        smoke: the CI budget (None: ``QLORA_EDU_SMOKE``).
        output_dir: where the checkpoint and the adapter (``output_dir/adapter``) go.
        resume: continue from ``output_dir/checkpoint``.
        method: ``"peft"`` or ``"scratch"`` (:func:`prepare_qlora`).
        progress: progress bars.
        log: where the human-readable lines go.
        **overrides: fields of :class:`FinetuneConfig` (``steps=40``, ``learning_rate=5e-4``, ...).

    Returns:
        the summary: ``before``, ``after`` (held-out scores in [0, 1]), ``n_eval``, ``gain`` and its 95%
        bootstrap interval, ``p_value`` (sign test), ``train_seconds``, ``seconds_per_step``, ``tokens_per_s``,
        ``device``, ``dtype``, ``adapter`` (path), ``checkpoint``, losses, memory, the config.
    """
    check_run_finetune_args(model, device, dtype, smoke, output_dir, resume, method, progress, log)
    from qlora_edu.common.device import pick_compute

    compute = pick_compute(device, dtype)
    config = default_config(compute.device, smoke, **overrides)
    output_dir = Path(output_dir)
    log(compute.describe())
    log(f"config: {json.dumps(config.to_dict())}")
    train_set, heldout = load_dataset("train"), load_dataset("heldout")
    heldout = heldout[:config.eval_size] if config.eval_size is not None else heldout
    qmodel, tokenizer = load_qlora_model(model, config=config, compute=compute, method=method, progress=progress)
    before = evaluate(qmodel, tokenizer, heldout, max_new_tokens=config.max_new_tokens, progress=progress)
    log(f"before: {sum(before.correct)}/{before.n} correct ({before.seconds:.1f} s)")
    load = os.getloadavg()[0]
    result = train(qmodel, tokenizer, train_set, config, output_dir=output_dir, resume=resume, progress=progress)
    log(f"trained {config.steps - result.resumed_from} steps in {result.seconds:.1f} s "
        f"({result.seconds_per_step:.2f} s/step, {result.tokens_per_second:.0f} tokens/s, load average {load:.1f}); "
        f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    after = evaluate(qmodel, tokenizer, heldout, max_new_tokens=config.max_new_tokens, progress=progress)
    log(f"after: {sum(after.correct)}/{after.n} correct ({after.seconds:.1f} s)")
    adapter = save_adapter(qmodel, output_dir / ADAPTER)
    gain, low, high = paired_bootstrap_interval(before.correct, after.correct)
    memory = memory_summary(qmodel, result.optimizer, config, seq_len=max(result.widths), device=compute.device,
                            peak_bytes=result.peak_memory_bytes)
    return {"before": before.score, "after": after.score, "n_eval": before.n, "gain": gain,
            "gain_interval_95": [low, high], "p_value": sign_test_p_value(before.correct, after.correct),
            "train_seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
            "tokens_per_s": result.tokens_per_second, "steps": config.steps, "resumed_from": result.resumed_from,
            "loss_first": result.losses[0], "loss_last": result.losses[-1], "device": compute.device.type,
            "dtype": str(compute.dtype).removeprefix("torch."), "model": model or settings.model_override()
            or "SmolLM2-135M-Instruct (bundled)", "method": method, "adapter": str(adapter),
            "checkpoint": str(result.checkpoint), "load_average": load,
            "peak_memory_bytes": memory["measured_peak"], "predicted_memory_bytes": memory["predicted_total"],
            "memory_prediction_error": memory["prediction_error"],
            "process_max_rss_bytes": memory["process_max_rss"], "config": config.to_dict()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qlora_edu.ch08_finetune.finetune",
                                description="QLoRA fine-tune of the course model (or any Llama-style model) on the "
                                            "order-extraction task: held-out score before and after. The last "
                                            "line of output is one JSON object.")
    p.add_argument("--model", help="hub id or local folder of a Llama-style model (default: the bundled "
                                   "SmolLM2-135M-Instruct, or $QLORA_EDU_MODEL)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="force the compute dtype")
    p.add_argument("--smoke", action="store_true", default=None, help="a few steps on a few examples (CI)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default: {CPU_BUDGET_STEPS} on a CPU, "
                                             f"{GPU_BUDGET_STEPS} on a GPU)")
    p.add_argument("--batch-size", type=int, help="examples a step (default: 8 on a CPU, 16 on a GPU)")
    p.add_argument("--lr", type=float, dest="learning_rate", help="peak learning rate (default: 1e-3 CPU, 2e-4 GPU)")
    p.add_argument("--lora-r", type=int, help="adapter rank (default: 16 CPU, 64 GPU)")
    p.add_argument("--lora-alpha", type=float, help="adapter alpha (default: 16)")
    p.add_argument("--lora-dropout", type=float, help="adapter dropout (default: 0.05)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: paged_adamw_32bit")
    p.add_argument("--eval-size", type=int, help="held-out examples to score (default: all 200)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: only at the end)")
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--method", choices=("peft", "scratch"), default="peft",
                   help="peft + bitsandbytes (default) or the course's own NF4 layers")
    p.add_argument("--output-dir", default="finetune_output", help="checkpoint and adapter folder")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: parse ``argv``, :func:`run_finetune`, print the summary as the last line (JSON)."""
    args = vars(_parser().parse_args(argv))
    overrides = {k: args.pop(k) for k in ("steps", "batch_size", "learning_rate", "lora_r", "lora_alpha",
                                          "lora_dropout", "optimizer", "eval_size", "save_every", "seed")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    progress = not args.pop("no_progress")
    summary = run_finetune(model=args["model"], device=args["device"], dtype=args["dtype"], smoke=args["smoke"],
                           output_dir=args["output_dir"], resume=args["resume"], method=args["method"],
                           progress=progress, log=lambda line: print(line, flush=True), **overrides)
    sys.stdout.flush()
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of the module whose FinetuneConfig is another class:
    # run the imported module's main instead.
    from qlora_edu.ch08_finetune.finetune import main as _main

    _main()
