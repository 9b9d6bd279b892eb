"""Lab 10: do labs 1-4's verdicts hold over seeds? And is chapter 8's gain more than formatting?

Labs 1-4 compare methods from one seed each: their intervals (a paired bootstrap over the 100 held-out orders)
measure how much the *test set* could move the difference between two fixed trained models, not how much the
models themselves move from one run to the next. This lab re-runs the comparisons at several seeds (each seed
changes the adapters' initialization, the batch order and dropout) and reports the spread over seeds, leading with
the held-out loss (teacher-forced, on :attr:`Budget.loss_size` orders: smooth, and no generation to pay for):

* ``methods``: lab 1's full fine-tuning (lr 1e-4), LoRA and QLoRA (lr 1e-3, r = 16, alpha = 16). The learning
  rates are lab 1's, fixed before any lab ran: **not tuned per method**;
* ``clipping``: QLoRA with the gradient norm clipped at 1.0 instead of the recipe's 0.3 (chapter 8's question);
* ``rank``: lab 2 kept alpha = 16, so its scale alpha / r fell 16x from r = 8 to r = 128 and rank and scale moved
  together. Here the rank moves alone: r in {8, 128} at a fixed ``alpha / r = 1`` (alpha = r), and at rsLoRA's
  fixed ``alpha / sqrt(r) = 4`` (Kalajdzievski 2023: the scale that keeps the update's size steady as r grows);
  both families pass through r = 16, alpha = 16, which is the ``methods`` QLoRA run;
* ``quant``: lab 4 over seeds: the same LoRA on a base fake-quantized to NF4 (with double quantization), FP4 or
  Int4 (:attr:`~qlora_edu.ch09_labs.trials.Trial.base_format`), against the ``methods`` LoRA run on the bf16 base;
* ``lr`` (seed 0 only): each method at 0.3x and at 3x its learning rate, a sensitivity check of the
  untuned rates (does the methods' order change?), not a tuning: the comparisons above keep lab 1's rates;
* ``targets``: lab 3 over seeds: QLoRA on q,v / q,k,v,o / all seven projections at an equal trainable budget
  (:func:`all_arms`); all seven at r = 8, alpha = 8 is the ``rank`` arm's first run.

Every trial is also scored, teacher-forced, on the ``heldout_templates`` split (sentences, items and remarks that
never occur in training: :func:`qlora_edu.ch08_finetune.instruct_data.generate_heldout_templates`).

And the baseline chapter 8's "0% -> 99%" needs: the base model prompted with :data:`FEW_SHOT` solved training
examples before each order (:func:`few_shot_example`), scored exactly on both held-out splits, beside the same
model asked zero-shot. A fine-tuned model that scores far above the few-shot base has learned more than the format.

**What the committed run holds.** Every arm at three seeds, and the few-shot baseline: the first committed run (two
CPU cores shared by many jobs) afforded only LoRA and QLoRA; the second ran the rest on the same budget, its
finished trials reused (a trial is a pure function of its settings, budget and model: :func:`~qlora_edu.ch09_labs.
trials.run_trial`). ``python -m qlora_edu.ch09_labs lab10`` re-runs it; :data:`RUN_NAMES` narrows it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace

import torch

from qlora_edu.ch08_finetune.instruct_data import Example
from qlora_edu.ch09_labs.common import Budget, Context
from qlora_edu.ch09_labs.lab1_methods import FULL_LRS
from qlora_edu.ch09_labs.trials import ADAPTER_LR, EVAL_BATCH, Trial, run_trial, trials_bar

QUESTION = ("Labs 1-4 over seeds (held-out loss, also on held-out templates): methods, clipping 0.3 vs 1.0, rank at "
            "fixed alpha/r and rsLoRA's alpha/sqrt(r), NF4/FP4/Int4/bf16 bases, target sets; a few-shot prompting "
            "baseline")
#: A third of lab 1's steps and a quarter of its held-out orders, no generation: what the seeds cost on two CPU
#: cores shared by many jobs (a trial took about 9 minutes of wall time at 18% of a core); the notebook says so
#: beside every figure.
FULL = Budget(steps=8, batch_size=4, eval_size=0, loss_size=24)
SMOKE = Budget(steps=2, batch_size=2, eval_size=0, loss_size=4, max_new_tokens=8)
SEEDS = (0, 1, 2)
#: Every arm this lab defines with fixed trials (a run cut short keeps what finished: every trial is cached). Lab 3's
#: target sets depend on the model's shapes (their equal-budget ranks): :func:`all_arms` adds them as ``"targets"``.
ALL_ARMS: dict[str, tuple[Trial, ...]] = {
    "methods": (Trial("lora", "lora", ADAPTER_LR), Trial("qlora", "qlora", ADAPTER_LR),
                Trial("full", "full", FULL_LRS[0])),
    "clipping": (Trial("qlora, clip 1.0", "qlora", ADAPTER_LR, max_grad_norm=1.0),),
    "rank": (Trial("r=8, alpha=8", "qlora", ADAPTER_LR, r=8, alpha=8.0),
             Trial("r=128, alpha=128", "qlora", ADAPTER_LR, r=128, alpha=128.0),
             Trial("r=8, alpha=4 sqrt(8)", "qlora", ADAPTER_LR, r=8, alpha=round(4 * math.sqrt(8), 4)),
             Trial("r=128, alpha=4 sqrt(128)", "qlora", ADAPTER_LR, r=128, alpha=round(4 * math.sqrt(128), 4))),
    # lab 4 over seeds: the same LoRA (the "lora" trial is the bf16 base) on bases fake-quantized in each format
    "quant": tuple(Trial(f"{fmt} base", "lora", ADAPTER_LR, base_format=fmt) for fmt in ("nf4", "fp4", "int4")),
    # the learning rates were fixed, not tuned: does 0.3x or 3x the rate change the methods' order? (seed 0)
    "lr": tuple(Trial(f"{method}, lr {lr:g}", method, lr)
                for method, base in (("full", FULL_LRS[0]), ("lora", ADAPTER_LR), ("qlora", ADAPTER_LR))
                for lr in (round(base * 0.3, 12), round(base * 3, 12))),
}
#: Arms run at fewer seeds than :data:`SEEDS` (the learning-rate check is a sensitivity check on one seed).
ARM_SEEDS = {"lr": 1}
ARM_NAMES = (*ALL_ARMS, "targets")


def all_arms(ctx: Context) -> dict[str, tuple[Trial, ...]]:
    """:data:`ALL_ARMS` plus lab 3 over seeds (``"targets"``): QLoRA on q,v / q,k,v,o / all seven projections, each
    at the rank that gives all seven's trainable parameters at r = 8 (:func:`~qlora_edu.ch09_labs.lab3_targets.
    equal_budget_ranks`), alpha = r; lab 3's names, so the records read alike."""
    from qlora_edu.ch09_labs.lab3_targets import TARGET_SETS, equal_budget_ranks
    from qlora_edu.ch09_labs.trials import model_config

    ranks = equal_budget_ranks(model_config(ctx))
    targets = tuple(Trial(f"{name}, r={ranks[name]}", "qlora", ADAPTER_LR, r=ranks[name], alpha=float(ranks[name]),
                          targets=tuple(sets)) for name, sets in TARGET_SETS.items())
    return {**ALL_ARMS, "targets": targets}


#: The trials the committed full run made, by name (None: every arm). The first committed run (three seeds of LoRA
#: and QLoRA) left the rest deferred; the second ran them all.
RUN_NAMES: tuple[str, ...] | None = None
#: Arms the full run leaves out (written down, smoke-tested; listed in the results file's ``"deferred"``).
DEFERRED: list[str] = []
#: Solved training examples shown before each order in the few-shot baseline, and the orders it scores per split.
FEW_SHOT = 3
FEW_SHOT_EVAL = 30
#: Whether the full run includes the few-shot baseline (the committed run does, on 30 orders of each split).
RUN_FEW_SHOT = True
#: The measures summarized over seeds (keys of a trial's record).
MEASURES = ("heldout_loss", "heldout_templates_loss", "final_train_loss")


def few_shot_example(example: Example, shots: list[Example]) -> Example:
    """``example`` with ``shots`` (solved examples) written before its message in the user turn::

        Examples:
        Order: <shot message>
        JSON: <shot answer>
        ...
        Now this order:
        <message>

    The answer is unchanged, so chapter 8's generation and exact score apply as they are."""
    solved = "\n".join(f"Order: {s.message}\nJSON: {s.response}" for s in shots)
    return replace(example, message=f"Examples:\n{solved}\nNow this order:\n{example.message}")


def spread(values: list[float]) -> dict:
    """``{"values", "mean", "sd", "min", "max", "n"}`` over seeds (``sd``: the sample standard deviation, None for
    one value)."""
    return {"values": values, "mean": round(statistics.fmean(values), 5),
            "sd": round(statistics.stdev(values), 5) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def paired_over_seeds(records: dict[str, dict[int, dict]], a: str, b: str, measure: str) -> dict | None:
    """``b - a`` of ``measure`` seed by seed (the same seed: the same batches), with its :func:`spread` and how many
    seeds it is negative in; None where the two arms share no seed."""
    seeds = sorted(set(records.get(a, {})) & set(records.get(b, {})))
    if not seeds:
        return None
    diffs = [round(records[b][s][measure] - records[a][s][measure], 5) for s in seeds]
    return {"a": a, "b": b, "measure": measure, "seeds": seeds, **spread(diffs),
            "negative_in": sum(d < 0 for d in diffs)}


def run_few_shot(ctx: Context, budget: Budget) -> dict:
    """The base model (the compute dtype, no adapters) zero-shot and with :data:`FEW_SHOT` shots, scored exactly on
    the first :data:`FEW_SHOT_EVAL` orders of both held-out splits (kept in ``ctx.cache_dir`` when set)."""
    from qlora_edu.ch08_finetune.finetune import evaluate
    from qlora_edu.common.base_model import load_base_model

    n = 4 if ctx.smoke else FEW_SHOT_EVAL
    cached = None if ctx.cache_dir is None else ctx.cache_dir / f"lab10-few-shot-{n}-{FEW_SHOT}-{ctx.smoke}.json"
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())
    began = time.process_time()
    model, _ = load_base_model(ctx.model_path, dtype=ctx.compute.dtype,
                               device=ctx.compute.device if ctx.compute.device.type == "cuda" else None,
                               progress=False)
    shots = ctx.train_set[:FEW_SHOT]
    out = {"shots": [s.id for s in shots], "n_eval": n, "max_new_tokens": budget.max_new_tokens}
    for split, examples in (("heldout", ctx.heldout[:n]), ("heldout_templates", ctx.heldout_templates[:n])):
        for name, prompts in (("zero_shot", examples), ("few_shot", [few_shot_example(e, shots) for e in examples])):
            ev = evaluate(model, ctx.tokenizer, prompts, batch_size=EVAL_BATCH, max_new_tokens=budget.max_new_tokens,
                          progress=ctx.progress)
            out[f"{split}:{name}"] = {"score": ev.score, "correct": [int(c) for c in ev.correct],
                                      "example_reply": ev.replies[0][:200]}
            ctx.say(f"few-shot baseline {split} {name}: {ev.score:.0%}")
    out["cpu_seconds"] = round(time.process_time() - began, 1)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(out))
    return out


def run(ctx: Context, budget: Budget) -> dict:
    seeds = SEEDS[:1] if ctx.smoke else SEEDS
    # the smoke run exercises every kind of arm (full fine-tuning, clipping) whatever the full run could afford
    # (and one base of lab 4's): what the full run could afford does not limit what CI checks
    defined = all_arms(ctx)
    arms = ({"methods": defined["methods"], "clipping": defined["clipping"], "quant": defined["quant"][:1]}
            if ctx.smoke else {arm: kept for arm, ts in defined.items()
                               if (kept := tuple(t for t in ts if RUN_NAMES is None or t.name in RUN_NAMES))})
    # the order they run in, most needed first (a run cut short keeps what finished: every trial is cached):
    # LoRA and QLoRA at every seed, the few-shot baseline, clipping, full fine-tuning, the ranks, the bases, the
    # target sets
    adapters = [("methods", t, s) for t in arms["methods"] if t.method != "full" for s in seeds]
    full = [("methods", t, s) for t in arms["methods"] if t.method == "full" for s in seeds]
    others = {arm: [(arm, t, s) for s in seeds[:ARM_SEEDS.get(arm, len(seeds))] for t in ts]
              for arm, ts in arms.items() if arm != "methods"}
    planned = adapters + others.pop("clipping", []) + full + [x for rest in others.values() for x in rest]
    records: list[dict] = []
    few_shot = spectrum = None
    for i, (arm, t, s) in enumerate(trials_bar(planned, "lab 10 trials", ctx)):
        if i == len(adapters) and (RUN_FEW_SHOT or ctx.smoke):  # after LoRA and QLoRA: what chapter 8 needs
            few_shot = run_few_shot(ctx, budget)
        keep = t.method == "full" and s == seeds[0]  # its dW, for lab 7's baselines (:func:`full_update_spectra`)
        rec = run_trial(t, replace(budget, seed=s), ctx, score=False, memory=False, keep_update=keep)
        records.append({**rec, "arm": arm})
        if keep:
            spectrum = full_update_spectra(ctx, ctx.updates.pop(("full", replace(budget, seed=s))))
    if few_shot is None and (RUN_FEW_SHOT or ctx.smoke):
        few_shot = run_few_shot(ctx, budget)
    by: dict[str, dict[int, dict]] = {}
    for rec in records:
        by.setdefault(rec["name"], {})[rec["seed"]] = rec
    summary = {name: {m: spread([runs[s][m] for s in sorted(runs)]) for m in MEASURES if all(
        m in r for r in runs.values())} for name, runs in by.items()}
    pairs = [("lora", "qlora"), ("full", "lora"), ("full", "qlora"), ("qlora", "qlora, clip 1.0"),
             ("r=8, alpha=8", "r=128, alpha=128"), ("r=8, alpha=4 sqrt(8)", "r=128, alpha=4 sqrt(128)"),
             ("r=8, alpha=8", "qlora"), ("qlora", "r=128, alpha=128"),
             ("lora", "nf4 base"), ("lora", "fp4 base"), ("lora", "int4 base"), ("nf4 base", "int4 base"),
             ("nf4 base", "fp4 base")]
    target_names = [t.name for t in arms.get("targets", ())]
    pairs += [(target_names[-1], name) for name in target_names[:-1]]  # each set against all seven
    paired = [p for a, b in pairs for m in ("heldout_loss", "heldout_templates_loss")
              if (p := paired_over_seeds(by, a, b, m)) is not None]
    clip = {name: {"clipped_steps": sum(g > runs[s]["max_grad_norm"] for s in runs for g in runs[s]["grad_norms"]),
                   "steps": sum(len(runs[s]["grad_norms"]) for s in runs),
                   "max_grad_norm": next(iter(runs.values()))["max_grad_norm"]}
            for name, runs in by.items() if name in ("qlora", "qlora, clip 1.0")}
    deferred = [] if ctx.smoke else DEFERRED + ([] if RUN_FEW_SHOT else ["few-shot baseline"])
    return {"trials": records, "seeds": list(seeds), "deferred": deferred,
            "summary": summary, "paired": paired, "clipping": clip,
            "lr": {"full": FULL_LRS[0], "adapters": ADAPTER_LR, "tuned_per_method": False},
            "few_shot": few_shot, "full_update_spectrum": spectrum}


def full_update_spectra(ctx: Context, update: dict) -> dict:
    """Lab 7's low-rank question asked of this lab's full fine-tuning update (seed 0) against two baselines better
    than a Gaussian matrix (:func:`~qlora_edu.ch09_labs.lab7_dynamics.update_baselines`): the same update with its
    entries shuffled (same values, no structure) and the pretrained weight itself. Medians over the projections."""
    from qlora_edu.ch09_labs.lab7_dynamics import RANK, update_baselines
    from qlora_edu.ch09_labs.trials import build_model, projection_weights

    model = build_model("full", Trial("", "full", FULL_LRS[0]).config(FULL), ctx)
    weights = projection_weights(model)
    del model
    gen = torch.Generator().manual_seed(0)
    rows = [update_baselines(update[key], weights[key], RANK, gen) for key in sorted(update)]
    return {"rank": RANK, "n_matrices": len(rows),
            "medians": {k: statistics.median(row[k] for row in rows) for k in rows[0]}}


def _pm(s: dict) -> str:
    """``'0.0412 ± 0.0031 (0.0380-0.0440)'``: mean ± sd over seeds (min-max)."""
    sd = "" if s["sd"] is None else f" ± {s['sd']:.4f}"
    return f"{s['mean']:.4f}{sd} ({s['min']:.4f}-{s['max']:.4f})"


def verdicts(res: dict) -> list[str]:
    """Lab 10's findings from its results file, worded as its data allow: one 135M model, the seeds it ran, its
    budget."""
    b, summary = res["header"]["budget"], res["summary"]
    seeds = res["seeds"]
    scope = (f"one 135M model, {len(seeds)} seeds, {b['steps']} steps of {b['batch_size']}, held-out loss on "
             f"{b['loss_size']} orders, lr not tuned per method")
    out = []
    for measure, what in (("heldout_loss", "held-out loss"), ("heldout_templates_loss", "held-out-templates loss")):
        arms = [n for n in ("full", "lora", "qlora") if measure in summary.get(n, {})]
        if arms:
            out.append(f"{what}, mean ± sd over seeds (min-max), {scope}: "
                       + "; ".join(f"{n} {_pm(summary[n][measure])}" for n in arms))
    for family, names in (("alpha/r = 1", ("r=8, alpha=8", "qlora", "r=128, alpha=128")),
                          ("alpha/sqrt(r) = 4", ("r=8, alpha=4 sqrt(8)", "qlora", "r=128, alpha=4 sqrt(128)"))):
        if all(n in summary for n in names):
            out.append(f"rank at a fixed {family}, held-out loss over seeds: " + "; ".join(
                f"r = {r} {_pm(summary[n]['heldout_loss'])}" for r, n in zip((8, 16, 128), names, strict=True)))
    bases = ("lora", "nf4 base", "fp4 base", "int4 base")
    if all(n in summary for n in bases):
        out.append("LoRA on a base stored as bf16 / NF4 / FP4 / Int4 (lab 4 over seeds), held-out loss: " + "; ".join(
            f"{label} {_pm(summary[n]['heldout_loss'])}" for label, n in zip(
                ("bf16", "NF4", "FP4", "Int4"), bases, strict=True)))
    lr_runs = {t["name"]: t for t in res["trials"] if t["arm"] == "lr"}
    if lr_runs:
        seed = next(iter(lr_runs.values()))["seed"]
        at = {t["name"]: t for t in res["trials"] if t["seed"] == seed and t["arm"] == "methods"}
        rows = []
        for method in ("full", "lora", "qlora"):
            mine = sorted([t for t in lr_runs.values() if t["method"] == method] + ([at[method]] if method in at
                                                                                  else []), key=lambda t: t["lr"])
            if mine:
                rows.append(f"{method} " + ", ".join(f"{t['lr']:g}: {t['heldout_loss']:.4f}" for t in mine))
        out.append(f"learning rate x0.3, x1, x3 (seed {seed} only), held-out loss: " + "; ".join(rows))
    sets = [n for n in summary if n.split(", r=")[0] in ("q,v", "q,k,v,o", "all seven")]
    if len(sets) > 1:
        out.append("target sets at an equal trainable budget (lab 3 over seeds), held-out loss: "
                   + "; ".join(f"{n} {_pm(summary[n]['heldout_loss'])}" for n in sets))
    for p in res["paired"]:
        what = "held-out loss" if p["measure"] == "heldout_loss" else "held-out-templates loss"
        out.append(f"{p['b']} minus {p['a']}, {what}, seed by seed: "
                   + ", ".join(f"{d:+.4f}" for d in p["values"])
                   + f" (lower in {p['negative_in']} of {p['n']} seeds)")
    for name, c in res["clipping"].items():
        out.append(f"{name}: {c['clipped_steps']} of {c['steps']} steps had a gradient norm above "
                   f"{c['max_grad_norm']:g} (over the seeds)")
    fs = res.get("few_shot")
    if fs:
        out.append(f"the base model, exact score on {fs['n_eval']} orders: held-out zero-shot "
                   f"{fs['heldout:zero_shot']['score']:.0%}, {len(fs['shots'])}-shot "
                   f"{fs['heldout:few_shot']['score']:.0%}; held-out templates zero-shot "
                   f"{fs['heldout_templates:zero_shot']['score']:.0%}, {len(fs['shots'])}-shot "
                   f"{fs['heldout_templates:few_shot']['score']:.0%}")
    sp = res.get("full_update_spectrum")
    if sp:
        m, r = sp["medians"], sp["rank"]
        out.append(f"full fine-tuning's update (seed {seeds[0]}, {b['steps']} steps), medians over {sp['n_matrices']} "
                   f"matrices: top {r} singular values hold {m['update_energy_top_r']:.1%} of ||dW||^2 "
                   f"(the same entries shuffled: {m['shuffled_energy_top_r']:.1%}; the pretrained W: "
                   f"{m['pretrained_energy_top_r']:.1%}); stable rank {m['update_stable_rank']:.1f} (shuffled "
                   f"{m['shuffled_stable_rank']:.1f}, pretrained W {m['pretrained_stable_rank']:.1f})")
    return out
