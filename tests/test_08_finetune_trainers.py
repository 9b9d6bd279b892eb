"""Chapter 8's practitioner's path (qlora_edu/ch08_finetune/hf_trainers.py): the fine-tune through transformers'
Trainer and TRL's SFTTrainer, on the tiny random Llama (tests/conftest.py), two optimizer steps each."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_edu.ch08_finetune import hf_trainers
from qlora_edu.ch08_finetune.finetune import default_config, learning_rate_at, load_qlora_model
from qlora_edu.ch08_finetune.instruct_data import IGNORE_INDEX, collate_examples, encode_example, load_dataset
from qlora_edu.common.device import pick_compute

# Two steps of two examples, one example a micro-batch (accumulation 2), warm-up over half the steps: the course's
# schedule would give step 0 a learning rate of 0; transformers' "constant" must ignore the warm-up.
CONFIG = default_config("cpu", smoke=True, steps=2, batch_size=2, warmup_ratio=0.5, learning_rate=1e-3)


@pytest.fixture(scope="module")
def compute():
    return pick_compute("cpu", "float32")


@pytest.fixture(scope="module")
def examples():
    return load_dataset("train")[:8]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("trainer", ["hf", "trl"])
def test_library_path_trains_two_steps_with_the_papers_constant_schedule(trainer, tiny_model_dir, compute, examples,
                                                                          tmp_path):
    if trainer == "trl":
        pytest.importorskip("trl", reason="TRL is in the dev extra (pip install -e .[dev])")
    model, tokenizer = load_qlora_model(tiny_model_dir, config=CONFIG, compute=compute, progress=False)
    before = _trainable(model)
    train = hf_trainers.train_with_hf_trainer if trainer == "hf" else hf_trainers.train_with_sft_trainer
    record = train(model, tokenizer, examples, CONFIG, compute=compute, accumulation=2, output_dir=tmp_path)
    assert len(record.losses) == len(record.step_seconds) == len(record.tokens) == CONFIG.steps
    assert all(math.isfinite(x) and x > 0 for x in record.losses)
    # "constant" ignores the warm-up: every step at the peak rate, where the course's loop starts from 0
    assert learning_rate_at(0, CONFIG) == 0.0
    assert record.learning_rates == [CONFIG.learning_rate] * CONFIG.steps
    assert all(t > 0 for t in record.tokens) and record.tokens_per_second > 0
    after = _trainable(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any("lora_B" in n for n in changed), "training left every lora_B at its zero initialization"
    assert all("lora_" in n for n in changed), "a frozen weight changed"


def test_response_only_collator_is_the_courses_batch(tiny_model_dir, examples):
    from qlora_edu.ch08_finetune.instruct_data import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    collator = hf_trainers.ResponseOnlyCollator(tokenizer, examples)
    features = [{"input_ids": encode_example(tokenizer, examples[i])[0], "index": i} for i in (3, 0, 5)]
    batch = collator(features)
    expected = collate_examples(tokenizer, [examples[i] for i in (3, 0, 5)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert torch.equal(batch[key], expected[key])
    prompt = expected["prompt_lengths"][0]
    assert (batch["labels"][0, :prompt] == IGNORE_INDEX).all() and (batch["labels"][0, prompt:] != IGNORE_INDEX).any()
    assert collator.tokens == [int(expected["attention_mask"].sum())]


def test_trl_completion_is_the_courses_response_plus_the_templates_newline(tiny_model_dir, examples):
    """TRL's completion is what the template renders after the prompt: the course's response tokens (ending with
    ``<|im_end|>``) and, for SmolLM2's template, the newline after it."""
    from qlora_edu.ch08_finetune.instruct_data import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    row = hf_trainers._prompt_completion(examples[0])
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
    full = full["input_ids"] if not isinstance(full, list) else full
    ids, prompt_length = encode_example(tokenizer, examples[0])
    assert full[:len(ids)] == ids
    assert tokenizer.decode(full[len(ids):]) == "\n"


def test_paper_arguments_match_artidoro_qlora(compute, tmp_path):
    from transformers import TrainingArguments

    config = default_config("cpu", smoke=False)
    kwargs = hf_trainers.paper_trainer_arguments(config, output_dir=tmp_path, compute=compute, accumulation=2)
    args = TrainingArguments(**kwargs)
    assert args.optim == "paged_adamw_32bit" and args.lr_scheduler_type == "constant"
    assert args.max_grad_norm == 0.3 and args.weight_decay == 0.0 and args.adam_beta2 == 0.999
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == config.batch_size
    assert args.train_sampling_strategy == "group_by_length" and args.activation_checkpointing
    # every argument set is explained in the module's table
    explained = {"output_dir", "adam_beta1", "dataloader_num_workers", "disable_tqdm", "fp16"}
    missing = [k for k in kwargs if k not in explained and f"``{k}" not in hf_trainers.__doc__]
    assert not missing, f"the module's table lacks {missing}"
    with pytest.raises(ValueError, match="accumulation"):
        hf_trainers.paper_trainer_arguments(config, output_dir=tmp_path, compute=compute, accumulation=3)
    assert [hf_trainers.default_accumulation(b) for b in (2, 4, 8, 16, 6)] == [1, 1, 2, 4, 1]


