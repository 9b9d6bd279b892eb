"""Lab 1: QLoRA vs LoRA vs full fine-tuning on the same task, batches and steps.

Note 004 puts quality relative to full fine-tuning at "LoRA (16-bit base) ~97%, QLoRA (4-bit base) ~95%"; note 001
asks for "accuracy vs VRAM". Three trials (:mod:`.trials`): full fine-tuning at each of :data:`FULL_LRS` (its
reference run is the one with the lower mean training loss over the last 10 steps: the held-out set plays no part
in the choice); LoRA and QLoRA at r = 16, alpha = 16, all seven projections, lr 1e-3 (chapter 8's CPU defaults).
Relative quality = score / the full reference's score, set beside the seed notes' 97% / 95%.
"""

from __future__ import annotations

from dataclasses import replace

from qlora_edu.ch09_labs import trials
from qlora_edu.ch09_labs.common import Budget, Context, diff_text, score_text
from qlora_edu.ch09_labs.lab7_dynamics import TRIALS as LAB7_TRIALS
from qlora_edu.ch09_labs.trials import ADAPTER_LR, Trial, run_trial, score_difference, trials_bar

QUESTION = "QLoRA vs LoRA vs full fine-tuning on the same task and budget: held-out score, memory, time"
FULL, SMOKE = trials.FULL, trials.SMOKE  # the budget every trial lab shares: a run two labs share is one run
#: Full fine-tuning's learning rates (1e-4: a common choice for a model of this size; the machine's budget allowed
#: one). With several, the reference is the one with the lower training loss over the last steps.
FULL_LRS = (1e-4,)
#: The seed notes' quality figures (note 004: "Full fine-tuning 100%, LoRA ~97%, QLoRA ~95%").
SEED_NOTE_RELATIVE = {"full": 1.00, "lora": 0.97, "qlora": 0.95}


def run(ctx: Context, budget: Budget) -> dict:
    full_lrs = FULL_LRS[-1:] if ctx.smoke else FULL_LRS
    # the adapters first: they need the least memory, full fine-tuning the most (a shared machine frees up later)
    planned = [Trial("lora", "lora", ADAPTER_LR), Trial("qlora", "qlora", ADAPTER_LR)]
    planned += [Trial(f"full (lr {lr:g})", "full", lr) for lr in full_lrs]
    lab7_runs = {replace(t, name="") for t in LAB7_TRIALS}  # keep their weight updates: lab 7 studies them
    records = [run_trial(t, budget, ctx, keep_update=replace(t, name="") in lab7_runs)
               for t in trials_bar(planned, "lab 1 trials", ctx)]
    fulls = [r for r in records if r["method"] == "full"]
    reference = min(fulls, key=lambda r: r["final_train_loss"])
    for r in records:
        r["is_full_reference"] = r is reference
        if "score" in r:
            r["relative_to_full"] = round(r["score"] / reference["score"], 4) if reference["score"] else None
            r["score_minus_full"] = score_difference(reference["correct"], r["correct"])
    by = {r["method"]: r for r in records if r["method"] != "full"}
    summary = {"full_reference": reference["name"], "seed_note_relative": SEED_NOTE_RELATIVE}
    if "score" in by["qlora"]:
        summary["qlora_minus_lora"] = score_difference(by["lora"]["correct"], by["qlora"]["correct"])
    return {"trials": records, "summary": summary}


def verdicts(res: dict) -> list[str]:
    """Lab 1's findings from its results file (one seed: lab 10 has the spread over seeds)."""
    by = {t["method"]: t for t in res["trials"] if t["method"] != "full" or t.get("is_full_reference")}
    mib = {m: by[m]["memory"]["total"] / 2**20 for m in ("full", "lora", "qlora")}
    n = len(by["full"]["correct"])
    return [
        f"memory (the step's tensors + saved activations): full {mib['full']:,.0f} MiB, LoRA {mib['lora']:,.0f} MiB, "
        f"QLoRA {mib['qlora']:,.0f} MiB: QLoRA needs {mib['qlora'] / mib['full']:.0%} of full fine-tuning's memory "
        f"and {mib['qlora'] / mib['lora']:.0%} of LoRA's",
        f"held-out loss (one seed): full {by['full']['heldout_loss']:.4f}, LoRA {by['lora']['heldout_loss']:.4f}, "
        f"QLoRA {by['qlora']['heldout_loss']:.4f}",
        f"exact score (one seed, {n} orders): full {score_text(by['full']['correct'])}, LoRA "
        f"{score_text(by['lora']['correct'])}, QLoRA {score_text(by['qlora']['correct'])}; QLoRA - LoRA "
        f"{diff_text(res['summary'].get('qlora_minus_lora'))} (95% paired bootstrap over the {n} test orders: how "
        "much the test set moves this difference between these two trained models, not how much a re-run would)",
    ]
