"""Lab 9: sweeps on a budget.

Note 004: "QLoRA is great for HPO sweeps because you can fit more trials per GPU". How many? (a) Chapter 4's memory
model for one 7B trial (r = 64 on all seven projections, gradient checkpointing; paged AdamW 32-bit for the
adapters, AdamW for full fine-tuning), one process per trial, each with its CUDA context, on a 24 GB card; and the
project's H100 measurements for comparison (``qlora_edu/reference/gpu-facts.md``). (b) A small learning-rate x rank
sweep of QLoRA on the course model: lr in :data:`SWEEP_LRS` x r in :data:`SWEEP_RANKS`, alpha 16, all seven
projections.
"""

from __future__ import annotations

from qlora_edu.ch09_labs import trials
from qlora_edu.ch09_labs.common import Budget, Context, GiB, MiB
from qlora_edu.ch09_labs.trials import ADAPTER_LR, METHODS, Trial, run_trial, trials_bar

QUESTION = "Sweeps on a budget: trials per 24 GB GPU for 7B, and an lr x rank sweep on the course model"
FULL, SMOKE = trials.FULL, trials.SMOKE  # the budget every trial lab shares: a run two labs share is one run
SWEEP_LRS = (1e-3, 3e-3)  # lr 1e-3 at r = 8 and 64: lab 2's runs (reused)
SWEEP_RANKS = (8, 64)
GPU_24GB = 24 * GiB        # an RTX 3090 / 4090: 24 GiB of device memory
CUDA_CONTEXT = GiB // 2    # what each process's CUDA context takes before torch allocates
SEVEN_B_SHAPES = ((1, 512), (4, 512), (1, 2048))
#: qlora_edu/reference/gpu-facts.md, H100, 7B shape, r = 64 on all seven projections, paged AdamW, checkpointing,
#: batch 1 x 512: total MiB (torch peak + paged optimizer states) and tokens/s.
GPU_FACTS_7B = {"qlora": {"total_mib": 6996, "tokens_per_s": 812}, "lora": {"total_mib": 15501, "tokens_per_s": 1043}}


def trials_per_gpu(per_trial_bytes: int, gpu_bytes: int = GPU_24GB, context_bytes: int = CUDA_CONTEXT) -> int:
    """How many trials run side by side on one GPU, one process each: ``floor(gpu / (per_trial + context))``."""
    return int(gpu_bytes // (per_trial_bytes + context_bytes))


def gpu_trial_table() -> list[dict]:
    """Chapter 4's predicted peak of one 7B trial (r = 64 on all seven projections, paged AdamW 32-bit for the
    adapters, AdamW for full fine-tuning, gradient checkpointing) and how many such trials fit a 24 GB GPU."""
    from qlora_edu.ch04_memory.memory import llama_config, training_memory

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


def run(ctx: Context, budget: Budget) -> dict:
    try:
        table, table_error = gpu_trial_table(), None
    except Exception as exc:  # chapter 4's model is another chapter's; the sweep below still runs without it
        table, table_error = [], f"{type(exc).__name__}: {exc}"
    measured = {m: {**v, "trials_per_24gb": trials_per_gpu(v["total_mib"] * MiB)} for m, v in GPU_FACTS_7B.items()}
    lrs, ranks = (SWEEP_LRS[:1], SWEEP_RANKS[:1]) if ctx.smoke else (SWEEP_LRS, SWEEP_RANKS)
    # the learning rates other labs did not run first (lr 1e-3 is lab 2's: reused when its runs are there)
    planned = [Trial(f"lr={lr:g}, r={r}", "qlora", lr, r=r) for lr in sorted(lrs, key=lambda x: x == ADAPTER_LR)
              for r in ranks]
    records = [run_trial(t, budget, ctx, memory=False) for t in trials_bar(planned, "lab 9 sweep", ctx)]
    best = max(records, key=lambda r: (r.get("score", 0), -r["heldout_loss"]))
    return {"gpu_trials": table, "gpu_trials_error": table_error, "gpu_facts_7b": measured,
            "gpu_bytes": GPU_24GB, "cuda_context_bytes": CUDA_CONTEXT, "trials": records,
            "summary": {"best": best["name"], "lrs": list(lrs), "ranks": list(ranks),
                        "cpu_seconds_per_trial": round(sum(r["cpu_seconds"] for r in records) / len(records), 1)}}


def verdicts(res: dict) -> list[str]:
    """Lab 9's findings from its results file."""
    q = {row["method"]: row["trials_per_24gb"] for row in res["gpu_trials"] if row["batch"] == 1 and row["seq"] == 512}
    scores = [sum(t["correct"]) for t in res["trials"]]
    losses = [t["heldout_loss"] for t in res["trials"]]
    return [f"7B trials per 24 GB GPU at 1 x 512: QLoRA {q['qlora']}, LoRA {q['lora']}, full {q['full']}",
            f"lr x rank sweep, one seed: scores {min(scores)}-{max(scores)} of {len(res['trials'][0]['correct'])}, "
            f"held-out loss {min(losses):.4f}-{max(losses):.4f}"]
