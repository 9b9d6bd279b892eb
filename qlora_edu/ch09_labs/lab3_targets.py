"""Lab 3: which target modules, at equal trainable budgets?

Note 000 asks "why these specific target modules (q,k,v,o,gate,up,down)?". The QLoRA paper: LoRA on every linear
layer is what matches full fine-tuning; the original LoRA paper adapted q and v only. But "all seven" also trains
more parameters, so the sets are compared at an equal budget: QLoRA on q,v vs q,k,v,o vs all seven projections,
each at the rank whose trainable parameters come closest to those of all seven at r = :data:`BUDGET_RANK`
(:func:`equal_budget_ranks`). alpha = r, so that ``alpha / r = 1`` for every set and the rank is the only knob that
changes between them (with alpha fixed, the set with the highest rank would also get the smallest scale).
"""

from __future__ import annotations

from qlora_edu.ch06_lora.lora import LLAMA_ATTENTION, LLAMA_TARGETS, lora_param_count
from qlora_edu.ch09_labs import trials
from qlora_edu.ch09_labs.common import Budget, Context, score_text
from qlora_edu.ch09_labs.trials import ADAPTER_LR, Trial, model_config, run_trial, score_difference, trials_bar

QUESTION = "Target modules q,v vs q,k,v,o vs all seven projections at equal trainable budgets"
FULL, SMOKE = trials.FULL, trials.SMOKE  # the budget every trial lab shares: a run two labs share is one run
TARGET_SETS = {"q,v": ("q_proj", "v_proj"), "q,k,v,o": LLAMA_ATTENTION, "all seven": LLAMA_TARGETS}
#: The budget of lab 3: the trainable parameters of LoRA on all seven projections at this rank.
BUDGET_RANK = 8


def equal_budget_ranks(model_config, budget_rank: int = BUDGET_RANK) -> dict[str, int]:
    """For each of :data:`TARGET_SETS`, the rank whose trainable parameters come closest to those of all seven
    projections at ``budget_rank`` (``lora_param_count`` is linear in r, so ``r = round(budget / per_rank)``)."""
    budget = lora_param_count(model_config, budget_rank, LLAMA_TARGETS)
    return {name: max(1, round(budget / lora_param_count(model_config, 1, targets)))
            for name, targets in TARGET_SETS.items()}


def run(ctx: Context, budget: Budget) -> dict:
    config = model_config(ctx)
    ranks = equal_budget_ranks(config)
    planned = [Trial(f"{name}, r={ranks[name]}", "qlora", ADAPTER_LR, r=ranks[name], alpha=float(ranks[name]),
                    targets=targets) for name, targets in TARGET_SETS.items()]
    records = [run_trial(t, budget, ctx, memory=False) for t in trials_bar(planned, "lab 3 target sets", ctx)]
    for rec, name in zip(records, TARGET_SETS, strict=True):
        rec["target_set"] = name
    reference = records[-1]  # all seven at the budget rank
    for rec in records:
        if "score" in rec:
            rec["score_minus_all_seven"] = score_difference(reference["correct"], rec["correct"])
    return {"trials": records, "summary": {"budget_rank": BUDGET_RANK, "equal_budget_ranks": ranks,
                                           "budget_params": lora_param_count(config, BUDGET_RANK, LLAMA_TARGETS)}}


def verdicts(res: dict) -> list[str]:
    """Lab 3's findings from its results file (one seed: lab 10 does not repeat this lab)."""
    return ["at {:,} trainable parameters, one seed, held-out loss: ".format(res["summary"]["budget_params"])
            + ", ".join(f"{t['name']} {t['heldout_loss']:.4f} ({score_text(t['correct'])})" for t in res["trials"])]
