"""Lab 7: training dynamics, and is full fine-tuning's update low rank?

Note 000: "How does training dynamic differ from full fine-tuning?". Lab 1's three runs, looked at from inside:
their loss curves on the same batches, and the singular values of the updates they learn: full fine-tuning's
``dW = W_after - W_before`` of every projection against LoRA's and QLoRA's ``scaling * B A`` (r = 16). Is the full
update low rank (the LoRA paper's hypothesis)? Do the methods learn the same directions (:func:`subspace_overlap` of
the top-16 left singular vectors)? A random Gaussian matrix of each shape is the "no structure" baseline.
"""

from __future__ import annotations

import math

import torch

from qlora_edu.ch09_labs import trials
from qlora_edu.ch09_labs.common import Budget, Context
from qlora_edu.ch09_labs.trials import ADAPTER_LR, FULL_LR, LAB_FIELDS, Trial, run_trial, trials_bar
from qlora_edu.common.progress import progress_bar

QUESTION = "Training dynamics: loss curves, and the singular values of full fine-tuning's dW vs LoRA's BA"
FULL, SMOKE = trials.FULL, trials.SMOKE  # the budget every trial lab shares: a run two labs share is one run
#: Lab 7's three runs (r = 16 for the adapters): lab 1 runs them too and keeps their updates for this lab.
TRIALS = (Trial("full", "full", FULL_LR), Trial("lora", "lora", ADAPTER_LR), Trial("qlora", "qlora", ADAPTER_LR))
RANK = 16
SPECTRUM_KEEP = 64  # singular values kept per matrix in the results file for the plotted layer


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


def update_baselines(dw: torch.Tensor, w: torch.Tensor, r: int, generator: torch.Generator) -> dict[str, float]:
    """:func:`spectrum_stats` of an update ``dW`` beside two baselines that share more with it than a Gaussian
    matrix: ``dW`` with its entries shuffled (the same values, so the same ``||dW||_F``; any low-rank structure
    destroyed) and the pretrained weight ``W`` (how concentrated a trained matrix of this shape already is).
    Keys ``{update, shuffled, pretrained}_{energy_top_r, rank_90, stable_rank}``."""
    shuffled = dw.flatten()[torch.randperm(dw.numel(), generator=generator)].view_as(dw)
    out = {}
    for name, m in (("update", dw), ("shuffled", shuffled), ("pretrained", w)):
        st = spectrum_stats(torch.linalg.svdvals(m.float()), r)
        out |= {f"{name}_{k}": _round(st[k]) for k in ("energy_top_r", "rank_90", "stable_rank")}
    return out


def _round(x: float, digits: int = 5) -> float | None:
    """``x`` to ``digits`` significant digits; None for NaN (JSON has no NaN)."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def run(ctx: Context, budget: Budget) -> dict:
    records, updates = [], {}
    for t in trials_bar(TRIALS, "lab 7 methods", ctx):
        record = run_trial(t, budget, ctx, score=False, memory=False, keep_update=True)  # lab 1's runs, if kept
        updates[t.method] = ctx.updates.pop((t.method, budget))
        records.append({k: v for k, v in record.items()
                        if k not in ("correct", "memory", "example_reply", "score", "n_eval", "eval_seconds",
                                     "eval_cpu_seconds", "grad_norms", *LAB_FIELDS[:-1])})
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
        stats = {"full": spectrum_stats(s_full, RANK), "random": spectrum_stats(s_rand, RANK)}
        bases = {"full": u_full[:, :RANK], "random": u_rand[:, :RANK]}
        svals = {"full": s_full, "random": s_rand}
        for method in ("lora", "qlora"):
            b, a = updates[method][key]
            s, u = low_rank_svd(b, a)
            stats[method], bases[method], svals[method] = spectrum_stats(s, RANK), u, s
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
    med = {}
    for col in ("full_energy_top_r", "random_energy_top_r", "full_rank_90", "random_rank_90", "full_stable_rank",
                "lora_stable_rank", "overlap_full_lora", "overlap_full_qlora", "overlap_lora_qlora",
                "overlap_full_random"):
        values = sorted(row[col] for row in rows)
        med[col] = values[len(values) // 2]
    return {"trials": records, "matrices": rows, "spectra_layer": plot_layer, "spectra": spectra, "rank": RANK,
            "summary": {"medians": med}}


def verdicts(res: dict) -> list[str]:
    """Lab 7's findings from its results file (one seed; lab 10 adds better baselines than a Gaussian matrix)."""
    med = res["summary"]["medians"]
    return [
        f"medians over {len(res['matrices'])} matrices: the top {res['rank']} singular values hold "
        f"{med['full_energy_top_r']:.1%} of full fine-tuning's ||dW||^2 (a Gaussian matrix: "
        f"{med['random_energy_top_r']:.1%}); 90% of it takes {med['full_rank_90']:.0f} of them (Gaussian: "
        f"{med['random_rank_90']:.0f})",
    ]
