"""Chapter 9, labs 1, 2, 3, 7 and 9: the seed notes' experiments, run on the course model and written to small
results files that ``notebooks/09_labs.ipynb`` reads.

    python qlora_edu/ch09_labs/labs_a.py lab1            # QLoRA vs LoRA vs full fine-tuning     -> lab1_methods.json
    python qlora_edu/ch09_labs/labs_a.py lab2            # rank ablation r in {8, ..., 128}      -> lab2_rank.json
    python qlora_edu/ch09_labs/labs_a.py lab3            # target modules at equal budgets       -> lab3_targets.json
    python qlora_edu/ch09_labs/labs_a.py lab7            # loss curves and the spectrum of dW    -> lab7_dynamics.json
    python qlora_edu/ch09_labs/labs_a.py lab9            # sweeps: trials per 24 GB GPU, lr x r  -> lab9_sweeps.json
    python qlora_edu/ch09_labs/labs_a.py all             # the five, one after another
    options: --smoke (a few steps, a few held-out orders; also QLORA_EDU_SMOKE=1), --out DIR (default
             notebooks/results), --model PATH (a Llama-style folder instead of the bundled SmolLM2), --no-progress

Every lab trains on chapter 8's task (:mod:`qlora_edu.ch08_finetune.instruct_data`: order messages -> one JSON object,
scored
exactly on held-out orders whose names and cities never occur in training) with chapter 8's loop
(:func:`qlora_edu.ch08_finetune.finetune.train`: the same seeded batches for every trial, warm-up, clipping at 0.3,
loss on the
responses only) and the same optimizer for every method (torch's AdamW), so that the method is the only change.

The three set-ups (:func:`build_model`):

* ``full``: every weight of the float32 model trained;
* ``lora``: peft's LoRA on the base in the compute dtype (bf16 on this CPU: the "16-bit base" of the seed notes),
  the base frozen, the adapters in float32 (peft's default);
* ``qlora``: chapter 8's recipe (:func:`qlora_edu.ch08_finetune.finetune.load_qlora_model`): NF4 + double quantization,
bf16
  compute, ``prepare_model_for_kbit_training``, peft's LoRA.

All three use gradient checkpointing (reentrant, as peft sets it up), so their activations are measured alike.
Measured for each trial (:func:`run_trial`): the exact held-out score
(:func:`qlora_edu.ch08_finetune.finetune.evaluate`), the
held-out loss on the responses (a smoother number than the exact score when scores saturate), the bytes of the real
tensors (:func:`qlora_edu.ch04_memory.memory_probe.static_bytes`, gradients after a real backward) and of the
activations autograd
saves for backward (:func:`qlora_edu.ch04_memory.memory_probe.saved_activation_bytes`, with and without checkpointing),
wall and
CPU seconds. Each results file records the lab's wall time, its CPU time and the machine's load average, because the
machine these files were produced on is shared: wall times are noisy, CPU seconds and ratios less so.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from qlora_edu.ch04_memory.memory_probe import saved_activation_bytes, static_bytes, tensor_bytes
from qlora_edu.ch06_lora.lora import LLAMA_ATTENTION, LLAMA_TARGETS, lora_param_count
from qlora_edu.ch08_finetune.finetune import (
    FinetuneConfig,
    evaluate,
    inference_mode,
    load_qlora_model,
    lora_config,
    train,
)
from qlora_edu.ch08_finetune.instruct_data import (
    IGNORE_INDEX,
    Example,
    collate_examples,
    load_dataset,
    load_tokenizer,
    paired_bootstrap_interval,
)
from qlora_edu.common import settings
from qlora_edu.common.progress import progress_bar

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "notebooks" / "results"
LABS = ("lab1", "lab2", "lab3", "lab7", "lab9")
FILES = {"lab1": "lab1_methods.json", "lab2": "lab2_rank.json", "lab3": "lab3_targets.json",
         "lab7": "lab7_dynamics.json", "lab9": "lab9_sweeps.json"}
METHODS = ("full", "lora", "qlora")
MiB = 2**20
GiB = 2**30

#: The adapters' learning rate: chapter 8's CPU default (``default_config("cpu")``), fixed before any lab ran.
ADAPTER_LR = 1e-3
#: Full fine-tuning's learning rates (1e-4: a common choice for a model of this size; the machine's budget allowed
#: one). With several, lab 1 takes as the reference the one with the lower training loss over the last steps (the
#: held-out set plays no part in the choice).
FULL_LRS = (1e-4,)
#: Lab 7's full fine-tuning learning rate (lab 1's reference run).
FULL_LR = 1e-4
#: The seed notes' quality figures (note 004: "Full fine-tuning 100%, LoRA ~97%, QLoRA ~95%").
SEED_NOTE_RELATIVE = {"full": 1.00, "lora": 0.97, "qlora": 0.95}


# ----------------------------------------------------------------------------------------------
# Budgets


@dataclass(frozen=True)
class Budget:
    """How much a trial trains and how much of the held-out split it is scored on.

    Attributes:
        steps: optimizer steps (the same seeded batches in every trial).
        batch_size: examples a step.
        eval_size: held-out orders scored exactly by greedy generation (the first ``eval_size`` of 200).
        loss_size: held-out orders whose response loss is measured (teacher forcing, no generation).
        max_new_tokens: generation budget (a correct reply takes 32-40 tokens).
        seed: adapters' initialization, batch order, dropout.
    """

    steps: int
    batch_size: int = 4
    eval_size: int = 200
    loss_size: int = 200
    max_new_tokens: int = 48
    seed: int = 0


#: Full budgets, sized to the machine (two CPU cores shared by several jobs): 24 steps of 4 orders (96 orders, about
#: 11,000 tokens), the first 100 held-out orders scored and their response loss measured. Every lab has the same
#: budget, so a trial that two labs share (lab 1's QLoRA run is lab 2's r = 16; lab 2's r = 8 and 64 are lab 9's
#: lr = 1e-3 column; lab 1's three methods are lab 7's) is trained once (:func:`run_trial` keeps finished runs).
_BUDGET = Budget(steps=24, batch_size=4, eval_size=100, loss_size=100)
FULL_BUDGETS = {"lab1": _BUDGET, "lab2": _BUDGET, "lab3": _BUDGET, "lab7": _BUDGET, "lab9": _BUDGET}
#: Held-out orders generated at once (a batch's logits and cache, not the score, depend on it: kept small for memory).
EVAL_BATCH = 25
SMOKE_BUDGET = Budget(steps=2, batch_size=2, eval_size=4, loss_size=4, max_new_tokens=8)


def budget_for(lab: str, smoke: bool) -> Budget:
    """The budget of ``lab`` (``SMOKE_BUDGET`` in smoke mode, but lab 7 keeps an evaluation size of 0)."""
    full = FULL_BUDGETS[lab]
    return replace(SMOKE_BUDGET, eval_size=min(full.eval_size, SMOKE_BUDGET.eval_size)) if smoke else full


# ----------------------------------------------------------------------------------------------
# One trial


@dataclass(frozen=True)
class Trial:
    """One fine-tune: the method and its hyperparameters (``r``, ``alpha``, ``targets`` unused by ``full``)."""

    name: str
    method: str
    lr: float
    r: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = LLAMA_TARGETS
    dropout: float = 0.05

    def config(self, budget: Budget) -> FinetuneConfig:
        """Chapter 8's :class:`FinetuneConfig` for this trial: the recipe's warm-up and clipping, torch's AdamW."""
        return FinetuneConfig(steps=budget.steps, batch_size=budget.batch_size, learning_rate=self.lr,
                              lora_r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                              target_modules=tuple(self.targets), optimizer="adamw", seed=budget.seed,
                              max_new_tokens=budget.max_new_tokens)


