"""One fine-tune as a trial: what labs 1, 2, 3, 7 and 9 each run several of.

Every trial trains on chapter 8's task (:mod:`qlora_edu.ch08_finetune.instruct_data`: order messages -> one JSON
object, scored exactly on held-out orders whose names and cities never occur in training) with chapter 8's loop
(:func:`qlora_edu.ch08_finetune.finetune.train`: the same seeded batches for every trial, warm-up, clipping at 0.3,
loss on the responses only) and the same optimizer for every method (torch's AdamW), so that the method is the only
change. The three set-ups (:func:`build_model`):

* ``full``: every weight of the float32 model trained;
* ``lora``: peft's LoRA on the base in the compute dtype (bf16 on this CPU: the "16-bit base" of the seed notes),
  the base frozen, the adapters in float32 (peft's default);
* ``qlora``: chapter 8's recipe (:func:`qlora_edu.ch08_finetune.finetune.load_qlora_model`): NF4 + double
  quantization, bf16 compute, ``prepare_model_for_kbit_training``, peft's LoRA.

All three use gradient checkpointing (reentrant, as peft sets it up), so their activations are measured alike.
Measured for each trial (:func:`run_trial`): the exact held-out score and the held-out loss on the responses
(chapter 8's :func:`~qlora_edu.ch08_finetune.finetune.evaluate` and :func:`~qlora_edu.ch08_finetune.finetune.
heldout_loss`: smoother than the exact score when scores saturate), the bytes of the real tensors and of the
activations autograd saves for backward (:func:`measure_memory`), wall and CPU seconds.

A trial is a pure function of ``(trial, budget, model)``, so a run two labs share (lab 1's QLoRA run is lab 2's
r = 16; lab 2's r = 8 and 64 are lab 9's lr = 1e-3 column; lab 1's three methods are lab 7's) is trained once and
its record handed to the other, marked ``"reused_from"``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from qlora_edu.ch04_memory.memory_probe import saved_activation_bytes, static_bytes, tensor_bytes
from qlora_edu.ch06_lora.lora import LLAMA_TARGETS
from qlora_edu.ch08_finetune.finetune import FinetuneConfig, evaluate, heldout_loss, load_qlora_model, train
from qlora_edu.ch08_finetune.instruct_data import collate_examples, paired_bootstrap_interval
from qlora_edu.ch09_labs.common import LABS, Budget, Context, read_results, results_path
from qlora_edu.common.progress import progress_bar
from qlora_edu.common.training_setup import load_for_training

#: The budget every trial lab shares, sized to two CPU cores shared by several jobs: 24 steps of 4 orders (96
#: orders, about 11,000 tokens), the first 100 held-out orders scored and their response loss measured. One budget,
#: so that a trial two labs share is the same run.
FULL = Budget(steps=24, batch_size=4, eval_size=100, loss_size=100)
SMOKE = Budget(steps=2, batch_size=2, eval_size=4, loss_size=4, max_new_tokens=8)
METHODS = ("full", "lora", "qlora")
#: The adapters' learning rate: chapter 8's CPU default (``default_config("cpu")``), fixed before any lab ran.
ADAPTER_LR = 1e-3
#: Full fine-tuning's learning rate (a common choice for a model of this size; the machine's budget allowed one).
FULL_LR = 1e-4
#: Held-out orders generated at once (a batch's logits and cache, not the score, depend on it: kept small for memory).
EVAL_BATCH = 25


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
    max_grad_norm: float = 0.3  # the recipe's clipping threshold (lab 10 compares 1.0)
    #: ``lora`` only: train on a base whose linear weights hold ``dequantize(quantize(W))`` in this 4-bit format
    #: (lab 4's :func:`~qlora_edu.ch09_labs.lab4_quant.fake_quantizer`: "nf4", "fp4" or "int4"); None: the base as is.
    base_format: str | None = None

    def config(self, budget: Budget) -> FinetuneConfig:
        """Chapter 8's :class:`FinetuneConfig` for this trial: the recipe's warm-up and clipping, torch's AdamW."""
        return FinetuneConfig(steps=budget.steps, batch_size=budget.batch_size, learning_rate=self.lr,
                              lora_r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                              target_modules=tuple(self.targets), optimizer="adamw", seed=budget.seed,
                              max_new_tokens=budget.max_new_tokens, max_grad_norm=self.max_grad_norm)


