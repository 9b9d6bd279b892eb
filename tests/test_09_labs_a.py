"""Chapter 9, labs 1, 2, 3, 7 and 9 (``qlora_edu/ch09_labs/labs_a.py``): every lab re-run in smoke mode on a tiny
random Llama
that uses SmolLM2's real tokenizer (two steps, four held-out orders), its results file checked for schema and sanity;
the lab's own mathematics (the low-rank SVD, the spectrum summaries, the subspace overlap, the equal-budget ranks,
the held-out loss, trials per GPU) against independent references; and the committed results files, which the
notebook reads, checked to be full (not smoke) runs with the same schema. No test loads the real model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora_edu.ch08_finetune.instruct_data import load_dataset
from qlora_edu.ch09_labs import labs_a  # noqa: E402

MiB = 2**20


# ----------------------------------------------------------------------------------------------
# Fixtures: one smoke run of each lab on the tiny random Llama of tests/conftest.py


@pytest.fixture(scope="module")
def ctx(tiny_model_dir):
    return labs_a.Context.create(str(tiny_model_dir), progress=False)


@pytest.fixture(scope="module")
def smoke_results(ctx, tmp_path_factory):
    """Each lab run once in smoke mode into a temporary folder (not the committed one)."""
    out = tmp_path_factory.mktemp("results")
    cache = {}

    def get(lab):
        if lab not in cache:
            path = labs_a.run_lab(lab, smoke=True, out=out, ctx=ctx)
            assert path == out / labs_a.FILES[lab]
            cache[lab] = json.loads(path.read_text())
        return cache[lab]

    return get


# ----------------------------------------------------------------------------------------------
# Schema and sanity of a results file (used on the smoke runs and on the committed files)


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def check_common(res: dict, lab: str, smoke: bool) -> None:
    assert res["lab"] == lab and res["smoke"] is smoke
    for key in ("question", "model", "device", "dtype", "budget", "versions", "command", "created_utc"):
        assert key in res, key
    # the run that wrote the file: about 0 s when it found every trial already trained (lab 7 after lab 1)
    assert res["wall_seconds"] >= 0 and res["cpu_seconds"] >= 0
    # but every trial was trained somewhere, and says how long that took
    assert all(t["wall_seconds"] > 0 and t["cpu_seconds"] > 0 for t in res["trials"])
    assert len(res["load_average_start"]) == 3
    assert lab in res["command"]


def check_trial(t: dict, budget: dict, *, scored: bool, memory: bool) -> None:
    assert len(t["losses"]) == budget["steps"], "one training loss per step"
    assert all(_finite(x) and x > 0 for x in t["losses"])
    assert t["trainable_params"] > 0
    assert t["train_seconds"] > 0 and t["train_cpu_seconds"] > 0 and t["wall_seconds"] >= t["train_seconds"]
    assert _finite(t["heldout_loss"]) and t["heldout_loss"] > 0
    if t["method"] == "full":
        assert t["r"] is None and t["targets"] is None
    else:
        assert t["r"] >= 1 and set(t["targets"]) <= set(labs_a.LLAMA_TARGETS)
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
    assert methods.count("full") == (1 if smoke else len(labs_a.FULL_LRS))
    for t in res["trials"]:
        check_trial(t, res["budget"], scored=True, memory=True)
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
    assert ranks == list(labs_a.RANKS[:2] if smoke else labs_a.RANKS)
    for t in res["trials"]:
        check_trial(t, res["budget"], scored=True, memory=True)
        assert t["method"] == "qlora" and t["alpha"] == 16.0
        assert t["trainable_params"] == t["predicted_trainable_params"]
    params = [t["trainable_params"] for t in res["trials"]]
    assert all(p2 == p1 * r2 // r1 for p1, p2, r1, r2 in zip(params, params[1:], ranks, ranks[1:], strict=False))
    states = [t["memory"]["optimizer_states"] for t in res["trials"]]
    assert states == sorted(states) and states[0] < states[-1]


def check_lab3(res: dict, smoke: bool) -> None:
    trials = res["trials"]
    assert [t["target_set"] for t in trials] == list(labs_a.TARGET_SETS)
    for t in trials:
        check_trial(t, res["budget"], scored=True, memory=False)
        assert t["alpha"] == t["r"]
    budget = res["summary"]["budget_params"]
    for t in trials:  # the rank rounding keeps every set within a few % of the budget
        assert abs(t["trainable_params"] - budget) <= 0.05 * budget
    assert trials[0]["r"] > trials[1]["r"] > trials[2]["r"] == labs_a.BUDGET_RANK


def check_lab7(res: dict, smoke: bool) -> None:
    assert [t["method"] for t in res["trials"]] == ["full", "lora", "qlora"]
    for t in res["trials"]:
        check_trial(t, res["budget"], scored=False, memory=False)
    rows = res["matrices"]
    assert {r["module"] for r in rows} == set(labs_a.LLAMA_TARGETS)
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
    assert set(res["spectra"]) == set(labs_a.LLAMA_TARGETS)
    for spectra in res["spectra"].values():
        for values in spectra.values():
            assert values == sorted(values, reverse=True) and values[0] > 0


def check_lab9(res: dict, smoke: bool) -> None:
    for t in res["trials"]:
        check_trial(t, res["budget"], scored=True, memory=False)
    assert len(res["trials"]) == (1 if smoke else len(labs_a.SWEEP_LRS) * len(labs_a.SWEEP_RANKS))
    facts = res["gpu_facts_7b"]
    assert facts["qlora"]["trials_per_24gb"] > facts["lora"]["trials_per_24gb"] >= 1
    if res["gpu_trials_error"] is None:
        rows = {(r["method"], r["batch"], r["seq"]): r for r in res["gpu_trials"]}
        for b, s in labs_a.SEVEN_B_SHAPES:
            q, lo, fu = (rows[(m, b, s)] for m in ("qlora", "lora", "full"))
            assert q["predicted_total_bytes"] < lo["predicted_total_bytes"] < fu["predicted_total_bytes"]
            assert q["trials_per_24gb"] >= lo["trials_per_24gb"] >= fu["trials_per_24gb"]
            assert fu["trials_per_24gb"] == 0  # full fine-tuning of 7B does not fit 24 GB


CHECKS = {"lab1": check_lab1, "lab2": check_lab2, "lab3": check_lab3, "lab7": check_lab7, "lab9": check_lab9}


@pytest.mark.parametrize("lab", labs_a.LABS)
def test_lab_smoke_run_writes_a_sane_results_file(lab, smoke_results):
    res = smoke_results(lab)
    check_common(res, lab, smoke=True)
    assert res["budget"] == {**vars(labs_a.SMOKE_BUDGET), "eval_size": res["budget"]["eval_size"]}
    CHECKS[lab](res, smoke=True)


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
    first = labs_a.Context.create(str(tiny_model_dir), progress=False)
    lab1 = json.loads(labs_a.run_lab("lab1", smoke=True, out=tmp_path, ctx=first).read_text())
    fresh = labs_a.Context.create(str(tiny_model_dir), progress=False)  # another process: nothing in memory
    lab2 = json.loads(labs_a.run_lab("lab2", smoke=True, out=tmp_path, ctx=fresh).read_text())
    check_lab2(lab2, smoke=True)
    qlora = next(t for t in lab1["trials"] if t["method"] == "qlora")
    r16 = next(t for t in lab2["trials"] if t["r"] == 16)
    assert r16["reused_from"] == "lab1" and r16["correct"] == qlora["correct"] and "relative_to_full" not in r16
    assert "reused_from" not in next(t for t in lab2["trials"] if t["r"] == 8)  # trained here


def test_an_interrupted_run_resumes_from_the_cache_folder(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    first = labs_a.Context.create(str(tiny_model_dir), progress=False, cache_dir=cache)
    lab7 = json.loads(labs_a.run_lab("lab7", smoke=True, out=tmp_path / "a", ctx=first).read_text())
    assert all("reused_from" not in t for t in lab7["trials"])
    again = labs_a.Context.create(str(tiny_model_dir), progress=False, cache_dir=cache)  # a new process
    redo = json.loads(labs_a.run_lab("lab7", smoke=True, out=tmp_path / "b", ctx=again).read_text())
    assert [t["reused_from"] for t in redo["trials"]] == ["lab7"] * 3
    assert redo["matrices"] == lab7["matrices"]  # the kept weight updates give the same spectra


def test_lab7_alone_trains_its_own_three_runs(tiny_model_dir, tmp_path):
    ctx = labs_a.Context.create(str(tiny_model_dir), progress=False)
    res = json.loads(labs_a.run_lab("lab7", smoke=True, out=tmp_path, ctx=ctx).read_text())
    check_lab7(res, smoke=True)
    assert all("reused_from" not in t for t in res["trials"]) and not ctx.updates


@pytest.mark.parametrize("lab", labs_a.LABS)
def test_committed_results_are_full_runs_with_the_same_schema(lab):
    path = labs_a.RESULTS / labs_a.FILES[lab]
    assert path.is_file(), f"{path} is missing: run python qlora_edu/ch09_labs/labs_a.py {lab}"
    res = json.loads(path.read_text())
    check_common(res, lab, smoke=False)
    assert res["budget"] == vars(labs_a.FULL_BUDGETS[lab]), "the committed file was made with another budget"
    CHECKS[lab](res, smoke=False)


# ----------------------------------------------------------------------------------------------
# The labs' mathematics against independent references


def test_low_rank_svd_matches_the_svd_of_the_product():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(96, 8, generator=g, dtype=torch.float64), torch.randn(8, 64, generator=g, dtype=torch.float64)
    s, u = labs_a.low_rank_svd(b, a)
    u_ref, s_ref, _ = torch.linalg.svd(b @ a)
    torch.testing.assert_close(s, s_ref[:8])
    # the same left singular vectors up to sign: |<u_i, u_ref_i>| = 1
    torch.testing.assert_close((u * u_ref[:, :8]).sum(0).abs(), torch.ones(8, dtype=torch.float64))


def test_spectrum_stats_on_a_matrix_of_known_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.0])  # energies 16, 4, 1, 1: total 22
    st = labs_a.spectrum_stats(s, r=2)
    assert st["energy_top_r"] == pytest.approx(20 / 22)
    assert st["rank_90"] == 2  # 20/22 = 0.909 >= 0.9
    assert st["stable_rank"] == pytest.approx(22 / 16)
    assert st["frobenius"] == pytest.approx(math.sqrt(22))
    assert labs_a.spectrum_stats(torch.ones(5), r=5)["rank_90"] == 5  # flat spectrum: 90% needs all five


def test_subspace_overlap_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert labs_a.subspace_overlap(q[:, :4], q[:, :4] @ rot) == pytest.approx(1.0)  # another basis, same subspace
    assert labs_a.subspace_overlap(q[:, :4], q[:, 4:8]) == pytest.approx(0.0, abs=1e-12)
    assert labs_a.subspace_overlap(q[:, :4], q[:, 2:6]) == pytest.approx(0.5)


def test_equal_budget_ranks_match_hand_counted_parameters():
    from transformers import LlamaConfig

    # SmolLM2-135M's shape: hidden 576, MLP 1536, 9 heads / 3 KV heads of 64, 30 layers
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, num_hidden_layers=30, vocab_size=49152)
    per_rank = {"q_proj": 576 + 576, "k_proj": 576 + 192, "v_proj": 576 + 192, "o_proj": 576 + 576,
                "gate_proj": 576 + 1536, "up_proj": 576 + 1536, "down_proj": 1536 + 576}  # r (in + out) per layer
    budget = 30 * labs_a.BUDGET_RANK * sum(per_rank.values())
    ranks = labs_a.equal_budget_ranks(config)
    assert ranks["all seven"] == labs_a.BUDGET_RANK
    for name, targets in labs_a.TARGET_SETS.items():
        per = 30 * sum(per_rank[t] for t in targets)
        assert ranks[name] == round(budget / per)


def test_heldout_loss_is_the_token_weighted_cross_entropy(tiny_model_dir, ctx):
    from transformers import LlamaForCausalLM

    from qlora_edu.ch08_finetune.instruct_data import collate_examples

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    examples = load_dataset("heldout")[:5]
    got = labs_a.heldout_loss(model, ctx.tokenizer, examples, batch_size=2)  # batches of 2, 2 and 1
    batch = collate_examples(ctx.tokenizer, examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert got == pytest.approx(float(want), rel=1e-4)


def test_trials_per_gpu_counts_one_context_per_process():
    gib = 2**30
    assert labs_a.trials_per_gpu(int(7.5 * gib), gpu_bytes=24 * gib, context_bytes=gib // 2) == 3
    assert labs_a.trials_per_gpu(int(7.6 * gib), gpu_bytes=24 * gib, context_bytes=gib // 2) == 2
    assert labs_a.trials_per_gpu(30 * gib, gpu_bytes=24 * gib, context_bytes=gib // 2) == 0


def test_cli_rejects_an_unknown_lab():
    with pytest.raises(SystemExit):
        labs_a.main(["lab4"])
    with pytest.raises(ValueError, match="lab must be one of"):
        labs_a.run_lab("lab4", smoke=True)
