"""Chapter 8: the full QLoRA fine-tune of a real model, the standard recipe, one choice at a time.

The recipe (Dettmers et al., 2023, and the defaults of their code, ``artidoro/qlora``):

1. **Load the base in 4 bits**: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)``
   (:func:`~qlora_edu.common.training_setup.bnb_config`). NF4 because the
   weights are roughly normal (chapter 2; transformers' default is FP4, so it must be asked for), double
   quantization because it takes the constants from 0.5 to 0.127 bits a weight (chapter 3), bf16 compute
   because the 4-bit codes are only storage: every matmul runs on dequantized bf16 weights (float16 on GPUs
   without bf16, float32 on CPUs without bf16 instructions: whatever :func:`qlora_edu.common.device.pick_compute`
   says).
2. **prepare_model_for_kbit_training** (peft): freezes every weight, upcasts every weight that is not 4-bit
   (embeddings, norms, ``lm_head``) to float32 for stable training, and turns on gradient checkpointing
   with input gradients. Its cost is memory: the embeddings and head in float32 instead of bf16.
3. **LoRA on all seven linear projections** of every decoder layer (q, k, v, o, gate, up, down):
   ``LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05)`` in the paper
   (:func:`~qlora_edu.common.training_setup.lora_config`); the paper found
   that adapting every linear layer, not only q and v, is what matches full fine-tuning.
4. **Paged AdamW** (bitsandbytes' ``PagedAdamW``, 32-bit states, weight decay 0): its states live in CUDA
   unified memory and move to the host if the GPU runs out (chapter 5). On a CPU there is nothing to page:
   bitsandbytes warns "Paged optimizers are not supported on CPU" and runs it as a plain AdamW.
5. **The schedule**: learning rate 2e-4 (1e-4 for 33B and 65B), constant ("constant a bit better than cosine,
   and has advantage for analysis"), gradient clipping at norm 0.3 ("tuned and works well for all models
   tested"), loss on the responses only. The scripts also pass ``--warmup_ratio 0.03``, but with
   ``--lr_scheduler_type constant`` transformers' ``get_scheduler`` returns ``get_constant_schedule`` and never
   reads the warm-up: the paper's runs had none. This course keeps a 3% linear warm-up (:func:`learning_rate_at`),
   a departure from the scripts; :func:`paper_config` has none. The scripts' batch of 16 is 4 a device x 4
   accumulated, with ``--group_by_length``; this loop takes one batch of ``batch_size`` a step, unsorted.

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
adapter. The step does no host work: the batches are tokenized once (:func:`_token_batches`), and the losses and
gradient norms are read back from the device once every few steps, which is also where a diverged run
(:class:`TrainingDiverged`) is stopped before anything of it is saved.

**The run** (:func:`run_finetune`) guards its folder before loading anything: it refuses files it did not write and
a previous run's results (unless ``resume`` or ``overwrite``), takes a lock (:func:`output_lock`), cleans the
leftovers of killed saves and checks that it can write; a checkpoint stores the run's settings, and resuming under
other ones names each that differs (:func:`check_resumable`).

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
import errno
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.ch08_finetune.config import OPTIMIZERS, FinetuneConfig
from qlora_edu.ch08_finetune.guards import (
    check_atomic_directory_args,
    check_batch_indices_args,
    check_build_optimizer_args,
    check_calibration_step_seconds_args,
    check_default_config_args,
    check_evaluate_args,
    check_generate_replies_args,
    check_heldout_loss_args,
    check_inference_mode_args,
    check_learning_rate_at_args,
    check_load_checkpoint_args,
    check_load_finetuned_args,
    check_load_qlora_model_args,
    check_memory_summary_args,
    check_paper_config_args,
    check_path,
    check_prepare_qlora_args,
    check_run_finetune_args,
    check_save_adapter_args,
    check_save_checkpoint_args,
    check_train_args,
)
from qlora_edu.ch08_finetune.instruct_data import (
    IGNORE_INDEX,
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
from qlora_edu.common.training_setup import bnb_config, load_for_training, make_optimizer, setup_training

__all__ = [
    "CPU_BUDGET_STEPS",
    "CheckpointError",
    "EvalResult",
    "FinetuneError",
    "REFERENCE_STEP_SECONDS",
    "TrainResult",
    "TrainingDiverged",
    "atomic_directory",
    "batch_indices",
    "build_optimizer",
    "calibration_step_seconds",
    "check_output_dir",
    "check_resumable",
    "check_writable",
    "clean_leftovers",
    "default_config",
    "evaluate",
    "generate_replies",
    "heldout_loss",
    "inference_mode",
    "learning_rate_at",
    "load_checkpoint",
    "load_finetuned",
    "load_qlora_model",
    "memory_summary",
    "output_lock",
    "paper_config",
    "prepare_qlora",
    "read_trainer_state",
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
COURSE_SCHEDULE = {"warmup_ratio": 0.03, "lora_dropout": 0.05}
"""Where the course departs from the paper's 7B script: a 3% linear warm-up (the script's constant schedule runs
none) and LoRA dropout 0.05 (the 33B/65B value; the 7B/13B scripts use 0.1)."""


def paper_config(steps: int = 1875, **overrides) -> FinetuneConfig:
    """The QLoRA paper's recipe for a 7B or 13B model (``artidoro/qlora``, ``scripts/finetune_guanaco_7b.sh`` and
    ``_13b.sh``) for ``steps`` steps; keywords override fields.

    What the scripts pass, field by field: lr 2e-4 (1e-4 in ``_33b.sh``/``_65b.sh``), ``lora_dropout`` 0.1 (0.05
    for 33B and 65B), r 64, alpha 16, ``max_grad_norm`` 0.3, weight decay 0, ``paged_adamw_32bit``, checkpointing,
    batch 16 (``per_device_train_batch_size 4`` x ``gradient_accumulation_steps 4``), 1,875 steps, and
    ``warmup_ratio`` 0: the scripts say 0.03, but with ``lr_scheduler_type constant`` transformers' scheduler
    ignores it. Not expressible here: gradient accumulation (this loop takes the 16 in one batch) and
    ``group_by_length``. :func:`default_config` starts from these values and keeps the course's own warm-up and
    dropout (0.03, 0.05).
    """
    check_paper_config_args(steps)
    return replace(FinetuneConfig(steps=steps), **{"lora_dropout": 0.1, "warmup_ratio": 0.0, **overrides})


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
        config = paper_config(GPU_BUDGET_STEPS, batch_size=16, **COURSE_SCHEDULE)
    else:
        config = paper_config(CPU_BUDGET_STEPS, batch_size=8, learning_rate=1e-3, lora_r=16, lora_alpha=16.0,
                              **COURSE_SCHEDULE)
    if smoke:
        config = replace(config, steps=SMOKE_STEPS, batch_size=2, eval_size=8)
    return replace(config, **overrides)


def learning_rate_at(step: int, config: FinetuneConfig) -> float:
    """The learning rate of step ``step`` (0-based), as transformers' ``constant_with_warmup`` schedule computes it
    (the paper's scripts ask for ``constant``, which ignores the warm-up: ``warmup_ratio=0`` reproduces that):
    ``lr * step / warmup`` for the first ``warmup = ceil(warmup_ratio * steps)``
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
    return setup_training(model, "qlora" if method == "peft" else "qlora_scratch", r=config.lora_r,
                          alpha=config.lora_alpha, dropout=config.lora_dropout, targets=config.target_modules,
                          gradient_checkpointing=config.gradient_checkpointing, reentrant=True,
                          compute_dtype=compute_dtype, seed=config.seed)


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
    from qlora_edu.common.device import pick_compute

    compute = pick_compute() if compute is None else compute
    device = compute.device if compute.device.type == "cuda" else None
    return load_for_training("qlora" if method == "peft" else "qlora_scratch", name_or_path, device=device,
                             dtype=compute.dtype, compute_dtype=compute.dtype, progress=progress,
                             r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                             targets=config.target_modules, gradient_checkpointing=config.gradient_checkpointing,
                             reentrant=True, seed=config.seed)


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

    ``"paged_adamw"`` is bitsandbytes' ``PagedAdamW32bit`` (on a CPU there is nothing to page: it runs unpaged),
    ``"paged_adamw8bit"`` its ``PagedAdamW8bit``, ``"adamw"`` torch's ``AdamW``
    (:func:`qlora_edu.common.training_setup.make_optimizer`). The learning rate is set every step by :func:`train`
    (:func:`learning_rate_at`).
    """
    params = check_build_optimizer_args(params, config, OPTIMIZERS)
    return make_optimizer(params, config.optimizer, config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------------------------
# Saving atomically, checkpoints, resuming


def _saved_step(folder: Path) -> int:
    """The ``step`` of a checkpoint folder's ``trainer_state.json``; -1 when it has none or it cannot be read."""
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _recover(target: Path) -> None:
    """Undo a save that stopped between its two renames: the old folder is back under ``target``.

    A ``.NAME.old-*`` folder is always whole (it is made by one rename, and is renamed to ``.NAME.trash-*`` before
    it is deleted). Should there be several, the one of the highest step wins (``trainer_state.json``; ties: the
    newest, then the name), so recovery never depends on the random part of a name.
    """
    if target.exists():
        return
    leftovers = [p for p in target.parent.glob(f".{target.name}.old-*") if p.is_dir()]
    if leftovers:
        best = max(leftovers, key=lambda p: (_saved_step(p), p.stat().st_mtime_ns, p.name))
        os.replace(best, target)


def _discard(folder: Path) -> None:
    """Delete ``folder``: first renamed to ``.NAME.trash-*`` (one atomic step), so a kill mid-deletion leaves a
    folder that nothing ever mistakes for a whole one, then removed."""
    trash = folder.parent / f".{folder.name.lstrip('.').split('.', 1)[0]}.trash-{uuid.uuid4().hex[:8]}"
    with contextlib.suppress(FileNotFoundError):
        os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _out_of_space(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (or an error it came from) is a full disk: ``ENOSPC``, or a writer's own message (torch's
    ``unexpected pos ...``) on a file system with less than 1 MiB left."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(err, (OSError, RuntimeError)):  # a writer's failure, not a bug in what is written
        return False
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """``with atomic_directory(path) as tmp:`` write a folder's files into ``tmp``; on success ``tmp`` replaces
    ``path``, on an exception ``path`` is left exactly as it was and ``tmp`` is deleted.

    ``tmp`` is a sibling of ``path`` (same file system, so a rename is atomic). Replacing a non-empty folder
    takes two renames (old away, new in); a crash between them leaves the old folder as ``.NAME.old-*``, which
    the next save or :func:`load_checkpoint` moves back (:func:`_recover`). A full disk is named as such
    (``OSError(ENOSPC)``, "no space left"), whatever the writer's own message was.
    """
    target = check_atomic_directory_args(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            yield tmp
        except Exception as err:
            if _out_of_space(err, target.parent):
                raise OSError(errno.ENOSPC, f"no space left on the device of {target.parent} while writing "
                                            f"{target.name} ({type(err).__name__}: {err}); {target} is kept as it "
                                            "was: free some space and run again") from err
            raise
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _discard(old)
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


def _set_adapter(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy the tensors of an ``adapter_model.safetensors`` (PEFT's names) into ``model``'s adapters."""
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
                    history: dict, *, config: FinetuneConfig | None = None) -> Path:
    """Everything a run needs to continue exactly, in one folder, written atomically.

    Files: the adapter (:func:`save_adapter`'s format), ``optimizer.pt`` (the optimizer's ``state_dict``: both
    Adam moments of every adapter tensor, and its step counts), ``rng_state.pt`` (torch's generator, which
    drives dropout), ``trainer_state.json`` (``step``: steps done, ``config``: the run's settings, and
    ``history``: the per-step records).

    Args:
        path: the checkpoint folder (replaced as a whole).
        model, optimizer: the training state.
        step: number of steps done.
        history: JSON-able per-step records (losses, ...) to restore with the state.
        config: the run's :class:`FinetuneConfig`, stored so a resume can say which settings differ.

    Returns:
        ``path``.
    """
    path = check_save_checkpoint_args(path, model, optimizer, step, history, config)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    state = {"step": step, "config": None if config is None else config.to_dict(), "history": history}
    with atomic_directory(path) as tmp:
        _write_adapter(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(device), tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, allow_nan=False) + "\n")
    return path


class FinetuneError(RuntimeError):
    """A fine-tune refused to start or stopped, for a reason its message names with what to do about it (the
    command line prints it as one line and exits with status 1)."""


class CheckpointError(FinetuneError):
    """A checkpoint that cannot be resumed: a file truncated or corrupt, or settings that differ from the run's."""


class TrainingDiverged(FinetuneError):
    """The loss or the gradients' norm stopped being finite; nothing of the diverged steps was saved."""


def _read_checkpoint_file(file: Path, read: Callable[[Path], object]):
    """``read(file)``, any failure named by the file: a missing, truncated or corrupt part of a checkpoint."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} is missing: the checkpoint is incomplete; remove "
                              f"{file.parent} to start fresh (or restore it from a copy)")
    try:
        return read(file)
    except Exception as err:  # safetensors, pickle, zip and JSON errors alike: the file is what matters
        raise CheckpointError(f"checkpoint file {file} is truncated or corrupt ({type(err).__name__}: {err}); "
                              f"remove {file.parent} to start fresh (or restore it from a copy)") from err


def read_trainer_state(path: str | Path) -> dict:
    """The ``trainer_state.json`` of a checkpoint folder (``step``, ``config``, ``history``), recovering an
    interrupted save first (:func:`atomic_directory`); a missing or corrupt file raises :class:`CheckpointError`
    naming it."""
    path = check_path("path", path)
    _recover(path)
    state = _read_checkpoint_file(path / "trainer_state.json", lambda f: json.loads(f.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "history" not in state:
        raise CheckpointError(f"checkpoint file {path / 'trainer_state.json'} is corrupt: it lacks step / history")
    return state


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore a :func:`save_checkpoint` folder into ``model`` and ``optimizer`` and torch's RNG.

    Returns:
        ``(step, history)``: the steps done and the records saved with them.

    Raises:
        CheckpointError: a file of the checkpoint is missing, truncated or corrupt (the message names it).
    """
    path = check_load_checkpoint_args(path, model, optimizer)
    state = read_trainer_state(path)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    from safetensors.torch import load_file

    _set_adapter(model, _read_checkpoint_file(path / "adapter_model.safetensors",
                                              lambda f: load_file(str(f), device=str(device))))
    optimizer.load_state_dict(_read_checkpoint_file(
        path / "optimizer.pt", lambda f: torch.load(f, map_location=device, weights_only=False)))
    rng = _read_checkpoint_file(path / "rng_state.pt", lambda f: torch.load(f, weights_only=False))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
    return int(state["step"]), state["history"]


#: Settings a resumed run may change: they do not enter the steps already taken (``steps`` only upwards).
RESUMABLE_CHANGES = ("steps", "save_every", "eval_size", "max_new_tokens")

#: The command line's flag of each setting, for messages that name what the user typed.
FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "learning_rate": "--lr", "lora_r": "--lora-r",
         "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout", "optimizer": "--optimizer",
         "eval_size": "--eval-size", "save_every": "--save-every", "seed": "--seed"}


def _named(field_name: str) -> str:
    flag = FLAGS.get(field_name)
    return f"{field_name} ({flag})" if flag else field_name


def check_resumable(state: dict, config: FinetuneConfig, path: Path) -> None:
    """Refuse to continue a checkpoint under settings other than its own, naming each one that differs.

    Only :data:`RESUMABLE_CHANGES` may differ, and ``steps`` no fewer than the steps done: anything else would mix
    two runs (and the summary would claim the new values for all of it), or not fit the saved tensors.
    """
    saved = state.get("config")
    if saved is None:
        raise CheckpointError(f"checkpoint {path} was written without its settings (an older version), so it "
                              "cannot be checked against this run; start fresh (--overwrite) instead")
    now = json.loads(json.dumps(config.to_dict()))
    differ = [f"{_named(k)}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
              if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if differ:
        raise CheckpointError(f"checkpoint {path} was trained with other settings; resuming would mix two runs. "
                              f"Differing: {'; '.join(differ)}. Resume with the checkpoint's settings, or start "
                              "fresh (--overwrite or another --output-dir)")
    if config.steps < state["step"]:
        raise CheckpointError(f"checkpoint {path} holds {state['step']} steps done, more than steps (--steps) = "
                              f"{config.steps}; pass --steps {state['step']} or more to continue it")


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
        profile: with ``profile_steps``, torch.profiler's table of the top operators of those steps.
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
    profile: str | None = field(default=None, repr=False)

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


def _token_batches(tokenizer, examples: Sequence[Example], config: FinetuneConfig, start: int,
                   device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[int], list[int]]:
    """Every batch of steps ``start .. config.steps - 1``, tokenized once, as index tensors on ``device``.

    The examples those steps use (:func:`batch_indices`) are collated once
    (:func:`~qlora_edu.ch08_finetune.instruct_data.collate_examples`: ``(N, T_max)`` ids, mask, labels) and moved
    to the device; batch ``k`` is then ``table[rows[k], :widths[k]]``, the rows of its examples cut to its longest
    one: the very tensors ``collate_examples`` gives for the batch alone (right padding and the labels' mask are
    per row), with no tokenizing, collating or host-to-device copy inside the training step.

    Returns:
        ``(table, rows, widths, tokens)``: ``rows`` ``(steps - start, batch_size)`` int64 on ``device``;
        ``widths`` / ``tokens`` the padded length and real tokens of each batch (host ints, no sync needed).
    """
    per_step = [batch_indices(len(examples), config.batch_size, s, config.seed) for s in range(start, config.steps)]
    used = sorted({i for batch in per_step for i in batch})
    if not used:
        return {}, torch.zeros(0, config.batch_size, dtype=torch.long), [], []
    collated = collate_examples(tokenizer, [examples[i] for i in used])
    row_of = {example: row for row, example in enumerate(used)}
    lengths = collated["attention_mask"].sum(dim=1).tolist()
    rows = [[row_of[i] for i in batch] for batch in per_step]
    table = {k: collated[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    return (table, torch.tensor(rows, dtype=torch.long).to(device), [max(lengths[r] for r in batch) for batch in rows],
            [sum(lengths[r] for r in batch) for batch in rows])


def _profiler(device: torch.device):
    """torch.profiler over the CPU (and CUDA) operators, shapes grouped."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, record_shapes=False)


def _profile_table(prof, device: torch.device, rows: int = 20) -> str:
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def train(model: nn.Module, tokenizer, examples: Sequence[Example], config: FinetuneConfig, *,
          output_dir: str | Path | None = None, resume: bool = False,
          on_step: Callable[[int, float], None] | None = None, progress: bool = True,
          optimizer: torch.optim.Optimizer | None = None, sync_every: int = 10,
          profile_steps: int = 0) -> TrainResult:
    """Train the adapters of ``model`` for ``config.steps`` steps (or the rest of them, when resuming).

    One step: the batch of :func:`batch_indices` (tokenized once for the whole run: :func:`_token_batches`), with
    the loss on the responses only; forward with labels; backward; clip the gradients' global norm to
    ``config.max_grad_norm`` (torch's ``clip_grad_norm_``: one foreach kernel a device and dtype on a GPU); an
    optimizer step at :func:`learning_rate_at`; gradients freed.

    The step never waits for the device: the loss and the gradients' norm stay on it, and are read back together,
    in one transfer, every ``sync_every`` steps, before a checkpoint and at the end (every step when ``on_step``
    wants them). That is also where divergence is caught: a non-finite loss or norm raises
    :class:`TrainingDiverged`, and since a checkpoint is only written after its steps were read back finite, the
    last checkpoint on disk is a good one. On a GPU ``step_seconds`` are the mean of each read-back interval.

    Args:
        model: a model from :func:`load_qlora_model` / :func:`prepare_qlora` (anything whose trainable parameters
            are the adapters and whose forward takes ``input_ids, attention_mask, labels`` and returns ``.loss``).
        tokenizer: its tokenizer (with the chat template).
        examples: the training examples.
        config: the fine-tune's settings.
        output_dir: where checkpoints go (``output_dir/checkpoint``, every ``config.save_every`` steps and at the
            end); None saves nothing.
        resume: continue from ``output_dir/checkpoint`` if it exists (its stored settings must be ``config``'s,
            :func:`check_resumable`); a finished checkpoint trains no further step.
        on_step: called as ``on_step(step, loss)`` after each step (and after its checkpoint, if any); an
            exception from it stops training, as an interruption would.
        progress: show a progress bar.
        optimizer: an optimizer over the adapters (default: :func:`build_optimizer`).
        sync_every: steps between two read-backs of the losses and norms (the log interval).
        profile_steps: profile this many steps (after the first, which warms up) with torch.profiler; the table of
            the top operators is in ``result.profile``.

    Returns:
        a :class:`TrainResult`.

    Raises:
        TrainingDiverged: the loss or the gradients' norm of a step is NaN or infinite.
        CheckpointError: resuming from a checkpoint with other settings, or a corrupt one.
    """
    output_dir = check_train_args(model, tokenizer, examples, config, output_dir, resume, on_step, progress,
                                  OPTIMIZERS, sync_every, profile_steps)
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
            check_resumable(read_trainer_state(checkpoint), config, checkpoint)
            start, history = load_checkpoint(checkpoint, model, optimizer)
        table, rows, widths, tokens = _token_batches(tokenizer, examples, config, start, device)
        model.train()
        step_seconds: list[float] = []
        pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # steps not read back yet
        saved = [start] if start else []  # the step of the last checkpoint on disk, once there is one
        profiled = None
        prof = _profiler(device) if profile_steps else None

        def read_back() -> None:
            """One transfer for the pending steps' losses and norms; stop at the first that is not finite."""
            values = torch.stack([torch.stack([loss.float(), norm.float()]) for _, _, loss, norm in pending]).tolist()
            if cuda:  # the interval's wall time, shared by its steps (the device ran them asynchronously)
                mean = (time.perf_counter() - interval_began) / len(pending)
                step_seconds[len(step_seconds) - len(pending):] = [mean] * len(pending)
            for (step, lr, _, _), (loss, norm) in zip(pending, values, strict=True):
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    kept = (f"the last checkpoint ({checkpoint}, step {saved[0]}) is kept" if saved
                            else "no checkpoint of this run was saved")
                    raise TrainingDiverged(f"training diverged at step {step + 1}: loss {loss}, gradient norm "
                                           f"{norm} (learning rate {lr:g}); {kept}. Lower the learning rate "
                                           "(--lr), or check the model's weights for NaN")
                history["losses"].append(loss)
                history["grad_norms"].append(norm)
                history["learning_rates"].append(lr)
                history["tokens"].append(tokens[step - start])
                history["widths"].append(widths[step - start])
            pending.clear()

        if cuda:  # the peak of the training steps alone (loading and evaluation before them not included)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        bar = progress_bar(desc="QLoRA fine-tune", total=config.steps - start, unit="steps", enabled=progress)
        interval_began = time.perf_counter()
        with bar:
            for step in range(start, config.steps):
                began = time.perf_counter()
                if prof is not None and step == start + min(1, config.steps - start - 1):
                    prof.start()
                lr = learning_rate_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                index, width = rows[step - start], widths[step - start]
                out = model(input_ids=table["input_ids"][index, :width],
                            attention_mask=table["attention_mask"][index, :width],
                            labels=table["labels"][index, :width], use_cache=False)
                out.loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_seconds.append(time.perf_counter() - began)
                pending.append((step, lr, out.loss.detach(), norm.detach()))
                if prof is not None and profiled is None and (step + 1 == config.steps or
                                                               len(step_seconds) > profile_steps):
                    if cuda:
                        torch.cuda.synchronize(device)
                    prof.stop()
                    profiled = _profile_table(prof, device)
                bar.update()
                save = checkpoint is not None and (step + 1 == config.steps or
                                                   (config.save_every and (step + 1) % config.save_every == 0))
                if save or on_step is not None or step + 1 == config.steps or len(pending) >= sync_every:
                    read_back()
                    if save:
                        save_checkpoint(checkpoint, model, optimizer, step + 1, history, config=config)
                        saved[:] = [step + 1]
                    if on_step is not None:
                        on_step(step, history["losses"][-1])
                    interval_began = time.perf_counter()
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return TrainResult(losses=history["losses"], grad_norms=history["grad_norms"],
                       learning_rates=history["learning_rates"], step_seconds=step_seconds, tokens=history["tokens"],
                       widths=history["widths"], steps_done=config.steps, resumed_from=start,
                       seconds=sum(step_seconds), peak_memory_bytes=peak, checkpoint=checkpoint, optimizer=optimizer,
                       profile=profiled)


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


def heldout_loss(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats a token) of the reference responses, teacher-forced: the held-out loss.

    The tokens the training loss sees (:func:`~qlora_edu.ch08_finetune.instruct_data.collate_examples`: the JSON
    answer and the end token, the prompt and the padding masked), on held-out examples; a smoother number than the
    exact-match score, which is 0 or 1 an example. Logits ``(B, T, V)`` are taken in float32 and the summed
    cross-entropy of every scored position is divided by their count, so batches weigh by their scored tokens:
    ``sum_b sum_t -log p(y_t | y_<t) / n_scored``. Run in :func:`inference_mode` (no dropout), without gradients.
    """
    check_heldout_loss_args(model, tokenizer, examples, batch_size)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with inference_mode(model), torch.no_grad():
        for first in range(0, len(examples), batch_size):
            batch = collate_examples(tokenizer, list(examples[first:first + batch_size]))
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits
            labels = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
            total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


# ----------------------------------------------------------------------------------------------
# Memory


def memory_summary(model: nn.Module, optimizer: torch.optim.Optimizer | None, config: FinetuneConfig, *,
                   seq_len: int, device: str | torch.device = "cpu", peak_bytes: int | None = None,
                   padded: bool = True) -> dict:
    """The memory of the run, measured where it can be and predicted where not.

    Returns a dict of bytes: ``static`` (:func:`qlora_edu.ch04_memory.memory_probe.static_bytes`: the real tensors of
    the frozen weights, adapters, gradients and optimizer states now), ``predicted_total`` and ``predicted_parts``
    (chapter 4's :func:`qlora_edu.ch04_memory.memory.training_memory` for this model, batch, sequence length, rank and
    device; ``padded``: the batch holds padding, as the collator's batches do unless every example has the same
    length: transformers' attention then saves more), ``measured_peak`` (``peak_bytes``:
    ``torch.cuda.max_memory_allocated`` on a GPU, else None) and
    ``process_max_rss`` (the process's peak resident memory, everything included: Python, libraries, data).
    If the prediction fails (a model shape chapter 4's model does not cover), ``predicted_*`` are None / empty
    and ``prediction_error`` says why; otherwise ``prediction_error`` is None.
    """
    device = check_memory_summary_args(model, optimizer, config, seq_len, device, peak_bytes, OPTIMIZERS, padded)
    from qlora_edu.ch04_memory.memory_probe import static_bytes

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {"static": static_bytes(model, optimizer), "predicted_total": None, "predicted_parts": {},
           "predicted_peak_phase": None, "prediction_error": None, "measured_peak": peak_bytes,
           "process_max_rss": rss}
    try:  # the prediction is a convenience: a model shape chapter 4 does not cover must not lose the run's numbers
        from qlora_edu.ch04_memory.memory import training_memory

        predicted = training_memory(model.config, "qlora", batch_size=config.batch_size, seq_len=seq_len,
                                    lora_r=config.lora_r, lora_targets=config.target_modules,
                                    gradient_checkpointing=config.gradient_checkpointing, optimizer=config.optimizer,
                                    lora_dropout=config.lora_dropout, device=device.type, padded=padded)
    except Exception as err:  # any failure of the prediction becomes a message, not a crash
        out["prediction_error"] = (f"chapter 4's training_memory could not predict this set-up "
                                   f"({type(err).__name__}: {err}); the measured numbers above still hold")
        return out
    out.update(predicted_total=predicted.total, predicted_peak_phase=predicted.peak_phase,
               predicted_parts={name: getattr(predicted, name) for name in predicted.parts})
    return out


#: Seconds of one QLoRA training step of the course model at batch 8 x 19 tokens (NF4 + double quantization, bf16
#: compute, r = 16 on all seven projections, gradient checkpointing, AdamW) on an unloaded two-core machine of the
#: kind the course is built on: ``qlora_edu/reference/environment-facts.md``, "Training speed on two CPU cores".
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
    # kept beside train: a stopwatch of the documented reference step on random tokens, not a fine-tune
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


#: What the fine-tune writes in its output folder (a folder holding anything else is not its own).
_OWN_FILES = {ADAPTER: {"adapter_config.json", "adapter_model.safetensors", "README.md"},
              CHECKPOINT: {"adapter_config.json", "adapter_model.safetensors", "README.md", "optimizer.pt",
                           "rng_state.pt", "trainer_state.json"}}
LOCK = ".lock"
_LEFTOVER_KINDS = ("tmp", "old", "trash")


def _leftover(name: str) -> str | None:
    """``"tmp"``, ``"old"`` or ``"trash"`` for a save's leftover folder name (``.checkpoint.tmp-1a2b``), else None."""
    for target in _OWN_FILES:
        for kind in _LEFTOVER_KINDS:
            if name.startswith(f".{target}.{kind}-"):
                return kind
    return None


def check_output_dir(output_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                     results: bool = True) -> Path:
    """Refuse an output folder the run would damage, before anything is loaded; returns it as a ``Path``.

    Refused: a path that is a file; a folder holding anything the fine-tune does not write (``adapter/``,
    ``checkpoint/``, their files, the save leftovers and the lock: nothing else, so nothing of the user's is ever
    replaced); a previous run's results unless ``resume`` (continue it) or ``overwrite`` (replace it), checked
    only with ``results`` (under the lock: another run's results are its own business until then).
    """
    output_dir = check_path("output_dir", output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FinetuneError(f"--output-dir {output_dir} is a file, not a folder: choose a folder")
    if not output_dir.is_dir():
        return output_dir
    foreign = []
    for entry in sorted(output_dir.iterdir()):
        if entry.name == LOCK or (_leftover(entry.name) and entry.is_dir()):
            continue
        if entry.name not in _OWN_FILES or not entry.is_dir():
            foreign.append(entry.name)
        else:
            own = _OWN_FILES[entry.name]
            foreign += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir()) if f.name not in own]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FinetuneError(f"--output-dir {output_dir} holds files the fine-tune did not write ({shown}); it replaces "
                            "what it writes there, so it needs an empty folder or one of its own runs: choose "
                            "another --output-dir (nothing was changed)")
    previous = [name for name in _OWN_FILES if (output_dir / name).exists()]
    previous += [e.name for e in output_dir.iterdir() if _leftover(e.name) == "old"]
    if results and previous and not (resume or overwrite):
        raise FinetuneError(f"--output-dir {output_dir} holds a previous run's results "
                            f"({', '.join(sorted(previous))}); pass --resume to continue that run, --overwrite to "
                            "replace it, or choose another --output-dir")
    return output_dir


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def output_lock(output_dir: Path):
    """Hold ``output_dir/.lock`` for the whole run: a second run on the same folder stops at once, naming the
    first one's process id.

    The lock is an ``flock`` on the file (released by the kernel when its process dies, even by ``kill -9``, so a
    stale lock never blocks); the file records the holder's pid for the message. Where ``flock`` is not available
    the pid alone decides: a lock whose process is gone is taken over.
    """
    path = output_dir / LOCK
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        why = "no space left on its device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror
        raise FinetuneError(f"--output-dir {output_dir} cannot be created or written ({why}); choose another "
                            "--output-dir") from err
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.read(fd, 64).decode(errors="replace").split()
            raise FinetuneError(f"--output-dir {output_dir} is in use by another fine-tune (pid "
                                f"{holder[0] if holder else 'unknown'}, lock {path}); wait for it to finish or choose "
                                "another --output-dir") from None
        except (ImportError, OSError):  # no flock here: decide by the recorded pid
            holder = os.read(fd, 64).decode(errors="replace").split()
            if holder and holder[0].isdigit() and int(holder[0]) != os.getpid() and _process_alive(int(holder[0])):
                raise FinetuneError(f"--output-dir {output_dir} is in use by another fine-tune (pid {holder[0]}, "
                                    f"lock {path}); wait for it to finish or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock


def clean_leftovers(output_dir: Path) -> list[str]:
    """Remove what interrupted saves left in ``output_dir`` (call it holding :func:`output_lock`, so no save is
    under way): ``.NAME.tmp-*`` (never finished) and ``.NAME.trash-*`` (being deleted) folders; an ``.NAME.old-*``
    is first put back if ``NAME`` is missing (:func:`_recover`), and removed only when ``NAME`` is whole again.
    Returns the names removed."""
    for target in _OWN_FILES:
        _recover(output_dir / target)
    removed = []
    for entry in sorted(output_dir.iterdir()):
        if entry.is_dir() and _leftover(entry.name) in ("tmp", "trash", "old"):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def check_writable(output_dir: Path, need_bytes: int = 0) -> None:
    """Write, flush and delete a probe file in ``output_dir`` (a read-only folder fails here, not after the
    training), and refuse when the file system has less than ``need_bytes`` free, naming "no space left"."""
    probe = output_dir / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        why = "no space left on its device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror
        raise FinetuneError(f"--output-dir {output_dir} is not writable ({why}); choose another --output-dir") from err
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(output_dir).free
    if free < need_bytes:
        raise FinetuneError(f"no space left for the run's saves on the device of --output-dir {output_dir}: "
                            f"{free / 2**20:.1f} MiB free, the checkpoint and adapter need about "
                            f"{need_bytes / 2**20:.1f} MiB; free some space or choose another --output-dir")


def _save_bytes(model: nn.Module) -> int:
    """Disk a run's saves need at their fullest: the adapter (float32 in PEFT's file) and a checkpoint (adapter +
    two Adam moments), each written beside the previous one before it replaces it, plus 1 MiB of small files."""
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    return 2 * (adapter + 3 * adapter) + 2**20


def _json_value(value):
    """``value`` with every NaN or infinity as None: JSON has no NaN (``json.dumps`` would write an invalid one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def run_finetune(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 smoke: bool | None = None, output_dir: str | Path = "finetune_output", resume: bool = False,
                 overwrite: bool = False, method: str = "peft", progress: bool = True,
                 log: Callable[[str], None] = print, profile_steps: int = 0, **overrides) -> dict:
    """Load, evaluate, train, evaluate again, save the adapter: what ``python -m qlora_edu.ch08_finetune.finetune``
    runs.

    Before anything is loaded, the output folder is checked (:func:`check_output_dir`), locked for the run
    (:func:`output_lock`), cleared of interrupted saves' leftovers (:func:`clean_leftovers`) and probed for
    writing (:func:`check_writable`; for free space too, once the model says how big its saves are).

    Args:
        model: hub id or local folder of a Llama-style model (None: the bundled SmolLM2 / ``$QLORA_EDU_MODEL``).
        device, dtype: forced device / dtype names (None: :func:`qlora_edu.common.device.pick_compute` decides).
        smoke: the CI budget (None: ``QLORA_EDU_SMOKE``).
        output_dir: where the checkpoint and the adapter (``output_dir/adapter``) go.
        resume: continue from ``output_dir/checkpoint`` (its settings must match; without one it starts fresh,
            and says so).
        overwrite: replace a previous run's results in ``output_dir`` (deleted before training).
        method: ``"peft"`` or ``"scratch"`` (:func:`prepare_qlora`).
        progress: progress bars.
        log: where the human-readable lines go.
        profile_steps: profile this many training steps and log torch.profiler's top operators.
        **overrides: fields of :class:`FinetuneConfig` (``steps=40``, ``learning_rate=5e-4``, ...).

    Returns:
        the summary (JSON-able: no NaN, None instead): ``before``, ``after`` (held-out scores in [0, 1]),
        ``n_eval``, ``gain`` and its 95% bootstrap interval, ``p_value`` (sign test), ``train_seconds``,
        ``seconds_per_step``, ``tokens_per_s``, ``device``, ``dtype``, ``adapter`` (path), ``checkpoint``, losses,
        memory (``peak_memory_bytes``: the training steps' peak; ``predicted_memory_bytes``: chapter 4's prediction
        for the widest batch trained; ``memory_error_percent``: ``100 (predicted - measured) / measured``;
        ``memory_prediction_failure``: why there is no prediction), the config.

    Raises:
        FinetuneError: the output folder is refused or locked, the checkpoint cannot be resumed, training diverged.
    """
    check_run_finetune_args(model, device, dtype, smoke, output_dir, resume, method, progress, log, overwrite,
                            profile_steps)
    from qlora_edu.common.device import pick_compute

    compute = pick_compute(device, dtype)
    config = default_config(compute.device, smoke, **overrides)
    train_set, heldout = load_dataset("train"), load_dataset("heldout")
    if config.eval_size is not None and config.eval_size > len(heldout):
        raise ValueError(f"eval_size (--eval-size) must be at most {len(heldout)}, the held-out examples there are; "
                         f"got {config.eval_size}")
    heldout = heldout[:config.eval_size] if config.eval_size is not None else heldout
    output_dir = check_output_dir(output_dir, results=False)  # creates nothing: a refused folder stays as it was
    with output_lock(output_dir):
        check_output_dir(output_dir, resume=resume, overwrite=overwrite)  # now that no other run writes there
        removed = clean_leftovers(output_dir)
        if removed:
            log(f"removed the leftovers of interrupted saves: {', '.join(removed)}")
        if overwrite and not resume:
            for name in _OWN_FILES:
                if (output_dir / name).exists():
                    _discard(output_dir / name)
                    log(f"--overwrite: removed the previous run's {output_dir / name}")
        check_writable(output_dir)
        has_checkpoint = (output_dir / CHECKPOINT).is_dir()
        if resume:
            if has_checkpoint:
                state = read_trainer_state(output_dir / CHECKPOINT)
                check_resumable(state, config, output_dir / CHECKPOINT)  # before minutes of loading, not after
                done = "finished: nothing to train, its adapter is evaluated" if state["step"] >= config.steps \
                    else "continuing"
                log(f"resuming {output_dir / CHECKPOINT}: {state['step']} of {config.steps} steps done; {done}")
            else:
                log(f"--resume: no checkpoint in {output_dir}, so this run starts fresh")
        log(compute.describe())
        log(f"config: {json.dumps(config.to_dict())}")
        qmodel, tokenizer = load_qlora_model(model, config=config, compute=compute, method=method,
                                             progress=progress)
        check_writable(output_dir, _save_bytes(qmodel))
        before = evaluate(qmodel, tokenizer, heldout, max_new_tokens=config.max_new_tokens, progress=progress)
        log(f"before: {sum(before.correct)}/{before.n} correct ({before.seconds:.1f} s)")
        load = os.getloadavg()[0]
        result = train(qmodel, tokenizer, train_set, config, output_dir=output_dir, resume=resume,
                       progress=progress, profile_steps=profile_steps)
        if result.profile is not None:
            log(f"torch.profiler, the top operators of {profile_steps} training steps:\n{result.profile}")
        trained = config.steps - result.resumed_from
        if trained:
            log(f"trained {trained} steps in {result.seconds:.1f} s ({result.seconds_per_step:.2f} s/step, "
                f"{result.tokens_per_second:.0f} tokens/s, load average {load:.1f}); "
                f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
        else:
            log(f"the run was already finished ({config.steps} steps): no step trained")
        after = evaluate(qmodel, tokenizer, heldout, max_new_tokens=config.max_new_tokens, progress=progress)
        log(f"after: {sum(after.correct)}/{after.n} correct ({after.seconds:.1f} s)")
        adapter = save_adapter(qmodel, output_dir / ADAPTER)
    gain, low, high = paired_bootstrap_interval(before.correct, after.correct)
    width = max(result.widths)  # the widest batch trained: the one the peak belongs to (padded unless full)
    padded = any(n < config.batch_size * w for n, w in zip(result.tokens, result.widths, strict=True) if w == width)
    memory = memory_summary(qmodel, result.optimizer, config, seq_len=width, device=compute.device,
                            peak_bytes=result.peak_memory_bytes, padded=padded)
    measured, predicted = memory["measured_peak"], memory["predicted_total"]
    error = 100 * (predicted - measured) / measured if measured and predicted is not None else None
    summary = {"before": before.score, "after": after.score, "n_eval": before.n, "gain": gain,
               "gain_interval_95": [low, high], "p_value": sign_test_p_value(before.correct, after.correct),
               "train_seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
               "tokens_per_s": result.tokens_per_second, "steps": config.steps, "resumed_from": result.resumed_from,
               "loss_first": result.losses[0], "loss_last": result.losses[-1], "device": compute.device.type,
               "dtype": str(compute.dtype).removeprefix("torch."), "model": model or settings.model_override()
               or "SmolLM2-135M-Instruct (bundled)", "method": method, "adapter": str(adapter),
               "checkpoint": str(result.checkpoint), "load_average": load,
               "peak_memory_bytes": measured, "predicted_memory_bytes": predicted,
               "predicted_memory_batch": [config.batch_size, width], "predicted_memory_padded": padded,
               "memory_error_percent": error,
               "memory_prediction_failure": memory["prediction_error"],
               "process_max_rss_bytes": memory["process_max_rss"], "config": config.to_dict()}
    return _json_value(summary)


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
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default: paged_adamw")
    p.add_argument("--eval-size", type=int, help="held-out examples to score (default: all 200)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default: only at the end)")
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--method", choices=("peft", "scratch"), default="peft",
                   help="peft + bitsandbytes (default) or the course's own NF4 layers")
    p.add_argument("--output-dir", default="finetune_output", help="checkpoint and adapter folder")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint (same settings; "
                                                         "more --steps allowed)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run's results in OUTPUT_DIR")
    p.add_argument("--profile", type=int, nargs="?", const=5, default=0, metavar="STEPS",
                   help="print torch.profiler's top operators of STEPS training steps (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _flag_message(err: Exception) -> str:
    """An error's message with the setting it starts with (the guards' messages do: ``learning_rate must be ...``)
    named by the flag a user typed (``--lr must be ...``)."""
    message = str(err)
    name = message.split(" ", 1)[0]
    return FLAGS[name] + message[len(name):] if name in FLAGS else message


def _check_model_flag(model: str | None) -> None:
    """``--model``: an existing folder must hold a model (``config.json``); a path that looks local (``./x``,
    ``x/y/z``, ``~/x``, absolute, or ``x/y`` where the folder ``x`` exists) must exist. Only what reads as a hub id
    (``org/name``, ``name``) is left to the hub, so a mistyped folder fails at once instead of after retries."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model} is a folder but not a model: it holds no config.json (a transformers "
                             "model folder has config.json and the weights)")
        return
    if path.exists():
        raise ValueError(f"--model {model} is a file; give a model folder or a hub id (org/name)")
    parts = Path(model).parts
    local = model.startswith((".", "/", "~")) or os.path.isabs(model) or len(parts) > 2 or \
        (len(parts) == 2 and Path(parts[0]).is_dir())
    if local:
        raise ValueError(f"--model {model}: no such folder (a local path must exist; a hub id is org/name)")


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: parse ``argv``, :func:`run_finetune`, print the summary as the last line (JSON).

    A bad flag value ends as argparse ends: one line naming the flag, exit status 2. A run that is refused or stops
    (:class:`FinetuneError`: the output folder, its lock, a checkpoint, divergence) ends with one ``error:`` line
    and exit status 1.
    """
    parser = _parser()
    args = vars(parser.parse_args(argv))
    overrides = {k: args.pop(k) for k in ("steps", "batch_size", "learning_rate", "lora_r", "lora_alpha",
                                          "lora_dropout", "optimizer", "eval_size", "save_every", "seed")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    progress = not args.pop("no_progress")
    if args["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device here (torch.cuda.is_available() is False, torch "
                     f"{torch.__version__}); use --device cpu, or run on a machine with a GPU")
    try:
        from qlora_edu.common.device import pick_compute

        compute = pick_compute(args["device"], args["dtype"])
    except (ValueError, RuntimeError) as err:
        parser.error(f"--device {args['device'] or '(default)'} / --dtype {args['dtype'] or '(default)'}: {err}")
    try:
        config = default_config(compute.device, args["smoke"], **overrides)
        n_heldout = len(load_dataset("heldout"))
        if config.eval_size is not None and config.eval_size > n_heldout:
            raise ValueError(f"--eval-size must be at most {n_heldout}, the held-out examples there are; got "
                             f"{config.eval_size}")
        if args["resume"] and args["overwrite"]:
            raise ValueError("--resume and --overwrite exclude each other: continue the previous run or replace it")
        if args["profile"] < 0:
            raise ValueError(f"--profile must be >= 0 steps, got {args['profile']}")
        _check_model_flag(args["model"])
    except (ValueError, TypeError) as err:
        parser.error(_flag_message(err))
    try:
        summary = run_finetune(model=args["model"], device=args["device"], dtype=args["dtype"], smoke=args["smoke"],
                               output_dir=args["output_dir"], resume=args["resume"], overwrite=args["overwrite"],
                               method=args["method"], progress=progress, log=lambda line: print(line, flush=True),
                               profile_steps=args["profile"], **overrides)
    except FinetuneError as err:
        sys.stdout.flush()
        print(f"{parser.prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    sys.stdout.flush()
    print(json.dumps(summary, allow_nan=False), flush=True)
    return summary


if __name__ == "__main__":
    # `python -m` runs this file as __main__, a second copy of the module whose FinetuneConfig is another class:
    # run the imported module's main instead.
    from qlora_edu.ch08_finetune.finetune import main as _main

    _main()