@dataclass
class Context:
    """What every trial of a run shares: the model to load, the device, the data, the tokenizer."""

    model_path: str | None
    compute: object
    tokenizer: object
    train_set: list[Example]
    heldout: list[Example]
    progress: bool = True
    model_name: str = "SmolLM2-135M-Instruct (bundled)"
    log: Callable[[str], None] | None = None
    trials: dict = field(default_factory=dict)   # (lab, trial, budget, score, memory) -> record: run once, reuse
    updates: dict = field(default_factory=dict)  # (method, budget) -> lab 7's weight updates, kept by lab 1
    current_lab: str = ""
    cache_dir: Path | None = None  # where finished trials are kept as files (None: in memory only)

    @classmethod
    def create(cls, model_path: str | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None, cache_dir: str | Path | None = None) -> Context:
        from qlora_edu.common.device import pick_compute

        name = str(model_path) if model_path else (settings.model_override() or "SmolLM2-135M-Instruct (bundled)")
        return cls(model_path=model_path, compute=pick_compute(), tokenizer=load_tokenizer(model_path),
                   train_set=load_dataset("train"), heldout=load_dataset("heldout"), progress=progress,
                   model_name=name, log=log, cache_dir=None if cache_dir is None else Path(cache_dir))


def build_model(method: str, config: FinetuneConfig, ctx: Context) -> nn.Module:
    """The model to train for ``method`` (see the module docstring), on ``ctx``'s device, adapters seeded."""
    from qlora_edu.common.base_model import load_base_model

    device = ctx.compute.device if ctx.compute.device.type == "cuda" else None
    if method == "qlora":
        model, _ = load_qlora_model(ctx.model_path, config=config, compute=ctx.compute, progress=False)
        model.config.use_cache = False
        return model
    dtype = torch.float32 if method == "full" else ctx.compute.dtype
    model, _ = load_base_model(ctx.model_path, dtype=dtype, device=device, progress=False)
    model.config.use_cache = False  # training; generate() asks for the cache itself
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation note on gradient_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    # seeded exactly as prepare_qlora seeds QLoRA's adapters: LoRA and QLoRA start from the same A matrices
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return get_peft_model(model, lora_config(config))


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared storages once)."""
    seen = {p.data_ptr(): p.numel() for p in model.parameters() if p.requires_grad}
    return sum(seen.values())


def heldout_loss(model: nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 10) -> float:
    """Mean cross-entropy per response token over ``examples`` (teacher forcing, the prompt masked as in training).

    Each batch's ``loss`` is the mean over its scored tokens (labels shifted by one inside the model), so the batches
    are weighted by their number of scored tokens: ``sum_b loss_b * n_b / sum_b n_b``.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with inference_mode(model), torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_examples(tokenizer, examples[i:i + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch, use_cache=False).loss) * n
            count += n
    return total / count


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if on:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        else:
            inner.gradient_checkpointing_disable()