def build_model(method: str, config: FinetuneConfig, ctx: Context, base_format: str | None = None) -> nn.Module:
    """The model to train for ``method`` (see the module docstring), on ``ctx``'s device, adapters seeded with
    ``config.seed`` (LoRA and QLoRA start from the same A matrices): QLoRA is chapter 8's
    :func:`~qlora_edu.ch08_finetune.finetune.load_qlora_model`, the others the course's one set-up
    (:func:`qlora_edu.common.training_setup.load_for_training`), with reentrant checkpointing as peft sets it up.
    ``base_format`` (LoRA only): the same set-up on a base fake-quantized in that format (:attr:`Trial.base_format`)."""
    if base_format is not None:
        if method != "lora":
            raise ValueError(f"base_format applies to method 'lora' only, got method {method!r}")
        from qlora_edu.ch09_labs.lab4_quant import fake_quantizer
        from qlora_edu.common.base_model import load_base_model
        from qlora_edu.common.perplexity import replace_linear_weights
        from qlora_edu.common.training_setup import setup_training

        model, _ = load_base_model(ctx.model_path, dtype=ctx.compute.dtype, progress=False,
                                   device=ctx.compute.device if ctx.compute.device.type == "cuda" else None)
        replace_linear_weights(model, fake_quantizer(base_format), progress=False)
        model = setup_training(model, "lora", compute_dtype=ctx.compute.dtype, r=config.lora_r,
                               alpha=config.lora_alpha, dropout=config.lora_dropout, targets=config.target_modules,
                               seed=config.seed)
    elif method == "qlora":
        model, _ = load_qlora_model(ctx.model_path, config=config, compute=ctx.compute, progress=False)
    else:
        model, _ = load_for_training(
            method, ctx.model_path, device=ctx.compute.device if ctx.compute.device.type == "cuda" else None,
            dtype=torch.float32 if method == "full" else ctx.compute.dtype, progress=False, r=config.lora_r,
            alpha=config.lora_alpha, dropout=config.lora_dropout, targets=config.target_modules, seed=config.seed)
    model.config.use_cache = False  # training; generate() asks for the cache itself
    return model


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared storages once)."""
    seen = {p.data_ptr(): p.numel() for p in model.parameters() if p.requires_grad}
    return sum(seen.values())


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn (reentrant) gradient checkpointing on or off in a model or the base model under a peft model."""
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
    :func:`~qlora_edu.ch04_memory.memory_probe.static_bytes` now (the states exist after training); ``gradients``:
    the ``.grad`` tensors after one real backward on ``batch`` (freed again); ``saved_activations`` (checkpointing
    on, as trained) and ``saved_activations_no_ckpt``: :func:`~qlora_edu.ch04_memory.memory_probe.
    saved_activation_bytes` on ``batch``; ``total`` = the four static parts + the saved activations with
    checkpointing: a lower bound of a step's peak (the backward's temporaries and the recomputed layer come on top;
    chapter 4 predicts those).
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
        set_checkpointing(model, False)
        saved_no_ckpt = saved_activation_bytes(model, batch)
        set_checkpointing(model, True)
    out = {"frozen_weights": static["frozen_weights"], "trainable_weights": static["trainable_weights"],
           "gradients": gradients, "optimizer_states": static["optimizer_states"], "saved_activations": saved,
           "saved_activations_no_ckpt": saved_no_ckpt}
    out["total"] = sum(out[k] for k in ("frozen_weights", "trainable_weights", "gradients", "optimizer_states",
                                        "saved_activations"))
    return out


# ----------------------------------------------------------------------------------------------
# The weight updates lab 7 studies

