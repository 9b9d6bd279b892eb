"""Chapter 9, the labs (``qlora_edu/ch09_labs/``): every lab re-run in smoke mode into a temporary folder, on a tiny
random Llama that uses SmolLM2's real tokenizer (tests/conftest.py: the whole code path in seconds), its results file
read back with the one reader and checked: the header, the schema the notebook reads, and the facts that must hold
whatever the budget (LoRA trains the same parameters as QLoRA, a trial two labs share is trained once, a hot-swapped
adapter computes exactly what it computed when trained, the bf16 GGUF reloads to the same logits, NF4 stores normal
weights with less error than Int4, dropout and checkpointing move the saved activations the right way). The labs'
own mathematics (the low-rank SVD, the spectrum summaries, the subspace overlap, the equal-budget ranks, trials per
GPU, the GGUF names) against independent references. And the committed results files, which the notebook reads:
each parses with the one reader, has the full header, and is a full (not smoke) run of the lab's current budget.
No test loads the real model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora_edu.ch06_lora.lora import LLAMA_TARGETS
from qlora_edu.ch09_labs import (
    common,
    lab1_methods,
    lab2_rank,
    lab3_targets,
    lab4_quant,
    lab5_hotswap,
    lab6_merge_export,
    lab7_dynamics,
    lab9_sweeps,
    lab10_seeds,
)
from qlora_edu.ch09_labs.__main__ import main
from qlora_edu.ch09_labs.common import HEADER_FIELDS, LABS, Context, read_results, results_path, run_lab

MiB = 2**20


# ----------------------------------------------------------------------------------------------
# Fixtures: one smoke run of each lab on the tiny random Llama of tests/conftest.py


def smoke_context(model_dir, **kwargs) -> Context:
    return Context.create(str(model_dir), smoke=True, progress=False, **kwargs)


@pytest.fixture(scope="module")
def ctx(tiny_model_dir):
    return smoke_context(tiny_model_dir)


@pytest.fixture(scope="module")
def smoke_results(ctx, tmp_path_factory):
    """Each lab run once in smoke mode into a temporary folder (not the committed one), in one context (as
    ``python -m qlora_edu.ch09_labs all`` runs them), read back with the one reader."""
    out = tmp_path_factory.mktemp("results")
    cache = {}

    def get(lab):
        if lab not in cache:
            path = run_lab(lab, ctx, out=out)
            assert path == results_path(lab, out) == out / f"{LABS[lab]}.json"
            cache[lab] = read_results(path)
        return cache[lab]

    return get


# ----------------------------------------------------------------------------------------------
# The header of a results file, and each lab's schema and sanity (used on the smoke runs and the committed files)


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def check_header(res: dict, lab: str, mode: str) -> None:
    header = res["header"]
    assert list(header) == list(HEADER_FIELDS)
    assert header["lab"] == lab and header["mode"] == mode and header["question"]
    module = common.lab_module(lab)
    budget = module.SMOKE if mode == "smoke" else module.FULL
    recorded = {k: v for k, v in header["budget"].items() if v is not None}
    assert recorded == {k: v for k, v in vars(budget).items() if k in recorded}, "made with another budget"
    # the run that wrote the file: about 0 s when it found every trial already trained (lab 7 after lab 1)
    assert header["wall_seconds"] >= 0 and len(header["load_average_start"]) == len(header["load_average_end"]) == 3
    assert {"torch", "transformers", "peft", "bitsandbytes", "python"} <= set(header["versions"])
    converted = header["converted"]
    if converted is None:  # written by run_lab: every field recorded
        assert all(v is not None for k, v in header.items() if k != "converted"), header
        assert None not in header["budget"].values() and None not in header["load_average_start"]
        assert header["cpu_seconds"] >= 0 and header["command"].startswith("python -m qlora_edu.ch09_labs " + lab)
    else:  # an older file: the fields it did not record are None, and said to be
        missing = [k for k, v in header.items() if v is None] + [f"budget.{k}" for k, v in header["budget"].items()
                                                                 if v is None]
        assert sorted(missing) == sorted(converted["not_recorded"])
        assert set(converted["mapping"]) == set(HEADER_FIELDS) - {"lab", "question", "converted"}
    assert "trials" not in res or all(t["wall_seconds"] > 0 and t["cpu_seconds"] > 0 for t in res["trials"])


def check_trial(t: dict, budget: dict, *, scored: bool, memory: bool) -> None:
    assert len(t["losses"]) == budget["steps"], "one training loss per step"
    assert all(_finite(x) and x > 0 for x in t["losses"])
    assert t["trainable_params"] > 0
    assert t["train_seconds"] > 0 and t["train_cpu_seconds"] > 0 and t["wall_seconds"] >= t["train_seconds"]
    assert _finite(t["heldout_loss"]) and t["heldout_loss"] > 0
    if t["method"] == "full":
        assert t["r"] is None and t["targets"] is None
    else:
        assert t["r"] >= 1 and set(t["targets"]) <= set(LLAMA_TARGETS)
    if scored:
        assert 0.0 <= t["score"] <= 1.0
        assert t["n_eval"] == budget["eval_size"] == len(t["correct"])
        assert t["score"] == pytest.approx(sum(t["correct"]) / len(t["correct"]))
    if memory:
        m = t["memory"]
        parts = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "saved_activations")
        assert m["total"] == sum(m[p] for p in parts)
        assert m["trainable_weights"] > 0 and m["saved_activations"] > 0
        # AdamW: two float32 moments per trainable float32 weight (+ a step counter each); gradients as the weights
        assert m["optimizer_states"] >= 2 * m["trainable_weights"]
        assert m["gradients"] == m["trainable_weights"]
        # checkpointing keeps only each layer's input: never more than without it
        assert m["saved_activations"] <= m["saved_activations_no_ckpt"]


def check_lab1(res: dict, smoke: bool) -> None:
    methods = [t["method"] for t in res["trials"]]
    assert methods.count("lora") == methods.count("qlora") == 1
    assert methods.count("full") == (1 if smoke else len(lab1_methods.FULL_LRS))
    for t in res["trials"]:
        check_trial(t, res["header"]["budget"], scored=True, memory=True)
    assert sum(t["is_full_reference"] for t in res["trials"]) == 1
    by = {t["method"]: t for t in res["trials"] if t["method"] != "full"}
    full = next(t for t in res["trials"] if t["is_full_reference"])
    # the same model and adapters: LoRA and QLoRA train exactly the same number of parameters, a few % of full's
    assert by["lora"]["trainable_params"] == by["qlora"]["trainable_params"] < full["trainable_params"] / 5
    if not smoke:  # (the tiny model is nearly all embedding, which prepare_model_for_kbit_training makes float32)
        assert by["qlora"]["memory"]["frozen_weights"] < by["lora"]["memory"]["frozen_weights"]
    # LoRA's static tensors are far fewer bytes than full fine-tuning's (gradients and states of every weight)
    static = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")
    assert sum(by["lora"]["memory"][k] for k in static) < sum(full["memory"][k] for k in static)
    for t in res["trials"]:
        diff, low, high = t["score_minus_full"]
        assert low <= diff <= high
    assert res["summary"]["seed_note_relative"] == {"full": 1.0, "lora": 0.97, "qlora": 0.95}


def check_lab2(res: dict, smoke: bool) -> None:
    ranks = [t["r"] for t in res["trials"]]
    assert ranks == list(lab2_rank.RANKS[:2] if smoke else lab2_rank.RANKS)
    for t in res["trials"]:
        check_trial(t, res["header"]["budget"], scored=True, memory=True)
        assert t["method"] == "qlora" and t["alpha"] == 16.0
        assert t["trainable_params"] == t["predicted_trainable_params"]
    params = [t["trainable_params"] for t in res["trials"]]
    assert all(p2 == p1 * r2 // r1 for p1, p2, r1, r2 in zip(params, params[1:], ranks, ranks[1:], strict=False))
    states = [t["memory"]["optimizer_states"] for t in res["trials"]]
    assert states == sorted(states) and states[0] < states[-1]


def check_lab3(res: dict, smoke: bool) -> None:
    trials = res["trials"]
    assert [t["target_set"] for t in trials] == list(lab3_targets.TARGET_SETS)
    for t in trials:
        check_trial(t, res["header"]["budget"], scored=True, memory=False)
        assert t["alpha"] == t["r"]
    budget = res["summary"]["budget_params"]
    for t in trials:  # the rank rounding keeps every set within a few % of the budget
        assert abs(t["trainable_params"] - budget) <= 0.05 * budget
    assert trials[0]["r"] > trials[1]["r"] > trials[2]["r"] == lab3_targets.BUDGET_RANK


def check_lab4(res: dict, smoke: bool) -> None:
    rows = res["formats"]
    assert list(rows) == list(lab4_quant.FORMATS)
    assert res["nf4_shortcut_max_abs_diff"] == 0.0  # dequantize-once computes what NF4Linear computes
    assert rows["bf16"]["weight_relative_rmse"] == 0.0
    assert math.isclose(rows["nf4"]["bits_per_weight"], 4.126953125)
    # normal (randomly initialized, or trained) weights: NF4 stores them with less error than Int4 (chapter 2)
    assert 0 < rows["nf4"]["weight_relative_rmse"] < rows["int4"]["weight_relative_rmse"]
    for fmt, row in rows.items():
        assert len(row["losses"]) == res["header"]["budget"]["steps"]
        assert len(row["correct"]) == res["n_eval"] and 0.0 <= row["score"] <= 1.0
        assert row["base_perplexity"] > 1 and row["heldout_loss_after"] > 0
        assert ("vs_bf16" in row) == (fmt != "bf16")


def check_lab5(res: dict, smoke: bool) -> None:
    assert res["exact"]["orders_equals_trained"] and res["exact"]["label_equals_trained"]
    assert res["exact"]["switch_back_equal"]
    mem = res["memory"]
    assert mem["orders_adapter_bytes"] == mem["label_adapter_bytes"] == 4 * res["adapter_parameters"]
    assert mem["added_by_orders_bytes"] == mem["added_by_label_bytes"] == mem["orders_adapter_bytes"]
    assert set(res["matrix"]) == {"base", "orders", "label"}
    assert all(set(row) == {"orders", "label"} for row in res["matrix"].values())
    assert 0 < res["seconds"]["set_adapter_median"] < res["seconds"]["load_label_adapter"]
    assert len(res["losses"]["orders"]) == len(res["losses"]["label"]) == res["header"]["budget"]["steps"]


def check_lab6(res: dict, smoke: bool) -> None:
    export = res["export"]
    assert export["safetensors_logits_equal"] and export["gguf_bf16_logits_equal"]
    assert export["gguf_bf16_max_abs_diff"] == 0.0 and export["gguf_q4_1_max_abs_diff"] > 0
    # GGUF stores floats in float32 (rms_norm_eps 1e-6 comes back as 9.99999997e-07)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in export["config_roundtrip"].values())
    assert export["gguf"]["q4_1"]["bytes"] < export["gguf"]["bf16"]["bytes"]
    assert res["logits_vs_a"]["a_unmerged_qlora"]["kl"] == 0.0
    assert set(res["scores"]) == {"a_unmerged_qlora", "b_merged_bf16", "c_merged_requantized_nf4",
                                  "d_exported_bf16", "e_gguf_q4_1"}


def check_lab7(res: dict, smoke: bool) -> None:
    assert [t["method"] for t in res["trials"]] == ["full", "lora", "qlora"]
    for t in res["trials"]:
        check_trial(t, res["header"]["budget"], scored=False, memory=False)
    rows = res["matrices"]
    assert {r["module"] for r in rows} == set(LLAMA_TARGETS)
    r = res["rank"]
    for row in rows:
        for m in ("full", "lora", "qlora", "random"):
            assert 0.0 < row[f"{m}_energy_top_r"] <= 1.0 + 1e-6
            assert 1 <= row[f"{m}_rank_90"] <= min(row["shape"])
            assert 1.0 - 1e-6 <= row[f"{m}_stable_rank"] <= min(row["shape"]) + 1e-6
        for m in ("lora", "qlora"):  # a rank-r product holds all its energy in r singular values
            assert row[f"{m}_rank_90"] <= r and row[f"{m}_energy_top_r"] == pytest.approx(1.0, abs=1e-4)
        for k in ("overlap_full_lora", "overlap_full_qlora", "overlap_lora_qlora", "overlap_full_random"):
            assert -1e-6 <= row[k] <= 1.0 + 1e-6
    assert set(res["spectra"]) == set(LLAMA_TARGETS)
    for spectra in res["spectra"].values():
        for values in spectra.values():
            assert values == sorted(values, reverse=True) and values[0] > 0


def check_lab8(res: dict, smoke: bool) -> None:
    rows = {(r["method"], r["dtype"], r["checkpointing"], r["lora_dropout"]): r for r in res["rows"]}
    set_ups = {("qlora", "bfloat16"), ("full", "float32")}
    if not smoke:
        set_ups |= {("lora", "float32"), ("lora", "bfloat16"), ("full", "bfloat16")}
    assert set(rows) == {(m, d, c, p) for m, d in set_ups for c in (False, True)
                         for p in ((0.05, 0.0) if m != "full" else (None,))}
    for r in res["rows"]:
        assert r["peak_held_bytes"] >= r["forward_saved_bytes"] > 0
        if r["checkpointing"] or smoke:  # chapter 4's model, within 1% (the notebook shows the gap without ckpt)
            assert math.isclose(r["forward_saved_bytes"], r["predicted_saved_bytes"], rel_tol=0.01)
    # without checkpointing, dropout's copies are extra saved tensors; with it, every layer keeps only its input
    q = {(c, p): rows[("qlora", "bfloat16", c, p)]["forward_saved_bytes"] for c in (False, True) for p in (0.05, 0.0)}
    assert q[(False, 0.05)] > q[(False, 0.0)] > q[(True, 0.0)] == q[(True, 0.05)]
    assert len(res["llama7b_gpu_predicted"]) == 8


def check_lab9(res: dict, smoke: bool) -> None:
    for t in res["trials"]:
        check_trial(t, res["header"]["budget"], scored=True, memory=False)
    assert len(res["trials"]) == (1 if smoke else len(lab9_sweeps.SWEEP_LRS) * len(lab9_sweeps.SWEEP_RANKS))
    facts = res["gpu_facts_7b"]
    assert facts["qlora"]["trials_per_24gb"] > facts["lora"]["trials_per_24gb"] >= 1
    if res["gpu_trials_error"] is None:
        rows = {(r["method"], r["batch"], r["seq"]): r for r in res["gpu_trials"]}
        for b, s in lab9_sweeps.SEVEN_B_SHAPES:
            q, lo, fu = (rows[(m, b, s)] for m in ("qlora", "lora", "full"))
            assert q["predicted_total_bytes"] < lo["predicted_total_bytes"] < fu["predicted_total_bytes"]
            assert q["trials_per_24gb"] >= lo["trials_per_24gb"] >= fu["trials_per_24gb"]
            assert fu["trials_per_24gb"] == 0  # full fine-tuning of 7B does not fit 24 GB


def check_lab10(res: dict, smoke: bool) -> None:
    budget = res["header"]["budget"]
    assert budget["eval_size"] == 0  # the held-out loss leads; no generation in the trials
    assert res["seeds"] == list(lab10_seeds.SEEDS[:1] if smoke else lab10_seeds.SEEDS)
    assert res["lr"]["tuned_per_method"] is False
    for t in res["trials"]:
        check_trial(t, budget | {"seed": t["seed"]}, scored=False, memory=False)
        assert _finite(t["heldout_templates_loss"]) and t["heldout_templates_loss"] > 0
        assert t["arm"] in lab10_seeds.ARM_NAMES
        assert ("base_format" in t) is (t["arm"] == "quant")
    by_seed = {}
    for t in res["trials"]:
        by_seed.setdefault(t["seed"], []).append(t)
    for name, measures in res["summary"].items():
        runs = [t for t in res["trials"] if t["name"] == name]
        for m, s in measures.items():
            assert s["values"] == [t[m] for t in sorted(runs, key=lambda t: t["seed"])]
            assert s["min"] <= s["mean"] <= s["max"] and s["n"] == len(runs)
    for seed, ts in by_seed.items():  # a seed's runs share their batches: the first step sees the same orders
        assert len({t["tokens"] for t in ts if t["arm"] == "methods"}) == 1, seed
    if smoke:
        assert {t["name"] for t in res["trials"]} == {"full", "lora", "qlora", "qlora, clip 1.0", "nf4 base"}
    assert res["clipping"]["qlora"]["max_grad_norm"] == 0.3
    target_sets = {t["name"] for t in res["trials"] if t["arm"] == "targets"}
    assert all(n.split(", r=")[0] in lab3_targets.TARGET_SETS for n in target_sets)
    assert set(res["deferred"]) | {t["name"] for t in res["trials"]} <= {
        t.name for ts in lab10_seeds.ALL_ARMS.values() for t in ts} | target_sets | {"few-shot baseline"}
    fs = res["few_shot"]
    if fs is None:
        assert "few-shot baseline" in res["deferred"] and not smoke
        return
    for key in ("heldout:zero_shot", "heldout:few_shot", "heldout_templates:zero_shot", "heldout_templates:few_shot"):
        assert len(fs[key]["correct"]) == fs["n_eval"] and fs[key]["score"] == sum(fs[key]["correct"]) / fs["n_eval"]
    if res["full_update_spectrum"] is not None:
        med = res["full_update_spectrum"]["medians"]
        assert 0 < med["shuffled_energy_top_r"] <= med["update_energy_top_r"] + 1e-9 or smoke


CHECKS = {"lab1": check_lab1, "lab2": check_lab2, "lab3": check_lab3, "lab4": check_lab4, "lab5": check_lab5,
          "lab6": check_lab6, "lab7": check_lab7, "lab8": check_lab8, "lab9": check_lab9, "lab10": check_lab10}


@pytest.mark.parametrize("lab", LABS)
def test_lab_smoke_run_writes_a_sane_results_file(lab, smoke_results):
    res = smoke_results(lab)
    check_header(res, lab, "smoke")
    CHECKS[lab](res, smoke=True)


@pytest.mark.parametrize("lab", LABS)
def test_committed_results_parse_with_the_one_reader_and_are_full_runs(lab):
    path = results_path(lab)
    assert path.is_file(), f"{path} is missing: run python -m qlora_edu.ch09_labs {lab}"
    res = read_results(path)
    check_header(res, lab, "full")
    CHECKS[lab](res, smoke=False)


def test_the_reader_rejects_a_file_without_the_full_header(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"lab": "lab1", "smoke": False, "trials": []}))
    with pytest.raises(ValueError, match="no header"):
        read_results(path)
    header = dict.fromkeys(HEADER_FIELDS[:-1]) | {"mode": "full"}
    path.write_text(json.dumps({"header": header}))
    with pytest.raises(ValueError, match="lacks converted"):
        read_results(path)
    path.write_text(json.dumps({"header": header | {"converted": None, "mode": "quick"}}))
    with pytest.raises(ValueError, match="mode"):
        read_results(path)


# ----------------------------------------------------------------------------------------------
# Trials that labs share are trained once


def test_a_trial_two_labs_share_is_trained_once(smoke_results):
    lab1, lab2 = smoke_results("lab1"), smoke_results("lab2")
    qlora = next(t for t in lab1["trials"] if t["method"] == "qlora")
    r16 = next(t for t in lab2["trials"] if t["r"] == 16)
    assert r16["reused_from"] == "lab1" and "reused_from" not in qlora
    assert r16["losses"] == qlora["losses"] and r16["correct"] == qlora["correct"]
    lab7 = smoke_results("lab7")
    assert [t.get("reused_from") for t in lab7["trials"]] == ["lab1"] * 3
    assert lab7["trials"][1]["losses"] == next(t for t in lab1["trials"] if t["method"] == "lora")["losses"]


def test_a_lab_run_alone_reuses_the_runs_recorded_in_the_results_folder(tiny_model_dir, tmp_path):
    lab1 = read_results(run_lab("lab1", smoke_context(tiny_model_dir), out=tmp_path))
    fresh = smoke_context(tiny_model_dir)  # another process: nothing in memory
    lab2 = read_results(run_lab("lab2", fresh, out=tmp_path))
    check_lab2(lab2, smoke=True)
    qlora = next(t for t in lab1["trials"] if t["method"] == "qlora")
    r16 = next(t for t in lab2["trials"] if t["r"] == 16)
    assert r16["reused_from"] == "lab1" and r16["correct"] == qlora["correct"] and "relative_to_full" not in r16
    assert "reused_from" not in next(t for t in lab2["trials"] if t["r"] == 8)  # trained here


def test_an_interrupted_run_resumes_from_the_cache_folder(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    lab7 = read_results(run_lab("lab7", smoke_context(tiny_model_dir, cache_dir=cache), out=tmp_path / "a"))
    assert all("reused_from" not in t for t in lab7["trials"])
    again = smoke_context(tiny_model_dir, cache_dir=cache)  # a new process
    redo = read_results(run_lab("lab7", again, out=tmp_path / "b"))
    assert [t["reused_from"] for t in redo["trials"]] == ["lab7"] * 3
    assert redo["matrices"] == lab7["matrices"]  # the kept weight updates give the same spectra
    assert not again.updates  # lab 7 hands the updates it used back


# ----------------------------------------------------------------------------------------------
# The labs' mathematics against independent references


def test_low_rank_svd_matches_the_svd_of_the_product():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(96, 8, generator=g, dtype=torch.float64), torch.randn(8, 64, generator=g, dtype=torch.float64)
    s, u = lab7_dynamics.low_rank_svd(b, a)
    u_ref, s_ref, _ = torch.linalg.svd(b @ a)
    torch.testing.assert_close(s, s_ref[:8])
    # the same left singular vectors up to sign: |<u_i, u_ref_i>| = 1
    torch.testing.assert_close((u * u_ref[:, :8]).sum(0).abs(), torch.ones(8, dtype=torch.float64))


def test_spectrum_stats_on_a_matrix_of_known_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.0])  # energies 16, 4, 1, 1: total 22
    st = lab7_dynamics.spectrum_stats(s, r=2)
    assert st["energy_top_r"] == pytest.approx(20 / 22)
    assert st["rank_90"] == 2  # 20/22 = 0.909 >= 0.9
    assert st["stable_rank"] == pytest.approx(22 / 16)
    assert st["frobenius"] == pytest.approx(math.sqrt(22))
    assert lab7_dynamics.spectrum_stats(torch.ones(5), r=5)["rank_90"] == 5  # flat spectrum: 90% needs all five


def test_subspace_overlap_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert lab7_dynamics.subspace_overlap(q[:, :4], q[:, :4] @ rot) == pytest.approx(1.0)  # same subspace
    assert lab7_dynamics.subspace_overlap(q[:, :4], q[:, 4:8]) == pytest.approx(0.0, abs=1e-12)
    assert lab7_dynamics.subspace_overlap(q[:, :4], q[:, 2:6]) == pytest.approx(0.5)


def test_equal_budget_ranks_match_hand_counted_parameters():
    from transformers import LlamaConfig

    # SmolLM2-135M's shape: hidden 576, MLP 1536, 9 heads / 3 KV heads of 64, 30 layers
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, num_hidden_layers=30, vocab_size=49152)
    per_rank = {"q_proj": 576 + 576, "k_proj": 576 + 192, "v_proj": 576 + 192, "o_proj": 576 + 576,
                "gate_proj": 576 + 1536, "up_proj": 576 + 1536, "down_proj": 1536 + 576}  # r (in + out) per layer
    budget = 30 * lab3_targets.BUDGET_RANK * sum(per_rank.values())
    ranks = lab3_targets.equal_budget_ranks(config)
    assert ranks["all seven"] == lab3_targets.BUDGET_RANK
    for name, targets in lab3_targets.TARGET_SETS.items():
        per = 30 * sum(per_rank[t] for t in targets)
        assert ranks[name] == round(budget / per)


def test_trials_per_gpu_counts_one_context_per_process():
    gib = 2**30
    assert lab9_sweeps.trials_per_gpu(int(7.5 * gib), gpu_bytes=24 * gib, context_bytes=gib // 2) == 3
    assert lab9_sweeps.trials_per_gpu(int(7.6 * gib), gpu_bytes=24 * gib, context_bytes=gib // 2) == 2
    assert lab9_sweeps.trials_per_gpu(30 * gib, gpu_bytes=24 * gib, context_bytes=gib // 2) == 0


def test_label_task_and_task_tokenizer(ctx):
    from qlora_edu.ch08_finetune.instruct_data import collate_examples, load_dataset

    order = load_dataset("heldout")[:3]
    labels = lab5_hotswap.as_label_examples(order)
    answer = order[0].answer
    assert labels[0].response == (f"{answer['quantity']} x {answer['item']} | {answer['city']} | "
                                  f"{answer['customer']} | {'EXPRESS' if answer['express'] else 'STANDARD'}")
    assert lab5_hotswap.score_labels([f"  {labels[0].response} ", "x", labels[2].response], labels) == [
        True, False, True]
    tokenizer = ctx.tokenizer
    wrapped = lab5_hotswap.TaskTokenizer(tokenizer, lab5_hotswap.LABEL_INSTRUCTION)
    text = tokenizer.decode(collate_examples(wrapped, labels)["input_ids"][0])
    assert lab5_hotswap.LABEL_INSTRUCTION in text and labels[0].response in text
    side = tokenizer.padding_side
    wrapped.padding_side = "left"  # generate_replies sets it on the wrapper: it must reach the tokenizer
    assert tokenizer.padding_side == "left"
    tokenizer.padding_side = side


def test_gguf_names_and_permutation():
    assert lab6_merge_export.gguf_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    assert lab6_merge_export.gguf_name("model.layers.0.self_attn.o_proj.weight") == "blk.0.attn_output.weight"
    assert lab6_merge_export.gguf_name("model.layers.7.post_attention_layernorm.weight") == "blk.7.ffn_norm.weight"
    assert lab6_merge_export.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    # transformers' GGUF loader undoes llama.cpp's permutation: our permutation followed by its inverse is the identity
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(3 * 2 * 4, 5)
    undo = LlamaTensorProcessor()._reverse_permute_weights(lab6_merge_export.permute_for_gguf(w, 3).numpy(), 3, 3)
    assert torch.equal(torch.from_numpy(undo), w)
    assert not torch.equal(lab6_merge_export.permute_for_gguf(w, 3), w)


def test_lab6_q4_1_gguf_holds_the_tensor_types_llama_cpp_uses(smoke_results):
    res = smoke_results("lab6")  # the tiny model: 2 layers of 7 projections, 2 norms each, a final norm
    assert res["export"]["gguf"]["q4_1"]["tensor_types"] == {"Q8_0": 1, "Q4_1": 2 * 7, "F32": 2 * 2 + 1}
    assert res["weights"]["n_layers"] == 2 * 7


def test_the_command_line_and_run_lab_name_the_labs():
    with pytest.raises(SystemExit):
        main(["lab11"])
    with pytest.raises(ValueError, match="lab must be one of lab1, lab2"):
        run_lab("labs_a")
    assert set(LABS) == {f"lab{i}" for i in range(1, 11)}
    for lab, stem in LABS.items():  # one module a lab, named as its results file
        module = common.lab_module(lab)
        assert module.__name__.endswith(stem) and callable(module.run) and module.QUESTION
        assert module.SMOKE.steps <= module.FULL.steps and module.SMOKE.eval_size <= module.FULL.eval_size


# ----------------------------------------------------------------------------------------------
# The notebook's verdicts are the results files' (issue 19: a printed ratio once swapped two methods)


def _notebook_outputs() -> str:
    nb = json.loads((common.ROOT / "notebooks" / "09_labs.ipynb").read_text())
    texts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []) if cell["cell_type"] == "code" else []:
            texts.append("".join(out.get("text", [])) + "".join(out.get("data", {}).get("text/plain", [])))
    return "\n".join(texts)


@pytest.mark.parametrize("lab", LABS)
def test_each_verdict_the_notebook_printed_is_recomputed_from_the_committed_results_file(lab):
    printed = _notebook_outputs().splitlines()
    lines = common.verdicts(lab, read_results(results_path(lab)))
    assert lines, f"{lab} has no verdicts"
    for line in lines:
        assert line in printed, (f"notebooks/09_labs.ipynb does not print {line!r}: re-execute it "
                                 "(scripts/notebook_builder.py execute notebooks/09_labs.ipynb)")


@pytest.mark.parametrize("lab", LABS)
def test_verdicts_hold_for_the_smoke_runs_too(lab, smoke_results):
    assert all(isinstance(line, str) and line for line in common.verdicts(lab, smoke_results(lab)))


def test_lab1_memory_verdict_puts_each_ratio_with_its_method():
    def trial(method, mib, **extra):
        return {"method": method, "memory": {"total": mib * MiB}, "heldout_loss": 0.1, "correct": [1, 0], **extra}

    res = {"trials": [trial("lora", 400), trial("qlora", 100), trial("full", 1000, is_full_reference=True)],
           "summary": {}}
    assert "QLoRA needs 10% of full fine-tuning's memory and 25% of LoRA's" in lab1_methods.verdicts(res)[0]


def test_lab10_spread_and_paired_differences():
    s = lab10_seeds.spread([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == 1.0 and (s["min"], s["max"], s["n"]) == (1.0, 3.0, 3)
    assert lab10_seeds.spread([0.5])["sd"] is None
    records = {"a": {0: {"x": 1.0}, 1: {"x": 2.0}, 2: {"x": 3.0}}, "b": {0: {"x": 0.5}, 2: {"x": 3.5}}}
    p = lab10_seeds.paired_over_seeds(records, "a", "b", "x")
    assert p["seeds"] == [0, 2] and p["values"] == [-0.5, 0.5] and p["negative_in"] == 1
    assert lab10_seeds.paired_over_seeds(records, "a", "missing", "x") is None


def test_few_shot_prompt_keeps_the_answer_and_shows_solved_examples():
    from qlora_edu.ch08_finetune.instruct_data import load_dataset

    train_set, heldout = load_dataset("train"), load_dataset("heldout")
    e = lab10_seeds.few_shot_example(heldout[0], train_set[:2])
    assert e.answer == heldout[0].answer and e.id == heldout[0].id
    assert e.message.endswith(heldout[0].message)
    for shot in train_set[:2]:
        assert f"Order: {shot.message}\nJSON: {shot.response}" in e.message


def test_update_baselines_shuffling_keeps_the_norm_and_destroys_low_rank_structure():
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(64, 2, generator=g) @ torch.randn(2, 48, generator=g)  # rank 2
    w = torch.randn(64, 48, generator=g)
    row = lab7_dynamics.update_baselines(dw, w, 2, torch.Generator().manual_seed(0))
    assert row["update_energy_top_r"] == pytest.approx(1.0, abs=1e-5) and row["update_rank_90"] <= 2
    assert row["shuffled_energy_top_r"] < 0.5 and row["shuffled_rank_90"] > 10
