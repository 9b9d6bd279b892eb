"""Chapter 9, labs 4, 5, 6 and 8 (``qlora_edu/ch09_labs/labs_b.py``): each lab re-run in smoke mode into a temporary
folder,
on a tiny random Llama with SmolLM2's tokenizer (the whole code path in seconds), and its results file checked:
the schema the notebook reads, and the facts that must hold whatever the budget (a hot-swapped adapter computes
exactly what it computed when trained, the bf16 GGUF reloads to the same logits, NF4 stores normal weights with
less error than Int4, dropout and checkpointing move the saved activations the right way).

The committed results (``notebooks/results/lab{4,5,6,8}_*.json``) are full runs on the course model; the last test
checks that they are there and were not produced in smoke mode.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora_edu.ch09_labs import labs_b  # noqa: E402


def _run(lab, model_dir, out):
    path = labs_b.run(lab, smoke=True, out=out, model_name=str(model_dir), progress=False)
    assert path == out / labs_b.RESULT_FILES[lab]
    payload = json.loads(path.read_text())
    assert payload["lab"] == lab and payload["smoke"] is True
    assert payload["wall_seconds"] > 0 and payload["question"].endswith("?")
    assert {"load_average_start", "load_average_end", "torch", "cpu_count"} <= set(payload["machine"])
    return payload


def test_budgets_and_cli_choices():
    assert set(labs_b.RESULT_FILES) == set(labs_b.LABS) == {"lab4", "lab5", "lab6", "lab8"}
    assert labs_b.budget_for("lab4", smoke=True).steps < labs_b.budget_for("lab4", smoke=False).steps
    assert labs_b.budget_for("lab4", smoke=False).eval_size >= 100
    assert labs_b.budget_for("lab5", smoke=False, steps=7, eval_size=9) == labs_b.Budget(7, 8, 9)
    with pytest.raises(SystemExit):
        labs_b.main(["lab3"])  # lab 3 lives in labs_a.py


def test_label_task_and_task_tokenizer():
    from qlora_edu.ch08_finetune.instruct_data import collate_examples, load_dataset, load_tokenizer

    order = load_dataset("heldout")[:3]
    labels = labs_b.as_label_examples(order)
    answer = order[0].answer
    assert labels[0].response == (f"{answer['quantity']} x {answer['item']} | {answer['city']} | "
                                  f"{answer['customer']} | {'EXPRESS' if answer['express'] else 'STANDARD'}")
    assert labs_b.score_labels([f"  {labels[0].response} ", "x", labels[2].response], labels) == [True, False, True]
    tokenizer = load_tokenizer()
    wrapped = labs_b.TaskTokenizer(tokenizer, labs_b.LABEL_INSTRUCTION)
    batch = collate_examples(wrapped, labels)
    text = tokenizer.decode(batch["input_ids"][0])
    assert labs_b.LABEL_INSTRUCTION in text and labels[0].response in text
    wrapped.padding_side = "left"  # generate_replies sets it on the wrapper: it must reach the tokenizer
    assert tokenizer.padding_side == "left"
    tokenizer.padding_side = "right"


def test_gguf_names_and_permutation():
    assert labs_b.gguf_name("model.layers.3.mlp.up_proj.weight") == "blk.3.ffn_up.weight"
    assert labs_b.gguf_name("model.layers.0.self_attn.o_proj.weight") == "blk.0.attn_output.weight"
    assert labs_b.gguf_name("model.layers.7.post_attention_layernorm.weight") == "blk.7.ffn_norm.weight"
    assert labs_b.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    # transformers' GGUF loader undoes llama.cpp's permutation: our permutation followed by its inverse is the identity
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(3 * 2 * 4, 5)
    undo = LlamaTensorProcessor()._reverse_permute_weights(labs_b.permute_for_gguf(w, 3).numpy(), 3, 3)
    assert torch.equal(torch.from_numpy(undo), w)
    assert not torch.equal(labs_b.permute_for_gguf(w, 3), w)


def test_lab4_smoke(tiny_model_dir, tmp_path):
    p = _run("lab4", tiny_model_dir, tmp_path)
    rows = p["formats"]
    assert list(rows) == list(labs_b.FORMATS)
    assert p["nf4_shortcut_max_abs_diff"] == 0.0  # dequantize-once computes what NF4Linear computes
    assert rows["bf16"]["weight_relative_rmse"] == 0.0
    assert math.isclose(rows["nf4"]["bits_per_weight"], 4.126953125)
    # normal (randomly initialized) weights: NF4 stores them with less error than Int4 (chapter 2's result)
    assert 0 < rows["nf4"]["weight_relative_rmse"] < rows["int4"]["weight_relative_rmse"]
    for fmt, row in rows.items():
        assert len(row["losses"]) == p["budget"]["steps"]
        assert len(row["correct"]) == p["n_eval"] and 0.0 <= row["score"] <= 1.0
        assert row["base_perplexity"] > 1 and row["heldout_loss_after"] > 0
        assert ("vs_bf16" in row) == (fmt != "bf16")


def test_lab4_parts_merge_into_one_result(tmp_path):
    def part(formats, correct, wall):
        rows = {f: {"correct": c, "score": sum(c) / len(c)} for f, c in zip(formats, correct, strict=True)}
        return {"lab": "lab4", "smoke": False, "config": {"steps": 3}, "formats": rows, "wall_seconds": wall,
                "machine": {"load_average_start": 1.0, "load_average_end": 2.0}}

    paths = []
    for i, (formats, correct) in enumerate(((["int4", "nf4"], [[True, False], [True, True]]),
                                            (["fp4", "bf16"], [[False, False], [True, True]]))):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(part(formats, correct, 10.0 * (i + 1))))
    merged = labs_b.merge_lab4_parts(paths)
    assert list(merged["formats"]) == list(labs_b.FORMATS) and merged["wall_seconds"] == 30.0
    assert merged["formats"]["nf4"]["vs_bf16"]["difference"] == 0.0
    assert merged["formats"]["fp4"]["vs_bf16"]["difference"] == -1.0
    assert "vs_bf16" not in merged["formats"]["bf16"] and len(merged["parts"]) == 2
    with pytest.raises(ValueError, match="not all"):
        labs_b.merge_lab4_parts(paths[:1])


def test_lab5_smoke(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from qlora_edu.ch06_lora.lora import lora_param_count

    p = _run("lab5", tiny_model_dir, tmp_path)
    assert p["exact"]["orders_equals_trained"] and p["exact"]["label_equals_trained"]
    assert p["exact"]["switch_back_equal"]
    mem = p["memory"]
    expected = 4 * lora_param_count(AutoConfig.from_pretrained(tiny_model_dir), p["config"]["lora_r"])
    assert mem["orders_adapter_bytes"] == mem["label_adapter_bytes"] == expected == 4 * p["adapter_parameters"]
    assert mem["added_by_orders_bytes"] == mem["added_by_label_bytes"] == expected
    assert set(p["matrix"]) == {"base", "orders", "label"}
    assert all(set(row) == {"orders", "label"} for row in p["matrix"].values())
    assert 0 < p["seconds"]["set_adapter_median"] < p["seconds"]["load_label_adapter"]
    assert len(p["losses"]["orders"]) == len(p["losses"]["label"]) == p["budget"]["steps"]


def test_lab6_smoke(tiny_model_dir, tmp_path):
    p = _run("lab6", tiny_model_dir, tmp_path)
    export = p["export"]
    assert export["safetensors_logits_equal"] and export["gguf_bf16_logits_equal"]
    assert export["gguf_bf16_max_abs_diff"] == 0.0 and export["gguf_q4_1_max_abs_diff"] > 0
    # GGUF stores floats in float32 (rms_norm_eps 1e-6 comes back as 9.99999997e-07)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in export["config_roundtrip"].values())
    layers = 7 * 2
    assert export["gguf"]["q4_1"]["tensor_types"] == {"Q8_0": 1, "Q4_1": layers, "F32": 2 * 2 + 1}
    assert export["gguf"]["q4_1"]["bytes"] < export["gguf"]["bf16"]["bytes"]
    assert p["weights"]["n_layers"] == layers
    assert p["logits_vs_a"]["a_unmerged_qlora"]["kl"] == 0.0
    assert set(p["scores"]) == {"a_unmerged_qlora", "b_merged_bf16", "c_merged_requantized_nf4",
                                "d_exported_bf16", "e_gguf_q4_1"}


def test_lab8_smoke(tiny_model_dir, tmp_path):
    p = _run("lab8", tiny_model_dir, tmp_path)
    rows = {(r["method"], r["checkpointing"], r["lora_dropout"]): r for r in p["rows"]}
    assert set(rows) == {("qlora", c, d) for c in (False, True) for d in (0.05, 0.0)} | {
        ("full", c, None) for c in (False, True)}
    for r in p["rows"]:
        # chapter 4's model, within 1% (it leaves out a few scalars, and the masks of padded batches)
        assert math.isclose(r["forward_saved_bytes"], r["predicted_saved_bytes"], rel_tol=0.01)
        assert r["peak_held_bytes"] >= r["forward_saved_bytes"] > 0
    # without checkpointing, dropout's copies are extra saved tensors; with it, every layer keeps only its input
    assert rows[("qlora", False, 0.05)]["forward_saved_bytes"] > rows[("qlora", False, 0.0)]["forward_saved_bytes"]
    assert rows[("qlora", True, 0.05)]["forward_saved_bytes"] == rows[("qlora", True, 0.0)]["forward_saved_bytes"]
    assert rows[("qlora", True, 0.0)]["forward_saved_bytes"] < rows[("qlora", False, 0.0)]["forward_saved_bytes"]
    assert len(p["llama7b_gpu_predicted"]) == 8


@pytest.mark.parametrize("lab", ["lab4", "lab5", "lab6", "lab8"])
def test_committed_results_are_full_runs(lab):
    path = labs_b.DEFAULT_OUT / labs_b.RESULT_FILES[lab]
    assert path.is_file(), f"{path} missing: run `python qlora_edu/ch09_labs/labs_b.py {lab}`"
    payload = json.loads(path.read_text())
    assert payload["lab"] == lab and payload["smoke"] is False and payload["wall_seconds"] > 0
