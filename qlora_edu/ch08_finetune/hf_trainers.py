"""Chapter 8, the practitioner's path: the same fine-tune through transformers' ``Trainer`` and TRL's ``SFTTrainer``.

Chapter 8 trains with a plain loop (:func:`~qlora_edu.ch08_finetune.finetune.train`) so that every step is visible.
The paper's code (``artidoro/qlora``, ``qlora.py``) trains with ``transformers.Trainer``, and what a learner meets
the day after the course is ``Trainer`` or TRL's ``SFTTrainer``. This module runs the *same* task, data, split,
model set-up (:func:`~qlora_edu.ch08_finetune.finetune.load_qlora_model`: NF4 + double quantization,
``prepare_model_for_kbit_training``, LoRA on all seven projections, adapters seeded by ``config.seed``) and budget
(:func:`~qlora_edu.ch08_finetune.finetune.default_config`) through three trainers:

* ``course``: chapter 8's loop, unchanged.
* ``hf``: ``transformers.Trainer`` with ``TrainingArguments`` as ``artidoro/qlora`` sets them, and the loss on the
  responses only through the course's own collator (:class:`ResponseOnlyCollator`, which calls
  :func:`~qlora_edu.ch08_finetune.instruct_data.collate_examples` and so
  :func:`~qlora_edu.ch08_finetune.instruct_data.mask_prompt_labels`).
* ``trl``: TRL's ``SFTTrainer`` on a *conversational prompt-completion* data set (the prompt is the system and user
  messages, the completion the assistant's JSON), so TRL renders the model's chat template itself and computes its
  own completion-only loss (``completion_only_loss=True``). TRL's other mode, ``assistant_only_loss=True``, needs a
  chat template with ``{% generation %}`` markers; SmolLM2's has none, and TRL 1.16's tokenization then raises
  "at least one example has no assistant tokens" (its ``sft_trainer.py``): the prompt-completion form is the one
  that works with any template.

**The paper's arguments, checked against the code** (``artidoro/qlora``: ``qlora.py``'s ``TrainingArguments``
defaults and ``scripts/finetune_guanaco_7b.sh``), and the spelling transformers 5 wants:

======================================  ==========================================  ====================================
Argument (value)                        What it does                                Where the course built it
======================================  ==========================================  ====================================
``optim="paged_adamw_32bit"``           bitsandbytes' ``PagedAdamW32bit``: AdamW,   ch05 (paged optimizers);
                                        32-bit states in CUDA unified memory        ``training_setup.make_optimizer``
                                        (unpaged on a CPU)                          ``("paged_adamw")``, ch08
                                                                                    ``build_optimizer``
``learning_rate`` (2e-4; CPU 1e-3)      peak step size                              ch08 ``FinetuneConfig``,
                                                                                    ``default_config``
``lr_scheduler_type="constant"``        ``get_constant_schedule``: factor 1 every   ch08 ``learning_rate_at`` (which
                                        step; **ignores any warm-up**               warms up: see below)
``warmup_steps=0.03`` (was              fraction of steps for a linear warm-up,     ch08 ``learning_rate_at``
``warmup_ratio``)                       used by every schedule *except* "constant"
``max_grad_norm=0.3``                   clip the gradients' global norm             ch08 ``train``
                                                                                    (``clip_grad_norm_``)
``per_device_train_batch_size`` x       micro-batch x micro-batches summed before   ch04 (activations scale with the
``gradient_accumulation_steps``         one optimizer step (paper: 1 x 16 or        micro-batch); ch08 ``batch_size``
                                        4 x 4; here ``batch_size / 4`` x 4 or so)
``train_sampling_strategy=``            ``LengthGroupedSampler``: batches of        ch08 ``batch_indices`` (a seeded
``"group_by_length"`` (was              similar lengths, less padding               permutation, no grouping)
``group_by_length=True``)
``bf16`` / ``fp16``                     autocast the forward in the compute dtype   ch01 / ch08 ``pick_compute``;
                                                                                    ch07 (bf16 compute of NF4)
``activation_checkpointing=True``       recompute each layer in the backward        ch04 (activation memory);
(was ``gradient_checkpointing``),       (torch's reentrant kind, as the course)     ``training_setup.setup_training``
``activation_checkpointing_kwargs=``
``{"use_reentrant": True}``
``weight_decay=0.0``, ``adam_beta2``    AdamW's decay and second-moment rate        ch05 (AdamW); ch08
``=0.999``, ``adam_epsilon=1e-8``                                                   ``build_optimizer``
``remove_unused_columns=False``         keep the data set's own fields for the      (the paper: "needed to make this
                                        collator                                    codebase work")
``max_steps``, ``seed``, ``data_seed``  budget; seeds of dropout / sampler          ch08 ``FinetuneConfig.steps``,
                                                                                    ``.seed``
``data_collator=ResponseOnlyCollator``  pad right, ``-100`` on prompt and padding   ch08 ``collate_examples``,
                                                                                    ``mask_prompt_labels``
``logging_steps=1``, ``save_strategy=   log every step, save nothing (the command   ch08 ``TrainResult``,
"no"``, ``report_to="none"``            saves the adapter itself)                   ``save_adapter``
``use_cpu``                             train on the CPU even if a GPU exists       ch01 ``pick_compute``
SFTConfig ``completion_only_loss=True`` labels ``-100`` outside the completion      ch08 ``mask_prompt_labels``
SFTConfig ``assistant_only_loss=False`` (needs ``{% generation %}`` in the          ch08 ``encode_example`` (finds the
                                        template; SmolLM2's has none)               reply by the template's prefix)
SFTConfig ``packing=False``,            one example a row, no packing or            ch08 ``collate_examples``
``padding_free=False``                  flattening
SFTConfig ``max_length`` (1024)         truncate longer sequences (ours: ~110       (the course never truncates)
                                        tokens)
``processing_class=tokenizer``          the tokenizer and its chat template         ch08 ``build_messages``,
                                                                                    ``encode_example``
======================================  ==========================================  ====================================

**What the libraries do differently** (each is measured in the results file, not assumed):

* **Warm-up.** ``artidoro/qlora`` sets ``warmup_ratio=0.03`` *and* ``lr_scheduler_type="constant"``; transformers'
  ``get_scheduler`` returns ``get_constant_schedule(optimizer)`` for "constant" *before* it reads the warm-up, so the
  paper's runs had no warm-up at all (``constant_with_warmup`` is the schedule that would have used it). The course's
  :func:`~qlora_edu.ch08_finetune.finetune.learning_rate_at` warms up over ``ceil(0.03 * steps)`` steps, so its first
  step has learning rate 0. The per-step learning rates each trainer used are recorded (``learning_rates``).
* **Sampler order.** The course draws batch ``k`` from a seeded permutation (:func:`batch_indices`); ``Trainer``
  with ``group_by_length`` shuffles, cuts "megabatches" of 50 optimizer batches, sorts each by length (longest
  first) and puts the longest batch of all first. Same data, different order.
* **Padding.** All three pad on the right to the longest row of the (micro-)batch; ``Trainer`` and TRL pad each
  micro-batch separately, and length grouping makes the rows of a micro-batch similar, so they pad less.
* **The completion.** The course's response is the JSON and ``<|im_end|>``; TRL's completion is everything the
  template renders after the prompt, which for SmolLM2 also includes the newline after ``<|im_end|>``: one more
  trained token per example.
* **Loss normalisation.** All three average the cross-entropy over the *tokens* of an optimizer step, not over
  sequences: the course over its one batch; ``Trainer`` and TRL pass ``num_items_in_batch`` (the response tokens of
  all the accumulated micro-batches) to the model, which divides each micro-batch's *summed* loss by it, so the
  accumulated gradient equals one big batch's. (Before transformers 4.46 each micro-batch was averaged on its own
  and the averages averaged: per micro-batch, not per token.)
* **When the scheduler steps.** The course sets the learning rate *before* each optimizer step; ``Trainer`` calls
  ``lr_scheduler.step()`` *after* it (the learning rate of step ``k`` is the schedule's value at ``k``): the same
  values, one call later.
* **Dropout's random numbers.** The course runs on a fork of torch's generator seeded with ``config.seed``;
  ``Trainer`` calls ``set_seed(args.seed)`` (Python, NumPy, torch) at construction. Different draws, same seed.
* **bf16.** The course loads the model in the compute dtype and runs without autocast; ``Trainer``'s ``bf16=True``
  also autocasts the adapters' float32 matmuls to bf16.

``python -m qlora_edu.ch08_finetune.hf_trainers --trainer {course,hf,trl} [--smoke] [--steps N] ...`` runs one of
them with chapter 8's defaults (:func:`main`); its last line is one JSON object: the loss curve, held-out
exact-match before and after with the paired bootstrap interval, time per step, tokens/s and peak memory.
``--side-by-side`` runs each trainer in its own process (:func:`side_by_side`), so that peak memory is per trainer,
and writes ``notebooks/results/08_trainers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from qlora_edu.ch08_finetune.finetune import (
    FinetuneConfig,
    default_config,
    evaluate,
    heldout_loss,
    load_qlora_model,
    train,
)
from qlora_edu.ch08_finetune.instruct_data import (
    INSTRUCTION,
    Example,
    collate_examples,
    encode_example,
    load_dataset,
    paired_bootstrap_interval,
    sign_test_p_value,
)
from qlora_edu.common import settings

__all__ = [
    "TRAINERS",
    "ResponseOnlyCollator",
    "StepRecord",
    "default_accumulation",
    "paper_trainer_arguments",
    "run_trainer",
    "side_by_side",
    "train_with_hf_trainer",
    "train_with_sft_trainer",
]

TRAINERS = ("course", "hf", "trl")
ROOT = Path(__file__).resolve().parents[2]
RESULTS_FILE = ROOT / "notebooks" / "results" / "08_trainers.json"
BUNDLED = "SmolLM2-135M-Instruct (bundled)"


def default_accumulation(batch_size: int) -> int:
    """Micro-batches an optimizer step accumulates: micro-batches of 4 where ``batch_size`` is a larger multiple of
    4 (the paper's 7B script: 4 x 4 = 16; the CPU default: 4 x 2 = 8), else 1 (the whole batch at once)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size // 4 if batch_size > 4 and batch_size % 4 == 0 else 1


def paper_trainer_arguments(config: FinetuneConfig, *, output_dir: str | Path, compute, accumulation: int,
                            progress: bool = False) -> dict:
    """The keyword arguments of ``TrainingArguments`` (and of TRL's ``SFTConfig``, a subclass) that give chapter 8's
    ``config`` the way ``artidoro/qlora`` sets them, in transformers 5's spelling (see the module's table).

    Args:
        config: the fine-tune (steps, batch, learning rate, clipping, seed, ...).
        output_dir: the trainer's scratch folder (nothing is saved into it: ``save_strategy="no"``).
        compute: a :class:`qlora_edu.common.device.Compute`: the device, and bf16 / fp16 autocast by its dtype.
        accumulation: micro-batches an optimizer step accumulates; must divide ``config.batch_size``.
        progress: the trainer's progress bar.

    Returns:
        a dict of keyword arguments.
    """
    if not isinstance(accumulation, int) or isinstance(accumulation, bool) or accumulation < 1:
        raise ValueError(f"accumulation must be a positive int, got {accumulation!r}")
    if config.batch_size % accumulation:
        raise ValueError(f"accumulation ({accumulation}) must divide config.batch_size ({config.batch_size}): "
                         "micro-batch x accumulation is the batch of one optimizer step")
    if config.optimizer not in ("paged_adamw", "paged_adamw8bit", "adamw"):
        raise ValueError(f"config.optimizer {config.optimizer!r} has no Trainer spelling here")
    optim = {"paged_adamw": "paged_adamw_32bit", "paged_adamw8bit": "paged_adamw_8bit", "adamw": "adamw_torch"}
    return dict(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",  # the paper's; ignores the warm-up below (transformers' get_scheduler)
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio in transformers 5 (warmup_ratio before)
        max_grad_norm=config.max_grad_norm,
        optim=optim[config.optimizer],
        weight_decay=config.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        train_sampling_strategy="group_by_length",  # group_by_length=True before transformers 5
        bf16=compute.dtype == torch.bfloat16,
        fp16=compute.dtype == torch.float16,
        activation_checkpointing=config.gradient_checkpointing,  # gradient_checkpointing before transformers 5
        activation_checkpointing_kwargs={"use_reentrant": True},  # as the course's setup_training
        remove_unused_columns=False,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=compute.device.type != "cuda",
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )


# ----------------------------------------------------------------------------------------------
# The data for Trainer: the course's examples and the course's collator


class _EncodedExamples(torch.utils.data.Dataset):
    """Item ``i``: ``{"input_ids": the tokens of example i, "index": i}``. ``input_ids`` is only read by
    ``LengthGroupedSampler`` for the lengths; the collator rebuilds the batch from the examples."""

    def __init__(self, tokenizer, examples: Sequence[Example]):
        self.items = [{"input_ids": encode_example(tokenizer, e)[0], "index": i} for i, e in enumerate(examples)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class ResponseOnlyCollator:
    """``Trainer``'s ``data_collator``: the course's own batch (:func:`collate_examples`: right padding, labels from
    :func:`mask_prompt_labels` with ``-100`` on the prompt and the padding) for the examples of the features.

    Returns ``{"input_ids", "attention_mask", "labels"}``, each ``(B, T)`` int64 (``prompt_lengths`` dropped: the
    model's forward does not take it). Counts the real tokens of each micro-batch in ``tokens``.
    """

    def __init__(self, tokenizer, examples: Sequence[Example]):
        self.tokenizer, self.examples, self.tokens = tokenizer, list(examples), []

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_examples(self.tokenizer, [self.examples[f["index"]] for f in features])
        batch.pop("prompt_lengths")
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


class _CountingCollator:
    """Wraps TRL's collator to count the real tokens of each micro-batch, as :class:`ResponseOnlyCollator` does."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def _prompt_completion(example: Example) -> dict:
    """TRL's conversational prompt-completion row: the same messages as
    :func:`~qlora_edu.ch08_finetune.instruct_data.build_messages`, split where the assistant starts."""
    return {"prompt": [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": example.message}],
            "completion": [{"role": "assistant", "content": example.response}]}


# ----------------------------------------------------------------------------------------------
# Recording each optimizer step


@dataclass
class StepRecord:
    """What one training run measured, per optimizer step (the same fields for the three trainers).

    Attributes:
        losses: training loss (mean over the step's response tokens).
        learning_rates: the learning rate the optimizer step used.
        grad_norms: the gradients' global norm before clipping.
        step_seconds: wall seconds of each step, data collation included.
        tokens: real tokens (prompt + response, no padding) of each step.
        peak_memory_bytes: ``torch.cuda.max_memory_allocated`` during training on a GPU; None on a CPU.
    """

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    peak_memory_bytes: int | None = None

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def seconds_per_step(self) -> float:
        """Median step time (the first step, which warms caches up, does not dominate)."""
        times = sorted(self.step_seconds)
        return times[len(times) // 2] if times else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens) / self.seconds if self.seconds > 0 else float("nan")


def _recorder(record: StepRecord, collator, accumulation: int):
    """A ``TrainerCallback`` filling ``record``: loss and grad norm from the logs (``logging_steps=1``), the learning
    rate the optimizer holds just before its step, the wall time between step ends, the tokens the collator saw."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            record.learning_rates.append(float(optimizer.param_groups[0]["lr"]))

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            record.step_seconds.append(now - self.last)
            self.last = now
            done = len(record.step_seconds)
            record.tokens.append(sum(collator.tokens[(done - 1) * accumulation:done * accumulation]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record.losses.append(float(logs["loss"]))
                record.grad_norms.append(float(logs.get("grad_norm", float("nan"))))

    return Recorder()


def _train_and_record(trainer, record: StepRecord, device: torch.device) -> StepRecord:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers.*")  # on a CPU: the same update, unpaged
        trainer.train()
    record.peak_memory_bytes = torch.cuda.max_memory_allocated(device) if cuda else None
    return record


def train_with_hf_trainer(model, tokenizer, examples: Sequence[Example], config: FinetuneConfig, *, compute,
                          accumulation: int, output_dir: str | Path, progress: bool = False) -> StepRecord:
    """Train ``model``'s adapters with ``transformers.Trainer``, the paper's arguments
    (:func:`paper_trainer_arguments`) and the course's response-only collator (:class:`ResponseOnlyCollator`)."""
    from transformers import Trainer, TrainingArguments

    collator = ResponseOnlyCollator(tokenizer, examples)
    record = StepRecord()
    args = TrainingArguments(**paper_trainer_arguments(config, output_dir=output_dir, compute=compute,
                                                       accumulation=accumulation, progress=progress))
    trainer = Trainer(model=model, args=args, train_dataset=_EncodedExamples(tokenizer, examples),
                      data_collator=collator, processing_class=tokenizer,
                      callbacks=[_recorder(record, collator, accumulation)])
    return _train_and_record(trainer, record, compute.device)


def train_with_sft_trainer(model, tokenizer, examples: Sequence[Example], config: FinetuneConfig, *, compute,
                           accumulation: int, output_dir: str | Path, progress: bool = False) -> StepRecord:
    """Train ``model``'s adapters with TRL's ``SFTTrainer``: the same arguments, TRL's own tokenization (the model's
    chat template on prompt-completion rows) and TRL's completion-only loss."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    record = StepRecord()
    args = SFTConfig(**paper_trainer_arguments(config, output_dir=output_dir, compute=compute,
                                               accumulation=accumulation, progress=progress),
                     completion_only_loss=True, assistant_only_loss=False, packing=False, padding_free=False,
                     max_length=1024)
    dataset = Dataset.from_list([_prompt_completion(e) for e in examples])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.data_collator = collator = _CountingCollator(trainer.data_collator)
    trainer.add_callback(_recorder(record, collator, accumulation))
    return _train_and_record(trainer, record, compute.device)


def _train_with_course(model, tokenizer, examples, config, *, compute, accumulation, output_dir,
                       progress=False) -> StepRecord:
    """Chapter 8's own loop (:func:`~qlora_edu.ch08_finetune.finetune.train`), one batch a step, no accumulation."""
    result = train(model, tokenizer, examples, config, output_dir=None, progress=progress)
    return StepRecord(losses=result.losses, learning_rates=result.learning_rates, grad_norms=result.grad_norms,
                      step_seconds=result.step_seconds, tokens=result.tokens,
                      peak_memory_bytes=result.peak_memory_bytes)


_TRAIN = {"course": _train_with_course, "hf": train_with_hf_trainer, "trl": train_with_sft_trainer}


# ----------------------------------------------------------------------------------------------
# One run: load, evaluate, train, evaluate


def run_trainer(trainer: str, *, model: str | None = None, device: str | None = None, dtype: str | None = None,
                smoke: bool | None = None, accumulation: int | None = None, generate: bool = True,
                progress: bool = False, log: Callable[[str], None] = print, **overrides) -> dict:
    """Load the QLoRA model, score the held-out orders, train with ``trainer``, score again.

    Args:
        trainer: ``"course"``, ``"hf"`` or ``"trl"``.
        model, device, dtype, smoke: as chapter 8's :func:`~qlora_edu.ch08_finetune.finetune.run_finetune`.
        accumulation: micro-batches an optimizer step accumulates for ``hf`` and ``trl`` (default
            :func:`default_accumulation`; the course's loop takes the whole batch at once).
        generate: score the held-out orders by greedy generation and exact match (the slow part on a loaded
            CPU); False measures only the teacher-forced held-out loss, and the exact-match fields are None.
        progress: progress bars.
        log: where the human-readable lines go.
        **overrides: fields of :class:`~qlora_edu.ch08_finetune.finetune.FinetuneConfig`.

    Returns:
        the summary (JSON-able): ``losses``, ``learning_rates``, ``grad_norms``, ``tokens`` (per step), ``before``,
        ``after`` (held-out exact-match), ``gain`` and ``gain_interval_95`` (paired bootstrap), ``p_value`` (sign
        test), ``heldout_loss_before`` / ``_after``, ``seconds_per_step`` (median), ``tokens_per_s``,
        ``peak_memory_bytes`` (GPU) and ``process_max_rss_bytes``, the config and the trainer's batch shape.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    from qlora_edu.common.device import pick_compute

    compute = pick_compute(device, dtype)
    config = default_config(compute.device, smoke, **overrides)
    accumulation = default_accumulation(config.batch_size) if accumulation is None else accumulation
    if trainer == "course":
        accumulation = 1
    log(f"{trainer}: {compute.describe()}")
    log(f"config: {json.dumps(config.to_dict())}; accumulation {accumulation}")
    train_set, heldout = load_dataset("train"), load_dataset("heldout")
    heldout = heldout[:config.eval_size] if config.eval_size is not None else heldout
    qmodel, tokenizer = load_qlora_model(model, config=config, compute=compute, progress=progress)
    score = (lambda: evaluate(qmodel, tokenizer, heldout, max_new_tokens=config.max_new_tokens, progress=progress)
             ) if generate else (lambda: None)
    before, loss_before = score(), heldout_loss(qmodel, tokenizer, heldout)
    log(f"before: {_score_text(before)}, held-out loss {loss_before:.3f}")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="qlora-edu-trainer-") as scratch:
        record = _TRAIN[trainer](qmodel, tokenizer, train_set, config, compute=compute, accumulation=accumulation,
                                 output_dir=scratch, progress=progress)
    log(f"trained {len(record.losses)} steps: {record.seconds_per_step:.2f} s/step, "
        f"{record.tokens_per_second:.0f} tokens/s (load average {load:.1f}); "
        f"loss {record.losses[0]:.3f} -> {record.losses[-1]:.3f}")
    after, loss_after = score(), heldout_loss(qmodel, tokenizer, heldout)
    log(f"after: {_score_text(after)}, held-out loss {loss_after:.3f}")
    gain, low, high = paired_bootstrap_interval(before.correct, after.correct) if generate else (None, None, None)
    return {"trainer": trainer, "losses": record.losses, "learning_rates": record.learning_rates,
            "grad_norms": record.grad_norms, "tokens": record.tokens, "before": before and before.score,
            "after": after and after.score, "n_eval": len(heldout), "exact_match_measured": generate, "gain": gain,
            "gain_interval_95": [low, high], "p_value": sign_test_p_value(before.correct, after.correct)
            if generate else None, "heldout_loss_before": loss_before,
            "heldout_loss_after": loss_after, "train_seconds": record.seconds,
            "seconds_per_step": record.seconds_per_step, "tokens_per_s": record.tokens_per_second,
            "peak_memory_bytes": record.peak_memory_bytes,
            "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "load_average": load, "device": compute.device.type,
            "dtype": str(compute.dtype).removeprefix("torch."),
            "model": model or settings.model_override() or BUNDLED, "micro_batch": config.batch_size // accumulation,
            "accumulation": accumulation, "config": config.to_dict()}


def _score_text(result) -> str:
    return "exact match not measured" if result is None else f"{sum(result.correct)}/{result.n} correct"


# ----------------------------------------------------------------------------------------------
# Side by side: every trainer, in its own process, into the results file


def _versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def side_by_side(argv: Sequence[str], *, trainers: Sequence[str] = TRAINERS, seeds: Sequence[int] = (0,),
                 parallel: bool = False, out: str | Path = RESULTS_FILE, log: Callable[[str], None] = print) -> dict:
    """Run ``python -m qlora_edu.ch08_finetune.hf_trainers --trainer T --seed S ARGV`` for each trainer and seed, each
    in a fresh process (peak memory per run), and write ``out``: ``{"header", "runs", "figure"}``.

    ``figure`` is ready to plot: per trainer, the loss curves of its seeds, the mean before / after scores with the
    per-seed intervals, the median seconds a step, tokens/s and peak memory; ``spread`` compares the trainers'
    spread of final score and held-out loss across seeds with the gaps between trainers. ``parallel`` starts
    every run at once (each process one torch thread): on a machine shared with other work the runs then share the
    same load, and finish sooner; their step times are then those of a loaded machine.
    """
    load_start, began, cpu_began = os.getloadavg(), time.perf_counter(), _children_cpu()
    env = settings.child_environment(**({"OMP_NUM_THREADS": "1"} if parallel else {}))
    jobs = [(name, seed) for seed in seeds for name in trainers]
    started = []
    for name, seed in jobs:
        command = [sys.executable, "-m", "qlora_edu.ch08_finetune.hf_trainers", "--trainer", name,
                   "--seed", str(seed), *argv]
        log(f"running: {' '.join(command[1:])}")
        started.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        if not parallel:
            started[-1].wait()
    runs = []
    for (name, seed), process in zip(jobs, started, strict=True):
        stdout, stderr = process.communicate()
        if process.returncode:
            raise RuntimeError(f"{name} (seed {seed}) failed:\n{stderr[-3000:]}")
        runs.append(json.loads(stdout.strip().splitlines()[-1]))
        log(f"  {name} seed {seed}: held-out loss {runs[-1]['heldout_loss_before']:.3f} -> "
            f"{runs[-1]['heldout_loss_after']:.3f}, {runs[-1]['seconds_per_step']:.2f} s/step")
    first = runs[0]
    header = {"section": "08_trainers", "question": "chapter 8's fine-tune through the course's loop, transformers' "
              "Trainer and TRL's SFTTrainer: same task, data, model set-up and budget",
              "mode": "smoke" if first["config"]["steps"] <= 3 else "full", "model": first["model"],
              "device": first["device"], "dtype": first["dtype"],
              "budget": {k: first["config"][k] for k in ("steps", "batch_size", "learning_rate", "lora_r",
                                                           "eval_size", "max_new_tokens")} | {"seeds": list(seeds)},
              "wall_seconds": round(time.perf_counter() - began, 1),
              "cpu_seconds": round(_children_cpu() - cpu_began, 1),
              "load_average_start": [round(x, 2) for x in load_start],
              "load_average_end": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
              "torch_threads": 1 if parallel else torch.get_num_threads(), "parallel": parallel,
              "versions": _versions(), "platform": platform.platform(),
              "command": "python -m qlora_edu.ch08_finetune.hf_trainers --side-by-side "
                         f"--seeds {' '.join(map(str, seeds))}{' --parallel' if parallel else ''} "
                         f"{' '.join(argv)}".strip(),
              "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    results = {"header": header, "runs": runs, "figure": _figure(runs, trainers)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    tmp.replace(out)
    return results


def merge_results(paths: Sequence[str | Path], out: str | Path = RESULTS_FILE) -> dict:
    """One side-by-side results file from runs made in parts (the same budget, other seeds: six CPU runs do not fit
    one sitting), written to ``out``: the runs joined, ``figure`` recomputed from them, the header's seeds joined,
    its wall and CPU seconds summed, and each part's command, date and wall time kept in ``header["parts"]``.

    Raises:
        ValueError: the parts differ in model, device, dtype or budget (seeds aside), or repeat a trainer's seed.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if len(parts) < 2:
        raise ValueError(f"paths: give two or more results files to merge, got {len(parts)}")
    first = parts[0]["header"]
    same = ("model", "device", "dtype", "mode")
    for part in parts[1:]:
        h = part["header"]
        if any(h[k] != first[k] for k in same) or {**h["budget"], "seeds": None} != {**first["budget"], "seeds": None}:
            raise ValueError("paths: the parts must share model, device, dtype, mode and budget (seeds aside); "
                             f"{h['command']!r} differs from {first['command']!r}")
    runs = [r for part in parts for r in part["runs"]]
    keys = [(r["trainer"], r["config"]["seed"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"paths: a trainer's seed appears twice: {sorted(k for k in keys if keys.count(k) > 1)}")
    runs.sort(key=lambda r: (r["config"]["seed"], TRAINERS.index(r["trainer"])))
    header = {**first, "budget": {**first["budget"], "seeds": sorted({r["config"]["seed"] for r in runs})},
              "wall_seconds": round(sum(p["header"]["wall_seconds"] for p in parts), 1),
              "cpu_seconds": round(sum(p["header"]["cpu_seconds"] for p in parts), 1),
              "load_average_end": parts[-1]["header"]["load_average_end"],
              "command": " && ".join(p["header"]["command"] for p in parts),
              "parts": [{k: p["header"][k] for k in ("command", "created_utc", "wall_seconds", "load_average_start",
                                                     "load_average_end")} for p in parts]}
    trainers = [t for t in TRAINERS if any(r["trainer"] == t for r in runs)]
    results = {"header": header, "runs": runs, "figure": _figure(runs, trainers)}
    out = Path(out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    tmp.replace(out)
    return results


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _figure(runs: list[dict], trainers: Sequence[str]) -> dict:
    """Per trainer: the curves and the numbers of the table, across its seeds."""
    def mean(xs):
        return sum(xs) / len(xs)

    figure = {}
    for name in trainers:
        mine = [r for r in runs if r["trainer"] == name]
        figure[name] = {"seeds": [r["config"]["seed"] for r in mine], "losses": [r["losses"] for r in mine],
                        "learning_rates": [r["learning_rates"] for r in mine],
                        "before": [r["before"] for r in mine], "after": [r["after"] for r in mine],
                        "heldout_loss_before": [r["heldout_loss_before"] for r in mine],
                        "gain_interval_95": [r["gain_interval_95"] for r in mine],
                        "heldout_loss_after": [r["heldout_loss_after"] for r in mine],
                        "seconds_per_step": mean([r["seconds_per_step"] for r in mine]),
                        "tokens_per_s": mean([r["tokens_per_s"] for r in mine]),
                        "peak_memory_bytes": [r["peak_memory_bytes"] for r in mine],
                        "process_max_rss_bytes": [r["process_max_rss_bytes"] for r in mine],
                        "micro_batch": mine[0]["micro_batch"], "accumulation": mine[0]["accumulation"]}
    losses = {name: figure[name]["heldout_loss_after"] for name in trainers}
    scored = all(r["exact_match_measured"] for r in runs)
    per_seed = {name: figure[name]["after"] for name in trainers} if scored else {}
    means = [mean(v) for v in per_seed.values()]
    figure["spread"] = {
        "after_within_trainer_max_range": max(max(v) - min(v) for v in per_seed.values()) if scored else None,
        "after_between_trainer_means_range": max(means) - min(means) if scored else None,
        "heldout_loss_within_trainer_max_range": max(max(v) - min(v) for v in losses.values()),
        "heldout_loss_between_trainer_means_range": max(mean(v) for v in losses.values())
        - min(mean(v) for v in losses.values()),
        "n_seeds": len(next(iter(losses.values()))),
    }
    return figure


def side_by_side_verdicts(results: dict) -> list[str]:
    """What a side-by-side results file (:func:`side_by_side`) allows one to say, worded as its data allow: for the
    held-out loss and (when measured) the exact-match score after training, the range of the trainers' means against
    the largest range one trainer shows over its seeds. Between-trainer differences no larger than that are "within
    the run-to-run spread"; with one seed there is no spread to compare with, and the verdict says so."""
    spread, n = results["figure"]["spread"], results["figure"]["spread"]["n_seeds"]
    seeds = f"{n} seed{'s' if n != 1 else ''}"
    out = []
    for what, between, within, fmt in (
            ("held-out loss", spread["heldout_loss_between_trainer_means_range"],
             spread["heldout_loss_within_trainer_max_range"], ".4f"),
            ("exact match after", spread["after_between_trainer_means_range"],
             spread["after_within_trainer_max_range"], ".1%")):
        if between is None:
            out.append(f"{what}: not measured")
        elif n < 2:
            out.append(f"{what}: the trainers' values span {between:{fmt}}; one seed, so no run-to-run spread to "
                       "compare with: no verdict")
        elif between <= within:
            out.append(f"{what}: the trainers' means span {between:{fmt}}, within the largest spread of one trainer "
                       f"over {seeds} ({within:{fmt}}): the trainers agree within the run-to-run spread")
        else:
            out.append(f"{what}: the trainers' means span {between:{fmt}}, more than the largest spread of one "
                       f"trainer over {seeds} ({within:{fmt}}): a difference beyond the run-to-run spread seen "
                       f"here ({seeds} is a small sample of that spread)")
    return out


# ----------------------------------------------------------------------------------------------
# The command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qlora_edu.ch08_finetune.hf_trainers",
                                description="Chapter 8's QLoRA fine-tune with the course's loop, transformers' "
                                            "Trainer or TRL's SFTTrainer, chapter 8's defaults. The last line of "
                                            "output is one JSON object.")
    p.add_argument("--trainer", choices=TRAINERS, default="hf", help="which training loop (default: hf)")
    p.add_argument("--side-by-side", action="store_true",
                   help=f"run every trainer (each in its own process) and write {RESULTS_FILE.relative_to(ROOT)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --side-by-side: the seeds (default 0)")
    p.add_argument("--parallel", action="store_true", help="with --side-by-side: start every run at once")
    p.add_argument("--no-generate", action="store_true",
                   help="skip the exact-match evaluation (greedy generation); measure the held-out loss only")
    p.add_argument("--out", default=str(RESULTS_FILE), help="with --side-by-side or --merge: the results file")
    p.add_argument("--merge", nargs="+", metavar="FILE",
                   help="join side-by-side results files of the same budget (other seeds) into --out")
    p.add_argument("--model", help="hub id or local folder of a Llama-style model (default: the bundled SmolLM2)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="force a device (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="force the compute dtype")
    p.add_argument("--smoke", action="store_true", default=None, help="a few steps on a few examples (CI)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: chapter 8's for the device)")
    p.add_argument("--batch-size", type=int, help="examples an optimizer step (default: 8 CPU, 16 GPU)")
    p.add_argument("--accumulation", type=int, help="hf / trl: micro-batches a step (default: micro-batches of 4)")
    p.add_argument("--lr", type=float, dest="learning_rate", help="peak learning rate (default: 1e-3 CPU, 2e-4 GPU)")
    p.add_argument("--lora-r", type=int, help="adapter rank (default: 16 CPU, 64 GPU)")
    p.add_argument("--eval-size", type=int, help="held-out examples to score (default: all 200)")
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--progress", action="store_true", help="progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """The command line: one trainer (:func:`run_trainer`, the summary printed as the last line), or
    ``--side-by-side`` (:func:`side_by_side`, the results file's ``figure`` printed as the last line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(_parser().parse_args(argv))
    if args["merge"]:
        results = merge_results(args["merge"], out=args["out"])
        print(json.dumps(results["figure"]), flush=True)
        return results
    if args["side_by_side"]:
        passed = _strip(argv, {"--side-by-side": 0, "--seeds": len(args["seeds"]), "--out": 1, "--trainer": 1,
                               "--parallel": 0})
        results = side_by_side(passed, seeds=args["seeds"], parallel=args["parallel"], out=args["out"],
                               log=lambda line: print(line, flush=True))
        print(json.dumps(results["figure"]), flush=True)
        return results
    overrides = {k: args[k] for k in ("steps", "batch_size", "learning_rate", "lora_r", "eval_size", "seed")
                 if args[k] is not None}
    summary = run_trainer(args["trainer"], model=args["model"], device=args["device"], dtype=args["dtype"],
                          smoke=args["smoke"], accumulation=args["accumulation"],
                          generate=not args["no_generate"], progress=args["progress"],
                          log=lambda line: print(line, flush=True), **overrides)
    sys.stdout.flush()
    print(json.dumps(summary), flush=True)
    return summary


def _strip(argv: list[str], options: dict[str, int]) -> list[str]:
    """``argv`` without ``options`` (each followed by that many values): what each child process gets."""
    out, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
        elif token in options:
            skip = options[token]
        else:
            out.append(token)
    return out


if __name__ == "__main__":
    main()