def test_command_line_passes_the_run_options_to_each_child():
    argv = ["--side-by-side", "--seeds", "0", "1", "--parallel", "--steps", "10", "--out", "x.json", "--no-generate"]
    assert hf_trainers._strip(argv, {"--side-by-side": 0, "--seeds": 2, "--out": 1, "--parallel": 0}) == [
        "--steps", "10", "--no-generate"]
    with pytest.raises(ValueError, match="trainer must be one of"):
        hf_trainers.run_trainer("keras")


def _run(trainer: str, seed: int, after: float, loss: float) -> dict:
    return {"trainer": trainer, "config": {"seed": seed}, "losses": [1.0, 0.5], "learning_rates": [1e-3, 1e-3],
            "before": 0.0, "after": after, "heldout_loss_before": 1.0, "heldout_loss_after": loss,
            "gain_interval_95": [after - 0.05, after], "seconds_per_step": 1.0, "tokens_per_s": 10.0,
            "peak_memory_bytes": None, "process_max_rss_bytes": 1, "micro_batch": 4, "accumulation": 2,
            "exact_match_measured": True}


def test_side_by_side_verdicts_compare_the_trainers_with_their_own_spread():
    """The verdict follows the numbers: trainers whose means differ less than one trainer's spread over seeds agree;
    a gap larger than every trainer's spread is reported as such; one seed gives no verdict."""
    close = [_run(t, s, 0.9 + 0.04 * s, 0.10 + 0.02 * s) for s in (0, 1) for t in hf_trainers.TRAINERS]
    verdicts = hf_trainers.side_by_side_verdicts({"figure": hf_trainers._figure(close, hf_trainers.TRAINERS)})
    assert all("agree within the run-to-run spread" in v for v in verdicts), verdicts
    apart = [_run(t, s, 0.9 if t == "course" else 0.5, 0.10 if t == "course" else 0.30)
             for s in (0, 1) for t in hf_trainers.TRAINERS]
    verdicts = hf_trainers.side_by_side_verdicts({"figure": hf_trainers._figure(apart, hf_trainers.TRAINERS)})
    assert all("beyond the run-to-run spread" in v for v in verdicts), verdicts
    one = [_run(t, 0, 0.9, 0.1) for t in hf_trainers.TRAINERS]
    verdicts = hf_trainers.side_by_side_verdicts({"figure": hf_trainers._figure(one, hf_trainers.TRAINERS)})
    assert all("no verdict" in v for v in verdicts), verdicts


def test_committed_side_by_side_is_a_full_run_at_several_seeds():
    """The run lesson 8 reads: full mode, every trainer at the same two or more seeds, exact match measured before
    and after with its interval, and the lesson's verdicts computed from it."""
    import json

    from conftest import ROOT

    results = json.loads((ROOT / "notebooks" / "results" / "08_trainers.json").read_text())
    header, runs = results["header"], results["runs"]
    assert header["mode"] == "full" and len(header["budget"]["seeds"]) >= 2
    assert {(r["trainer"], r["config"]["seed"]) for r in runs} == {
        (t, s) for t in hf_trainers.TRAINERS for s in header["budget"]["seeds"]}
    for r in runs:
        assert r["exact_match_measured"] and r["n_eval"] == header["budget"]["eval_size"]
        low, high = r["gain_interval_95"]
        assert low <= r["gain"] <= high and 0 <= r["before"] <= 1 and 0 <= r["after"] <= 1
        assert len(r["losses"]) == header["budget"]["steps"]
    assert results["figure"] == hf_trainers._figure(runs, hf_trainers.TRAINERS)
    assert len(hf_trainers.side_by_side_verdicts(results)) == 2


def test_merge_joins_parts_of_the_same_budget(tmp_path):
    import json

    def part(seeds, command):
        runs = [_run(t, s, 0.8, 0.1) | {"config": {"seed": s}} for s in seeds for t in hf_trainers.TRAINERS]
        header = {"model": "m", "device": "cpu", "dtype": "bfloat16", "mode": "full", "wall_seconds": 10.0,
                  "cpu_seconds": 9.0, "load_average_start": [1.0], "load_average_end": [2.0], "command": command,
                  "created_utc": "2026-12-04T00:00:00Z",
                  "budget": {"steps": 2, "batch_size": 8, "eval_size": 4, "seeds": list(seeds)}}
        return {"header": header, "runs": runs, "figure": hf_trainers._figure(runs, hf_trainers.TRAINERS)}

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(part([0, 1], "first")))
    b.write_text(json.dumps(part([2], "second")))
    merged = hf_trainers.merge_results([a, b], out=tmp_path / "m.json")
    assert merged["header"]["budget"]["seeds"] == [0, 1, 2] and merged["header"]["wall_seconds"] == 20.0
    assert [p["command"] for p in merged["header"]["parts"]] == ["first", "second"]
    assert merged["figure"]["spread"]["n_seeds"] == 3
    assert json.loads((tmp_path / "m.json").read_text()) == merged
    with pytest.raises(ValueError, match="twice"):
        hf_trainers.merge_results([a, a], out=tmp_path / "x.json")
    other = part([3], "third")
    other["header"]["budget"]["steps"] = 3
    c.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="budget"):
        hf_trainers.merge_results([a, c], out=tmp_path / "x.json")
