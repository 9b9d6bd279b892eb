"""Lab 2: does the rank matter?

Note 001 asks for ranks {16, 32, 64, 128} "to find the sweet spot"; note 003 says some tasks need higher ranks and
"there is no clear rule". QLoRA on all seven projections at r in :data:`RANKS`, alpha fixed at 16 (the paper keeps
alpha fixed, so ``alpha / r`` shrinks as r grows), the lr 1e-3 of chapter 8's CPU default for every rank, the same
batches. Trainable parameters are checked against chapter 6's formula (:func:`~qlora_edu.ch06_lora.lora.
lora_param_count`).
"""

from __future__ import annotations

from qlora_edu.ch06_lora.lora import LLAMA_TARGETS, lora_param_count
from qlora_edu.ch09_labs import trials
from qlora_edu.ch09_labs.common import Budget, Context, score_text
from qlora_edu.ch09_labs.trials import ADAPTER_LR, Trial, model_config, run_trial, score_difference, trials_bar

QUESTION = "Rank ablation r in {8, 16, 32, 64, 128}: score, trainable parameters, memory, time"
FULL, SMOKE = trials.FULL, trials.SMOKE  # the budget every trial lab shares: a run two labs share is one run
RANKS = (8, 16, 32, 64, 128)
ALPHA = 16.0


def run(ctx: Context, budget: Budget) -> dict:
    ranks = RANKS[:2] if ctx.smoke else RANKS
    planned = [Trial(f"r={r}", "qlora", ADAPTER_LR, r=r, alpha=ALPHA) for r in ranks]
    records = [run_trial(t, budget, ctx) for t in trials_bar(planned, "lab 2 ranks", ctx)]
    predicted = {r: lora_param_count(model_config(ctx), r, LLAMA_TARGETS) for r in ranks}
    for rec in records:
        rec["predicted_trainable_params"] = predicted[rec["r"]]
    best = max(records, key=lambda r: (r.get("score", 0), -r["heldout_loss"]))
    for rec in records:
        if "score" in rec:
            rec["score_minus_best"] = score_difference(best["correct"], rec["correct"])
    return {"trials": records, "summary": {"best": best["name"], "alpha": ALPHA, "lr": ADAPTER_LR}}


def verdicts(res: dict) -> list[str]:
    """Lab 2's findings from its results file (alpha fixed: rank and scale move together; lab 10 separates them)."""
    ts = res["trials"]
    losses = [t["heldout_loss"] for t in ts]
    scores = [sum(t["correct"]) for t in ts]
    return [
        f"alpha fixed at {res['summary']['alpha']:g} (scale alpha/r from {res['summary']['alpha'] / ts[0]['r']:g} "
        f"at r = {ts[0]['r']} to {res['summary']['alpha'] / ts[-1]['r']:g} at r = {ts[-1]['r']}), one seed: "
        f"held-out loss {min(losses):.4f}-{max(losses):.4f}, score {min(scores)}-{max(scores)} of "
        f"{len(ts[0]['correct'])}",
        "rank: " + ", ".join(f"r = {t['r']} {t['heldout_loss']:.4f} ({score_text(t['correct'])})" for t in ts),
    ]