_LINEAR_NAME = re.compile(r"layers\.(\d+)\..*?(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


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


# ----------------------------------------------------------------------------------------------
# Running a trial, once


def _trial_id(trial: Trial, budget: Budget, ctx: Context) -> str:
    """A file name for a trial's run: a hash of everything that determines it (the trial without its display name,
    the budget, the model)."""
    fields = asdict(replace(trial, name=""))
    if fields["base_format"] is None:  # trials from before the field existed keep their names
        del fields["base_format"]
    text = json.dumps([fields, asdict(budget), ctx.model_name], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_trial(trial: Trial, budget: Budget, ctx: Context, *, score: bool = True, memory: bool = True,
              keep_update: bool = False) -> dict:
    """Build, train, measure and score one trial; returns a JSON-able record.

    A trial is a pure function of ``(trial, budget, model)`` (seeded adapters, batches and dropout), so its record
    is kept (in ``ctx.trials``, and as a file in ``ctx.cache_dir`` when set) and handed back, marked
    ``"reused_from": lab``, to any later request for the same run: within one process, across the labs (the results
    files already in ``ctx.out`` too: :func:`offer_recorded_trials`), and across processes (a run that was
    interrupted resumes after its last finished trial).

    Args:
        trial, budget, ctx: what to train, how long, on what.
        score: generate and score ``budget.eval_size`` held-out orders (skipped when it is 0).
        memory: measure the tensors' bytes (:func:`measure_memory`).
        keep_update: keep the weight update in ``ctx.updates[(method, budget)]`` for lab 7 (full fine-tuning:
            ``W_after - W_before`` of the seven projections; LoRA: its factors), and in the cache folder.
    """
    offer_recorded_trials(ctx, budget)
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
    model = build_model(trial.method, config, ctx, trial.base_format)
    before = projection_weights(model) if keep_update and trial.method == "full" else None
    n_trainable = trainable_parameters(model)
    train_cpu = time.process_time()
    result = train(model, ctx.tokenizer, ctx.train_set, config, progress=ctx.progress)
    train_cpu = time.process_time() - train_cpu
    record: dict[str, object] = {
        "name": trial.name, "method": trial.method, "lr": trial.lr,
        "r": None if trial.method == "full" else trial.r, "alpha": None if trial.method == "full" else trial.alpha,
        "targets": None if trial.method == "full" else list(trial.targets), "max_grad_norm": trial.max_grad_norm,
        "seed": budget.seed, "trainable_params": n_trainable,
        **({} if trial.base_format is None else {"base_format": trial.base_format}),
        "losses": [round(x, 5) for x in result.losses], "grad_norms": [round(x, 4) for x in result.grad_norms],
        "train_seconds": round(result.seconds, 2), "seconds_per_step": round(result.seconds_per_step, 3),
        "train_cpu_seconds": round(train_cpu, 2), "tokens": int(sum(result.tokens)),
        "final_train_loss": round(tail_mean(result.losses), 5),
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
        if ctx.heldout_templates:  # sentences, items and remarks unseen in training (lab 10 reads it)
            record["heldout_templates_loss"] = round(
                heldout_loss(model, ctx.tokenizer, ctx.heldout_templates[:budget.loss_size]), 5)
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
    ctx.say(f"{trial.name}: " + ", ".join(f"{k} {record[k]}" for k in (
        "final_train_loss", "heldout_loss", "score", "train_cpu_seconds", "measure_cpu_seconds", "eval_cpu_seconds",
        "cpu_seconds", "wall_seconds") if k in record))
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


#: Fields a lab adds to a trial's record after :func:`run_trial` (comparisons within that lab): not carried over when
#: another lab reuses the record.
LAB_FIELDS = ("is_full_reference", "relative_to_full", "score_minus_full", "score_minus_best",
              "predicted_trainable_params", "target_set", "score_minus_all_seven", "reused_from")


def offer_recorded_trials(ctx: Context, budget: Budget) -> int:
    """Offer the trials recorded in the results files already in ``ctx.out`` (same model, mode and budget) to
    :func:`run_trial`, once per lab run, so that a lab run on its own reuses a run another lab already made instead
    of training it again. Trials trained in this process come first; lab 7's file (copies of lab 1's records) and
    records that are themselves reused are skipped. Returns how many records were offered."""
    if (ctx.current_lab, ctx.out, budget) in ctx.offered:
        return 0
    ctx.offered.add((ctx.current_lab, ctx.out, budget))
    offered = 0
    for lab in LABS:
        path = results_path(lab, ctx.out)
        if lab in ("lab7", ctx.current_lab) or not path.is_file():
            continue
        res = read_results(path)
        header = res["header"]
        if (header["mode"] == "smoke") is not ctx.smoke or header["budget"] != asdict(budget) or \
                header["model"] != ctx.model_name:
            continue
        for t in res.get("trials", []):
            if "reused_from" in t:
                continue
            trial = Trial("", t["method"], t["lr"], r=t["r"] or Trial.r, alpha=t["alpha"] or Trial.alpha,
                          targets=tuple(t["targets"] or LLAMA_TARGETS),
                          max_grad_norm=t.get("max_grad_norm", Trial.max_grad_norm),
                          base_format=t.get("base_format"))
            record = {k: v for k, v in t.items() if k not in LAB_FIELDS}
            for memory in {"memory" in t, False}:
                key = (trial, budget, "score" in t, memory)
                if key not in ctx.trials:
                    ctx.trials[key] = (lab, record)
                    offered += 1
    return offered


def _return_freed_memory() -> None:
    """Hand memory that Python and torch freed back to the operating system (glibc keeps it otherwise), so that a
    long run on a shared machine holds only what it uses. A no-op where glibc's ``malloc_trim`` is missing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tail_mean(values: Sequence[float], k: int = 10) -> float:
    """Mean of the last ``k`` values (all of them when there are fewer): a less noisy final loss."""
    tail = list(values)[-k:]
    return sum(tail) / len(tail)


def score_difference(reference: Sequence[int], other: Sequence[int]) -> list[float]:
    """``[difference, low, high]``: the other trial's score minus the reference's, with its 95% paired bootstrap
    interval (:func:`qlora_edu.ch08_finetune.instruct_data.paired_bootstrap_interval`, same held-out orders)."""
    gain, low, high = paired_bootstrap_interval([bool(c) for c in reference], [bool(c) for c in other])
    return [round(gain, 4), round(low, 4), round(high, 4)]


def model_config(ctx: Context):
    """The ``transformers`` config of ``ctx``'s model (its shapes), without loading its weights."""
    from transformers import AutoConfig

    from qlora_edu.common import settings
    from qlora_edu.common.base_model import prepare_cache

    source = ctx.model_path or settings.model_override() or prepare_cache(progress=False)
    return AutoConfig.from_pretrained(str(source))


def trials_bar(items, desc: str, ctx: Context):
    """A progress bar over a lab's trials."""
    return progress_bar(items, desc=desc, unit="trials", enabled=ctx.progress)