def measure_memory(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> dict[str, int]:
    """Bytes of a trained set-up's real tensors and of what one training step saves for backward.

    ``frozen_weights``, ``trainable_weights``, ``optimizer_states``:
    :func:`~qlora_edu.ch04_memory.memory_probe.static_bytes`
    now (the states exist after training); ``gradients``: the ``.grad`` tensors after one real backward on
    ``batch`` (freed again); ``saved_activations`` (checkpointing on, as trained) and ``saved_activations_no_ckpt``:
    :func:`~qlora_edu.ch04_memory.memory_probe.saved_activation_bytes` on ``batch``; ``total`` = the four static parts
    + the
    saved activations with checkpointing: a lower bound of a step's peak (the backward's temporaries and the
    recomputed layer come on top; chapter 4 predicts those).
    """
    device = next(p.device for p in model.parameters() if p.requires_grad)
    batch = {k: v.to(device) for k, v in batch.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with torch.random.fork_rng(devices=[]):  # dropout draws: leave the caller's random state as it was
        model(**batch, use_cache=False).loss.backward()
        gradients = tensor_bytes([p.grad for p in trainable if p.grad is not None])
        model.zero_grad(set_to_none=True)
        static = static_bytes(model, optimizer)
        saved = saved_activation_bytes(model, batch)
        _set_checkpointing(model, False)
        saved_no_ckpt = saved_activation_bytes(model, batch)
        _set_checkpointing(model, True)
    out = {"frozen_weights": static["frozen_weights"], "trainable_weights": static["trainable_weights"],
           "gradients": gradients, "optimizer_states": static["optimizer_states"], "saved_activations": saved,
           "saved_activations_no_ckpt": saved_no_ckpt}
    out["total"] = sum(out[k] for k in ("frozen_weights", "trainable_weights", "gradients", "optimizer_states",
                                        "saved_activations"))
    return out


def _trial_id(trial: Trial, budget: Budget, ctx: Context) -> str:
    """A file name for a trial's run: a hash of everything that determines it (the trial without its display name,
    the budget, the model)."""
    text = json.dumps([asdict(replace(trial, name="")), asdict(budget), ctx.model_name], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_trial(trial: Trial, budget: Budget, ctx: Context, *, score: bool = True, memory: bool = True,
              keep_update: bool = False) -> dict:
    """Build, train, measure and score one trial; returns a JSON-able record.

    A trial is a pure function of ``(trial, budget, model)`` (seeded adapters, batches and dropout), so its record
    is kept (in ``ctx.trials``, and as a file in ``ctx.cache_dir`` when set) and handed back, marked
    ``"reused_from": lab``, to any later request for the same run: within one process, across the labs, and
    across processes (a run that was interrupted resumes after its last finished trial).

    Args:
        trial, budget, ctx: what to train, how long, on what.
        score: generate and score ``budget.eval_size`` held-out orders (skipped when it is 0).
        memory: measure the tensors' bytes (:func:`measure_memory`).
        keep_update: keep the weight update in ``ctx.updates[(method, budget)]`` for lab 7 (full fine-tuning:
            ``W_after - W_before`` of the seven projections; LoRA: its factors), and in the cache folder.
    """
    key = (replace(trial, name=""), budget, score, memory)
    ident = _trial_id(trial, budget, ctx)
    if key not in ctx.trials and ctx.cache_dir is not None:
        path = ctx.cache_dir / f"{ident}-{int(score)}{int(memory)}.json"
        if path.is_file():
            ctx.trials[key] = tuple(json.loads(path.read_text()))
    update_file = None if ctx.cache_dir is None else ctx.cache_dir / f"{ident}.update.pt"
    kept_update = (trial.method, budget) in ctx.updates or (update_file is not None and update_file.is_file())
    if key in ctx.trials and (not keep_update or kept_update):
        lab, record = ctx.trials[key]
        if keep_update and (trial.method, budget) not in ctx.updates:
            ctx.updates[(trial.method, budget)] = torch.load(update_file, weights_only=True)
        return {**json.loads(json.dumps(record)), "name": trial.name, "reused_from": lab}
    config = trial.config(budget)
    began, cpu_began = time.perf_counter(), time.process_time()
    model = build_model(trial.method, config, ctx)
    before = projection_weights(model) if keep_update and trial.method == "full" else None
    n_trainable = trainable_parameters(model)
    train_cpu = time.process_time()
    result = train(model, ctx.tokenizer, ctx.train_set, config, progress=ctx.progress)
    train_cpu = time.process_time() - train_cpu
    record: dict[str, object] = {
        "name": trial.name, "method": trial.method, "lr": trial.lr,
        "r": None if trial.method == "full" else trial.r, "alpha": None if trial.method == "full" else trial.alpha,
        "targets": None if trial.method == "full" else list(trial.targets), "trainable_params": n_trainable,
        "losses": [round(x, 5) for x in result.losses], "grad_norms": [round(x, 4) for x in result.grad_norms],
        "train_seconds": round(result.seconds, 2), "seconds_per_step": round(result.seconds_per_step, 3),
        "train_cpu_seconds": round(train_cpu, 2), "tokens": int(sum(result.tokens)),
        "final_train_loss": round(_tail_mean(result.losses), 5),
    }
    if keep_update:
        if before is not None:
            after = projection_weights(model)
            update = {k: after[k] - w for k, w in before.items()}
            del before, after
        else:
            update = lora_factors(model)
        ctx.updates[(trial.method, budget)] = update
        if update_file is not None:
            update_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(update, update_file.with_suffix(".tmp"))
            update_file.with_suffix(".tmp").replace(update_file)
    phase = time.process_time()
    if memory:
        probe = collate_examples(ctx.tokenizer, ctx.train_set[:budget.batch_size])
        record["memory"] = measure_memory(model, result.optimizer, probe)
    if budget.loss_size:
        record["heldout_loss"] = round(heldout_loss(model, ctx.tokenizer, ctx.heldout[:budget.loss_size]), 5)
    record["measure_cpu_seconds"] = round(time.process_time() - phase, 2)
    if score and budget.eval_size:
        phase = time.process_time()
        ev = evaluate(model, ctx.tokenizer, ctx.heldout[:budget.eval_size], batch_size=EVAL_BATCH,
                      max_new_tokens=budget.max_new_tokens, progress=ctx.progress)
        record.update(score=ev.score, n_eval=ev.n, correct=[int(c) for c in ev.correct],
                      eval_seconds=round(ev.seconds, 2), eval_cpu_seconds=round(time.process_time() - phase, 2),
                      example_reply=ev.replies[0][:200])
    record["wall_seconds"] = round(time.perf_counter() - began, 2)
    record["cpu_seconds"] = round(time.process_time() - cpu_began, 2)
    if ctx.log is not None:
        ctx.log(f"{trial.name}: " + ", ".join(f"{k} {record[k]}" for k in (
            "final_train_loss", "heldout_loss", "score", "train_cpu_seconds", "measure_cpu_seconds",
            "eval_cpu_seconds", "cpu_seconds", "wall_seconds") if k in record))
    del model, result
    gc.collect()  # free the model now (peft's modules hold reference cycles): the next trial needs the memory
    _return_freed_memory()
    kept = (ctx.current_lab, json.loads(json.dumps(record)))  # a copy: the lab may add fields to its record
    # a request for less (no memory, no score) can reuse this run's record too
    for flags in {(score, memory), (score, False), (False, False)}:
        ctx.trials.setdefault((key[0], budget, *flags), kept)
        if ctx.cache_dir is not None:
            path = ctx.cache_dir / f"{ident}-{int(flags[0])}{int(flags[1])}.json"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(kept))
    return record


def _return_freed_memory() -> None:
    """Hand memory that Python and torch freed back to the operating system (glibc keeps it otherwise), so that a
    long run on a shared machine holds only what it uses. A no-op where glibc's ``malloc_trim`` is missing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tail_mean(values: Sequence[float], k: int = 10) -> float:
    """Mean of the last ``k`` values (all of them when there are fewer): a less noisy final loss."""
    tail = list(values)[-k:]
    return sum(tail) / len(tail)


def _interval(reference: Sequence[int], other: Sequence[int]) -> list[float]:
    """``[difference, low, high]``: the other trial's score minus the reference's, with its 95% paired bootstrap
    interval (:func:`qlora_edu.ch08_finetune.instruct_data.paired_bootstrap_interval`, same held-out orders)."""
    gain, low, high = paired_bootstrap_interval([bool(c) for c in reference], [bool(c) for c in other])
    return [round(gain, 4), round(low, 4), round(high, 4)]


# ----------------------------------------------------------------------------------------------
# The labs


def lab1(ctx: Context, budget: Budget, smoke: bool) -> dict:
    """QLoRA vs LoRA vs full fine-tuning on the same task, batches and steps.

    Full fine-tuning is trained at each of :data:`FULL_LRS`; its reference run is the one with the lower mean
    training loss over the last 10 steps. LoRA and QLoRA: r = 16, alpha = 16, all seven projections, lr 1e-3
    (chapter 8's CPU defaults). Relative quality = score / the full reference's score, set beside the seed notes'
    97% / 95%.
    """
    full_lrs = FULL_LRS[-1:] if smoke else FULL_LRS
    # the adapters first: they need the least memory, full fine-tuning the most (a shared machine frees up later)
    trials = [Trial("lora", "lora", ADAPTER_LR), Trial("qlora", "qlora", ADAPTER_LR)]
    trials += [Trial(f"full (lr {lr:g})", "full", lr) for lr in full_lrs]
    shared = {replace(t, name="") for t in lab7_trials()}
    records = [run_trial(t, budget, ctx, keep_update=replace(t, name="") in shared)
               for t in _bar(trials, "lab 1 trials", ctx)]
    fulls = [r for r in records if r["method"] == "full"]
    reference = min(fulls, key=lambda r: r["final_train_loss"])
    for r in records:
        r["is_full_reference"] = r is reference
        if "score" in r:
            r["relative_to_full"] = round(r["score"] / reference["score"], 4) if reference["score"] else None
            r["score_minus_full"] = _interval(reference["correct"], r["correct"])
    by = {r["method"]: r for r in records if r["method"] != "full"}
    summary = {"full_reference": reference["name"], "seed_note_relative": SEED_NOTE_RELATIVE}
    if "score" in by["qlora"]:
        summary["qlora_minus_lora"] = _interval(by["lora"]["correct"], by["qlora"]["correct"])
    return {"trials": records, "summary": summary}


RANKS = (8, 16, 32, 64, 128)


def lab2(ctx: Context, budget: Budget, smoke: bool) -> dict:
    """Rank ablation: QLoRA on all seven projections at r in :data:`RANKS`, alpha fixed at 16 (the paper keeps
    alpha fixed, so ``alpha / r`` shrinks as r grows; the lr 1e-3 of chapter 8's CPU default for every rank)."""
    ranks = RANKS[:2] if smoke else RANKS
    trials = [Trial(f"r={r}", "qlora", ADAPTER_LR, r=r) for r in ranks]
    records = [run_trial(t, budget, ctx) for t in _bar(trials, "lab 2 ranks", ctx)]
    predicted = {r: lora_param_count(_model_config(ctx), r, LLAMA_TARGETS) for r in ranks}
    for rec in records:
        rec["predicted_trainable_params"] = predicted[rec["r"]]
    best = max(records, key=lambda r: (r.get("score", 0), -r["heldout_loss"]))
    for rec in records:
        if "score" in rec:
            rec["score_minus_best"] = _interval(best["correct"], rec["correct"])
    return {"trials": records, "summary": {"best": best["name"], "alpha": 16.0, "lr": ADAPTER_LR}}


TARGET_SETS = {"q,v": ("q_proj", "v_proj"), "q,k,v,o": LLAMA_ATTENTION, "all seven": LLAMA_TARGETS}
#: The budget of lab 3: the trainable parameters of LoRA on all seven projections at this rank.
BUDGET_RANK = 8


def equal_budget_ranks(model_config, budget_rank: int = BUDGET_RANK) -> dict[str, int]:
    """For each of :data:`TARGET_SETS`, the rank whose trainable parameters come closest to those of all seven
    projections at ``budget_rank`` (``lora_param_count`` is linear in r, so ``r = round(budget / per_rank)``)."""
    budget = lora_param_count(model_config, budget_rank, LLAMA_TARGETS)
    return {name: max(1, round(budget / lora_param_count(model_config, 1, targets)))
            for name, targets in TARGET_SETS.items()}


def lab3(ctx: Context, budget: Budget, smoke: bool) -> dict:
    """Target modules: q,v vs q,k,v,o vs all seven projections, QLoRA, at equal trainable budgets: the rank of each
    set is chosen so that its trainable parameters match those of all seven at r = :data:`BUDGET_RANK`
    (:func:`equal_budget_ranks`). alpha = r, so that ``alpha / r = 1`` for every set and the rank is the only knob
    that changes between them (with alpha fixed, the set with the highest rank would also get the smallest scale)."""
    config = _model_config(ctx)
    ranks = equal_budget_ranks(config)
    trials = [Trial(f"{name}, r={ranks[name]}", "qlora", ADAPTER_LR, r=ranks[name], alpha=float(ranks[name]),
                    targets=targets) for name, targets in TARGET_SETS.items()]
    records = [run_trial(t, budget, ctx, memory=False) for t in _bar(trials, "lab 3 target sets", ctx)]
    for rec, name in zip(records, TARGET_SETS, strict=True):
        rec["target_set"] = name
    reference = records[-1]  # all seven at the budget rank
    for rec in records:
        if "score" in rec:
            rec["score_minus_all_seven"] = _interval(reference["correct"], rec["correct"])
    return {"trials": records, "summary": {"budget_rank": BUDGET_RANK, "equal_budget_ranks": ranks,
                                           "budget_params": lora_param_count(config, BUDGET_RANK, LLAMA_TARGETS)}}


# lab 7 ------------------------------------------------------------------------------------------

_LINEAR_NAME = re.compile(r"layers\.(\d+)\..*?(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
SPECTRUM_KEEP = 64  # singular values kept per matrix in the results file for the plotted layer


def projection_weights(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """``(layer, projection) -> weight`` (a float32 copy) of a plain (full fine-tuning) model's seven projections."""
    out = {}
    for name, module in model.named_modules():
        m = _LINEAR_NAME.search(name)
        if m and isinstance(module, nn.Linear):
            out[(int(m.group(1)), m.group(2))] = module.weight.detach().float().clone()
    return out


def lora_factors(model: nn.Module) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """``(layer, projection) -> (scaling * B, A)`` of a peft LoRA model: its update is ``dW = scaling * B @ A``."""
    out = {}
    for name, module in model.named_modules():
        m = _LINEAR_NAME.search(name)
        if m and hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            b = module.lora_B["default"].weight.detach().float() * module.scaling["default"]
            out[(int(m.group(1)), m.group(2))] = (b.clone(), module.lora_A["default"].weight.detach().float().clone())
    return out


def low_rank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and left singular vectors of ``B @ A`` (``B``: (out, r), ``A``: (r, in)) without forming it.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (reduced QR), so ``B A = Q_B (R_B R_A^T) Q_A^T``; the SVD of the small
    ``r x r`` core ``U' S V'^T`` gives ``B A = (Q_B U') S (Q_A V')^T``: the same nonzero singular values, and left
    singular vectors ``Q_B U'``. Cost ``O((out + in) r^2)`` instead of ``O(out in min(out, in))``.
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, _ = torch.linalg.svd(rb @ ra.T)
    return s, qb @ u


def spectrum_stats(s: torch.Tensor, r: int) -> dict[str, float]:
    """Summaries of singular values ``s`` (descending) of an update ``dW``.

    ``energy_top_r``: the share of ``||dW||_F^2 = sum s_i^2`` in the top ``r`` values (what a rank-r approximation
    keeps, Eckart-Young); ``rank_90``: how many values hold 90% of it; ``stable_rank`` = ``||dW||_F^2 / ||dW||_2^2``
    (between 1 and the rank; robust to tiny values); ``frobenius``: ``||dW||_F``.
    """
    e = s.double() ** 2
    total = e.sum()
    if total == 0:
        return {"energy_top_r": float("nan"), "rank_90": 0, "stable_rank": float("nan"), "frobenius": 0.0}
    cum = torch.cumsum(e, 0) / total
    return {"energy_top_r": float(cum[min(r, len(s)) - 1]), "rank_90": int((cum < 0.9).sum()) + 1,
            "stable_rank": float(total / e[0]), "frobenius": float(total.sqrt())}


def subspace_overlap(u1: torch.Tensor, u2: torch.Tensor) -> float:
    """``||U1^T U2||_F^2 / k`` for two ``(n, k)`` orthonormal bases: 1 for the same k-dim subspace, 0 for orthogonal
    ones, ``k / n`` on average for random ones (the LoRA paper's normalized subspace similarity)."""
    k = min(u1.shape[1], u2.shape[1])
    return float((u1[:, :k].T @ u2[:, :k]).square().sum() / k)


def lab7_trials() -> list[Trial]:
    """Lab 7's three runs (r = 16 for the adapters): also lab 1's reference-candidate runs, so lab 1 keeps their
    updates for lab 7 when both run in one process."""
    return [Trial("full", "full", FULL_LR), Trial("lora", "lora", ADAPTER_LR), Trial("qlora", "qlora", ADAPTER_LR)]


def _round(x: float, digits: int = 5) -> float | None:
    """``x`` to ``digits`` significant digits; None for NaN (JSON has no NaN)."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def lab7(ctx: Context, budget: Budget, smoke: bool) -> dict:
    """Training dynamics: the loss curves of full fine-tuning, LoRA and QLoRA on the same batches, and the singular
    values of the updates they learn: full fine-tuning's ``dW = W_after - W_before`` of every projection against
    LoRA's and QLoRA's ``scaling * B A`` (r = 16). Is the full update low rank? Do the methods learn the same
    directions (:func:`subspace_overlap` of the top-16 left singular vectors)? A random Gaussian matrix of each shape
    is the "no structure" baseline."""
    r = 16
    records, updates = [], {}
    for t in _bar(lab7_trials(), "lab 7 methods", ctx):
        record = run_trial(t, budget, ctx, score=False, memory=False, keep_update=True)  # lab 1's runs, if kept
        updates[t.method] = ctx.updates.pop((t.method, budget))
        records.append({k: v for k, v in record.items()
                        if k not in ("correct", "memory", "example_reply", "score", "n_eval", "eval_seconds",
                                     "eval_cpu_seconds", *_LAB_FIELDS[:-1])})
    keys = sorted(updates["full"])
    layers = sorted({k[0] for k in keys})
    plot_layer = layers[len(layers) // 2]
    gen = torch.Generator().manual_seed(0)
    random_bases: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    rows, spectra = [], {}
    for key in progress_bar(keys, desc="lab 7 spectra", unit="matrices", enabled=ctx.progress):
        dw = updates["full"][key]
        u_full, s_full, _ = torch.linalg.svd(dw, full_matrices=False)
        if dw.shape not in random_bases:
            u_rand, s_rand, _ = torch.linalg.svd(torch.randn(dw.shape, generator=gen), full_matrices=False)
            random_bases[dw.shape] = (u_rand, s_rand)
        u_rand, s_rand = random_bases[dw.shape]
        row = {"layer": key[0], "module": key[1], "shape": list(dw.shape)}
        stats = {"full": spectrum_stats(s_full, r), "random": spectrum_stats(s_rand, r)}
        bases = {"full": u_full[:, :r], "random": u_rand[:, :r]}
        svals = {"full": s_full, "random": s_rand}
        for method in ("lora", "qlora"):
            b, a = updates[method][key]
            s, u = low_rank_svd(b, a)
            stats[method], bases[method], svals[method] = spectrum_stats(s, r), u, s
        for method, st in stats.items():
            for name, value in st.items():
                row[f"{method}_{name}"] = _round(value)
        row["overlap_full_lora"] = _round(subspace_overlap(bases["full"], bases["lora"]))
        row["overlap_full_qlora"] = _round(subspace_overlap(bases["full"], bases["qlora"]))
        row["overlap_lora_qlora"] = _round(subspace_overlap(bases["lora"], bases["qlora"]))
        row["overlap_full_random"] = _round(subspace_overlap(bases["full"], bases["random"]))
        rows.append(row)
        if key[0] == plot_layer:
            spectra[key[1]] = {m: [_round(float(x)) for x in v[:SPECTRUM_KEEP]] for m, v in svals.items()}
    for rec in records:
        rec.pop("grad_norms", None)
    med = {}
    for col in ("full_energy_top_r", "random_energy_top_r", "full_rank_90", "random_rank_90", "full_stable_rank",
                "lora_stable_rank", "overlap_full_lora", "overlap_full_qlora", "overlap_lora_qlora",
                "overlap_full_random"):
        values = sorted(row[col] for row in rows)
        med[col] = values[len(values) // 2]
    return {"trials": records, "matrices": rows, "spectra_layer": plot_layer, "spectra": spectra, "rank": r,
            "summary": {"medians": med}}


# lab 9 ------------------------------------------------------------------------------------------

SWEEP_LRS = (1e-3, 3e-3)  # lr 1e-3 at r = 8 and 64: lab 2's runs (reused)
SWEEP_RANKS = (8, 64)
GPU_24GB = 24 * GiB        # an RTX 3090 / 4090: 24 GiB of device memory
CUDA_CONTEXT = GiB // 2    # what each process's CUDA context takes before torch allocates (qlora_edu.fits)
SEVEN_B_SHAPES = ((1, 512), (4, 512), (1, 2048))
#: gpu-facts.md, H100, 7B shape, r = 64 on all seven projections, paged AdamW, checkpointing, batch 1 x 512: total MiB
#: (torch peak + paged optimizer states) and tokens/s.
GPU_FACTS_7B = {"qlora": {"total_mib": 6996, "tokens_per_s": 812}, "lora": {"total_mib": 15501, "tokens_per_s": 1043}}


def trials_per_gpu(per_trial_bytes: int, gpu_bytes: int = GPU_24GB, context_bytes: int = CUDA_CONTEXT) -> int:
    """How many trials run side by side on one GPU, one process each: ``floor(gpu / (per_trial + context))``."""
    return int(gpu_bytes // (per_trial_bytes + context_bytes))


def gpu_trial_table() -> list[dict]:
    """Chapter 4's predicted peak of one 7B trial (r = 64 on all seven projections, paged AdamW 32-bit for the
    adapters, AdamW for full fine-tuning, gradient checkpointing) and how many such trials fit a 24 GB GPU."""
    from qlora_edu.ch04_memory.memory import llama_config, training_memory  # chapter 4 (imported when lab 9 runs)

    config = llama_config("7B")
    rows = []
    for method in METHODS:
        for batch, seq in SEVEN_B_SHAPES:
            optimizer = "adamw" if method == "full" else "paged_adamw"
            m = training_memory(config, method, batch_size=batch, seq_len=seq, lora_r=64,
                                gradient_checkpointing=True, optimizer=optimizer)
            rows.append({"method": method, "batch": batch, "seq": seq, "optimizer": optimizer,
                         "predicted_total_bytes": int(m.total), "frozen_weights_bytes": int(m.frozen_weights),
                         "trials_per_24gb": trials_per_gpu(int(m.total))})
    return rows


def lab9(ctx: Context, budget: Budget, smoke: bool) -> dict:
    """Sweeps on a budget. (a) How many 7B trials fit one 24 GB GPU, QLoRA vs LoRA vs full, from chapter 4's memory
    model (and from gpu-facts.md's measured H100 totals). (b) A small learning-rate x rank sweep of QLoRA on the
    course model: lr in :data:`SWEEP_LRS` x r in :data:`SWEEP_RANKS`, alpha 16, all seven projections."""
    try:
        table = gpu_trial_table()
        table_error = None
    except Exception as exc:  # chapter 4's model is another helper's; the sweep below still runs without it
        table, table_error = [], f"{type(exc).__name__}: {exc}"
    measured = {m: {**v, "trials_per_24gb": trials_per_gpu(v["total_mib"] * MiB)} for m, v in GPU_FACTS_7B.items()}
    lrs, ranks = (SWEEP_LRS[:1], SWEEP_RANKS[:1]) if smoke else (SWEEP_LRS, SWEEP_RANKS)
    # the learning rates other labs did not run first (lr 1e-3 is lab 2's: reused when its runs are there)
    trials = [Trial(f"lr={lr:g}, r={r}", "qlora", lr, r=r) for lr in sorted(lrs, key=lambda x: x == ADAPTER_LR)
              for r in ranks]
    records = [run_trial(t, budget, ctx, memory=False) for t in _bar(trials, "lab 9 sweep", ctx)]
    best = max(records, key=lambda r: (r.get("score", 0), -r["heldout_loss"]))
    return {"gpu_trials": table, "gpu_trials_error": table_error, "gpu_facts_7b": measured,
            "gpu_bytes": GPU_24GB, "cuda_context_bytes": CUDA_CONTEXT, "trials": records,
            "summary": {"best": best["name"], "lrs": list(lrs), "ranks": list(ranks),
                        "cpu_seconds_per_trial": round(sum(r["cpu_seconds"] for r in records) / len(records), 1)}}


# ----------------------------------------------------------------------------------------------
# Running a lab


def _model_config(ctx: Context):
    from transformers import AutoConfig

    from qlora_edu.common.base_model import prepare_cache

    source = ctx.model_path or settings.model_override() or prepare_cache(progress=False)
    return AutoConfig.from_pretrained(str(source))


def _bar(items, desc: str, ctx: Context):
    return progress_bar(items, desc=desc, unit="trials", enabled=ctx.progress)


def _versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "python": sys.version.split()[0]}


LAB_FUNCTIONS = {"lab1": lab1, "lab2": lab2, "lab3": lab3, "lab7": lab7, "lab9": lab9}
QUESTIONS = {
    "lab1": "QLoRA vs LoRA vs full fine-tuning on the same task and budget: held-out score, memory, time",
    "lab2": "Rank ablation r in {8, 16, 32, 64, 128}: score, trainable parameters, memory, time",
    "lab3": "Target modules q,v vs q,k,v,o vs all seven projections at equal trainable budgets",
    "lab7": "Training dynamics: loss curves, and the singular values of full fine-tuning's dW vs LoRA's BA",
    "lab9": "Sweeps on a budget: trials per 24 GB GPU for 7B, and an lr x rank sweep on the course model",
}


#: Fields a lab adds to a trial's record after :func:`run_trial` (comparisons within that lab): not carried over when
#: another lab reuses the record.
_LAB_FIELDS = ("is_full_reference", "relative_to_full", "score_minus_full", "score_minus_best",
               "predicted_trainable_params", "target_set", "score_minus_all_seven", "reused_from")


def reuse_results_files(ctx: Context, out: Path, smoke: bool, budget: Budget) -> int:
    """Offer the trials recorded in the results files already in ``out`` (same model, smoke flag and budget) to
    :func:`run_trial`, so that a lab run on its own reuses a run another lab already made (lab 2's r = 16 is lab 1's
    QLoRA run, lab 9's lr = 1e-3 column is lab 2's r = 8 and 64) instead of training it again: the same trial and
    budget give the same run. Trials trained in this process come first; lab 7's file (copies of lab 1's records)
    and records that are themselves reused are skipped. Returns how many records were offered."""
    offered = 0
    for lab, name in FILES.items():
        path = out / name
        if lab in ("lab7", ctx.current_lab) or not path.is_file():
            continue
        res = json.loads(path.read_text())
        if res.get("smoke") is not smoke or res.get("budget") != asdict(budget) or res.get("model") != ctx.model_name:
            continue
        for t in res.get("trials", []):
            if "reused_from" in t:
                continue
            trial = Trial("", t["method"], t["lr"], r=t["r"] or Trial.r, alpha=t["alpha"] or Trial.alpha,
                          targets=tuple(t["targets"] or LLAMA_TARGETS))
            record = {k: v for k, v in t.items() if k not in _LAB_FIELDS}
            for memory in {"memory" in t, False}:
                key = (trial, budget, "score" in t, memory)
                if key not in ctx.trials:
                    ctx.trials[key] = (lab, record)
                    offered += 1
    return offered


def run_lab(lab: str, *, smoke: bool | None = None, out: str | Path = RESULTS, model: str | None = None,
            progress: bool = True, ctx: Context | None = None) -> Path:
    """Run ``lab`` and write its results file into ``out``; returns the file's path."""
    if lab not in LAB_FUNCTIONS:
        raise ValueError(f"lab must be one of {', '.join(LABS)}, got {lab!r}")
    smoke = settings.smoke_mode() if smoke is None else smoke
    ctx = Context.create(model, progress) if ctx is None else ctx
    budget = budget_for(lab, smoke)
    ctx.current_lab = lab
    reuse_results_files(ctx, Path(out), smoke, budget)
    load = os.getloadavg()
    began, cpu_began = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers.*")
        body = LAB_FUNCTIONS[lab](ctx, budget, smoke)
    results = {"lab": lab, "question": QUESTIONS[lab], "smoke": smoke, "model": ctx.model_name,
               "device": ctx.compute.device.type, "dtype": str(ctx.compute.dtype).removeprefix("torch."),
               "budget": asdict(budget), **body,
               "wall_seconds": round(time.perf_counter() - began, 1),
               "cpu_seconds": round(time.process_time() - cpu_began, 1),
               "load_average_start": [round(x, 2) for x in load],
               "load_average_end": [round(x, 2) for x in os.getloadavg()],
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "versions": _versions(),
               "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "command": f"python qlora_edu/ch09_labs/labs_a.py {lab}" + (" --smoke" if smoke else "")}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FILES[lab]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", choices=(*LABS, "all"))
    parser.add_argument("--smoke", action="store_true", default=None, help="a few steps (CI); also QLORA_EDU_SMOKE=1")
    parser.add_argument("--out", default=str(RESULTS), help=f"folder of the results files (default {RESULTS})")
    parser.add_argument("--model", default=None, help="a Llama-style folder or hub id instead of the bundled model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "qlora_edu_labs_a"),
                        help="folder keeping finished trials, so an interrupted run resumes (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="keep finished trials in memory only")
    args = parser.parse_args(argv)
    ctx = Context.create(args.model, not args.no_progress, log=lambda line: print(line, flush=True),
                         cache_dir=None if args.no_cache else args.cache)
    for lab in LABS if args.lab == "all" else (args.lab,):
        path = run_lab(lab, smoke=args.smoke, out=args.out, ctx=ctx)
        summary = json.loads(path.read_text())
        print(f"{lab}: wrote {path} in {summary['wall_seconds']:.0f} s wall, {summary['cpu_seconds']:.0f} s CPU",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
