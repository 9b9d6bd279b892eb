"""Chapter 8, the full QLoRA fine-tune: the battery of ``mask_prompt_labels``; the data set (deterministic, committed,
held-out names unseen); the chat-template encoding against an independent construction; the exact scorer and the
statistics against scipy; the schedule against transformers; and, on a tiny random Llama that uses SmolLM2's real
tokenizer, the whole pipeline: 4-bit loading + peft, atomic saves that survive an injected crash, reload with
``PeftModel.from_pretrained`` (same logits), resume after an interruption (same numbers as an uninterrupted run), the
course's own NF4 path, and the command line (its last line is JSON). GPU tests train both paths on CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from chapter_battery import battery_tests

from conftest import ROOT
from qlora_edu.ch08_finetune.finetune import (
    COURSE_SCHEDULE,
    FinetuneConfig,
    atomic_directory,
    batch_indices,
    build_optimizer,
    default_config,
    evaluate,
    heldout_loss,
    inference_mode,
    learning_rate_at,
    load_checkpoint,
    load_finetuned,
    load_qlora_model,
    paper_config,
    prepare_qlora,
    save_adapter,
    save_checkpoint,
    train,
)
from qlora_edu.ch08_finetune.instruct_data import (
    IGNORE_INDEX,
    Example,
    build_messages,
    collate_examples,
    encode_example,
    field_accuracy,
    generate_dataset,
    load_dataset,
    load_tokenizer,
    mask_prompt_labels,
    paired_bootstrap_interval,
    parse_answer,
    score_answers,
    sign_test_p_value,
)
from qlora_edu.common.training_setup import bnb_config

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("08_finetune")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# ----------------------------------------------------------------------------------------------
# The data set


def test_committed_data_is_what_the_generator_writes():
    fresh = generate_dataset()
    for split in ("train", "heldout"):
        committed = load_dataset(split)
        assert [(e.id, e.message, e.answer) for e in committed] == [(e.id, e.message, e.answer) for e in fresh[split]]
    out = subprocess.run([sys.executable, "scripts/make_finetune_data.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_heldout_is_large_and_its_names_are_unseen():
    train_set, heldout = load_dataset("train"), load_dataset("heldout")
    assert len(heldout) >= 100 and len(train_set) >= 1000
    train_text = " ".join(e.message for e in train_set)
    for e in heldout:
        first, last = e.answer["customer"].split()
        assert first not in train_text and last not in train_text and e.answer["city"] not in train_text, e
    # every kind of hard case is represented in the held-out split
    messages = " ".join(e.message for e in heldout)
    assert "dozen" in messages and "a pair of" in messages
    assert 0.15 < sum(e.answer["express"] for e in heldout) / len(heldout) < 0.5
    assert {e.answer["item"] for e in heldout} >= {"shelf", "knife", "battery", "box"}


def test_generator_is_deterministic_and_answers_are_consistent():
    a, b = generate_dataset(seed=3, n_train=50, n_heldout=20), generate_dataset(seed=3, n_train=50, n_heldout=20)
    assert a == b
    assert a != generate_dataset(seed=4, n_train=50, n_heldout=20)
    for e in a["train"] + a["heldout"]:
        assert list(e.answer) == ["customer", "item", "quantity", "city", "express"]
        assert e.answer["customer"] in e.message and e.answer["city"] in e.message
        assert isinstance(e.answer["quantity"], int) and isinstance(e.answer["express"], bool)
        assert json.loads(e.response) == e.answer


# ----------------------------------------------------------------------------------------------
# Encoding with the chat template, and the labels


def test_encode_example_matches_an_independent_construction(tokenizer):
    """The prompt tokenized alone (chat template text, add_generation_prompt) + the response + the end token."""
    for e in load_dataset("heldout")[:10]:
        ids, prompt_length = encode_example(tokenizer, e)
        text = tokenizer.apply_chat_template(build_messages(e), add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        response = tokenizer(e.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert prompt_length == len(prompt)
        assert ids == prompt + response
        assert tokenizer.decode(ids[:prompt_length]).endswith("<|im_start|>assistant\n")


def test_collated_labels_decode_to_the_replies(tokenizer):
    examples = load_dataset("train")[:6]
    batch = collate_examples(tokenizer, examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, e in enumerate(examples):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tokenizer.decode(kept) == e.response + "<|im_end|>"
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == IGNORE_INDEX).all()


@pytest.mark.parametrize(("args", "error", "name"), [
    ((torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.long), torch.ones(2, 3)), ValueError,
     "input_ids"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)),
     ValueError, "prompt_lengths"),
    ((torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 4]), torch.ones(2, 3, dtype=torch.long)), ValueError,
     "prompt_lengths"),
    ((torch.zeros(1, 3, dtype=torch.long), torch.tensor([1]), torch.tensor([[0, 1, 1]])), ValueError,
     "right-padded"),
    ((torch.zeros(1, 3, dtype=torch.long), torch.tensor([1]), torch.tensor([[1, 2, 0]])), ValueError, "0 and 1"),
    ((torch.zeros(1, 3, dtype=torch.long), torch.tensor([1]), torch.ones(1, 3)), TypeError, "attention_mask"),
])
def test_mask_prompt_labels_rejects_bad_input(args, error, name):
    with pytest.raises(error, match=name):
        mask_prompt_labels(*args)


# ----------------------------------------------------------------------------------------------
# Scoring and statistics


def test_parse_and_score_are_exact():
    e = Example("x", "m", {"customer": "Maya Novak", "item": "shelf", "quantity": 6, "city": "Cape Town",
                           "express": True})
    good = json.dumps(e.answer)
    reordered = json.dumps(dict(reversed(list(e.answer.items()))))
    replies = [good, f"Sure! ```json\n{good}\n``` Anything else?", reordered,
               good.replace("6", '"6"'), good.replace("6", "6.0"), good.replace("true", "1"),
               good.replace("shelf", "shelves"), good[:-1], "", "[1, 2]", good + " {not json}"]
    assert score_answers(replies, [e] * len(replies)) == [True, True, True, False, False, False, False, False,
                                                           False, False, True]
    assert parse_answer("no object here") is None and parse_answer('{"a": 1} and {"b": 2}') == {"a": 1}


def test_field_accuracy_locates_the_errors():
    examples = load_dataset("heldout")[:4]
    wrong_express = dict(examples[1].answer, express=not examples[1].answer["express"])
    item_only = json.dumps({"item": examples[3].answer["item"]})
    replies = [examples[0].response, json.dumps(wrong_express), "no json", item_only]
    acc = field_accuracy(replies, examples)
    assert acc == {"valid_json": 0.75, "customer": 0.5, "item": 0.75, "quantity": 0.5, "city": 0.5, "express": 0.25}


def test_sign_test_matches_scipy():
    from scipy.stats import binomtest

    for fixed, broken, same in [(30, 2, 60), (5, 5, 10), (0, 3, 7), (12, 0, 100), (1, 0, 0)]:
        before = [False] * fixed + [True] * broken + [True] * same
        after = [True] * fixed + [False] * broken + [True] * same
        expected = binomtest(min(fixed, broken), fixed + broken, 0.5).pvalue
        assert math.isclose(sign_test_p_value(before, after), expected, rel_tol=1e-9)
    assert sign_test_p_value([True, False], [True, False]) == 1.0


def test_paired_bootstrap_interval():
    gain, low, high = paired_bootstrap_interval([False] * 200, [True] * 200)
    assert (gain, low, high) == (1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(0)
    before = (torch.rand(400, generator=g) < 0.3).tolist()
    after = (torch.rand(400, generator=g) < 0.6).tolist()
    gain, low, high = paired_bootstrap_interval(before, after)
    diff = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    assert gain == pytest.approx(float(diff.mean()))
    half_width_normal = 1.96 * float(diff.std()) / math.sqrt(len(diff))  # the normal approximation
    assert low < gain < high
    assert (high - low) / 2 == pytest.approx(half_width_normal, rel=0.1)
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_interval([True], [True, False])


# ----------------------------------------------------------------------------------------------
# The recipe, the schedule, the batches


def test_paper_config_is_artidoro_qlora():
    c = paper_config()
    assert (c.learning_rate, c.warmup_ratio, c.max_grad_norm, c.lora_r, c.lora_alpha, c.optimizer, c.weight_decay,
            c.gradient_checkpointing, c.steps, c.batch_size, c.lora_dropout) == (
        2e-4, 0.0, 0.3, 64, 16, "paged_adamw", 0.0, True, 1875, 16, 0.1)  # artidoro/qlora's 7B script
    assert set(c.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    cpu, gpu = default_config("cpu", smoke=False), default_config("cuda", smoke=False)
    assert (cpu.learning_rate, cpu.lora_r, cpu.lora_alpha, cpu.batch_size) == (1e-3, 16, 16, 8)
    assert replace(gpu, steps=1875) == replace(c, **COURSE_SCHEDULE)  # the course keeps a warm-up and 0.05
    assert default_config("cpu", smoke=True).steps < 10
    q = bnb_config(torch.bfloat16)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        True, "nf4", True, torch.bfloat16)


def test_paper_schedule_is_transformers_constant_which_ignores_warmup():
    """artidoro/qlora passes --lr_scheduler_type constant with --warmup_ratio 0.03: get_scheduler returns the constant
    schedule before it reads the warm-up, so the paper's runs had none, and paper_config() says so."""
    from transformers import get_scheduler

    config = paper_config(100)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    schedule = get_scheduler("constant", opt, num_warmup_steps=3, num_training_steps=100)
    for step in range(10):
        assert learning_rate_at(step, config) == opt.param_groups[0]["lr"] == config.learning_rate
        opt.step()
        schedule.step()


@pytest.mark.parametrize("steps", [10, 100, 1875])
def test_learning_rate_matches_transformers_constant_schedule_with_warmup(steps):
    from transformers import get_constant_schedule_with_warmup

    config = paper_config(steps, warmup_ratio=0.03)  # the course's warm-up (the paper's constant schedule has none)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=config.learning_rate)
    schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=math.ceil(0.03 * steps))
    for step in range(min(steps, 80)):
        assert learning_rate_at(step, config) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        schedule.step()


def test_batches_cover_each_epoch_once_and_are_reproducible():
    n, size = 23, 5
    seen = [i for step in range(23) for i in batch_indices(n, size, step, seed=7)]  # 115 = 5 epochs exactly
    for epoch in range(5):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert batch_indices(n, size, 4, seed=7) == batch_indices(n, size, 4, seed=7) != batch_indices(n, size, 4, 8)


@pytest.mark.parametrize(("overrides", "name"), [({"steps": 0}, "steps"), ({"learning_rate": -1.0}, "learning_rate"),
                                                 ({"optimizer": "sgd"}, "optimizer"),
                                                 ({"target_modules": "q_proj"}, "target_modules"),
                                                 ({"lora_r": 2.5}, "lora_r")])
def test_config_rejects_bad_values(overrides, name):
    with pytest.raises((TypeError, ValueError), match=name):
        FinetuneConfig(**{"steps": 10, **overrides})


# ----------------------------------------------------------------------------------------------
# Atomic saves


def test_atomic_directory_keeps_the_old_folder_on_a_crash(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"new, half writ")
        raise RuntimeError("disk full")
    assert (target / "weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
    with atomic_directory(target) as tmp:
        (tmp / "weights.bin").write_bytes(b"new")
    assert (target / "weights.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_directory_recovers_from_a_crash_between_the_renames(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "state").write_text("step 10")
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder is moved away, the new one is not in place yet
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="power cut"), atomic_directory(target) as tmp:
        (tmp / "state").write_text("step 20")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()
    with atomic_directory(tmp_path / "ckpt") as tmp:  # the next save first puts the old folder back
        assert (target / "state").read_text() == "step 10"
        (tmp / "state").write_text("step 20")
    assert (target / "state").read_text() == "step 20"


# ----------------------------------------------------------------------------------------------
# The pipeline on a tiny random Llama with SmolLM2's tokenizer


TINY = FinetuneConfig(steps=5, batch_size=2, lora_r=4, lora_alpha=8.0, learning_rate=1e-2, save_every=2)


@pytest.fixture(scope="module")
def cpu_compute():
    from qlora_edu.common.device import pick_compute

    return pick_compute("cpu")


@pytest.fixture(scope="module")
def few_examples():
    return load_dataset("train")[:40]


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_peft_model_is_the_recipe(tiny_model_dir, cpu_compute):
    import bitsandbytes as bnb

    model, _ = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    linears4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears4) == 14 and all(m.weight.quant_state.quant_type == "nf4" for m in linears4)
    assert all(m.weight.quant_state.nested for m in linears4)  # double quantization
    assert model.get_input_embeddings().weight.dtype == torch.float32  # prepare_model_for_kbit_training's upcast
    assert model.base_model.model.is_gradient_checkpointing


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny_model_dir, cpu_compute, few_examples,
                                                               tmp_path):
    model, tok = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    whole = train(model, tok, few_examples, TINY, output_dir=tmp_path / "whole", progress=False)
    expected = _adapters(model)

    def interrupt(step, loss):
        if step == 2:  # the checkpoint of step 2 was written after step index 1; step index 2 is lost work
            raise KeyboardInterrupt

    model, tok = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, few_examples, TINY, output_dir=tmp_path / "cut", on_step=interrupt, progress=False)
    model, tok = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)  # a new process
    resumed = train(model, tok, few_examples, TINY, output_dir=tmp_path / "cut", resume=True, progress=False)
    assert resumed.resumed_from == 2
    assert resumed.losses == whole.losses and resumed.grad_norms == whole.grad_norms
    got = _adapters(model)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert not all(torch.equal(p, torch.zeros_like(p)) for n, p in got.items() if "lora_B" in n)  # it trained
    # the checkpoint holds the optimizer's moments too: a fresh optimizer loaded from it equals the trained one
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TINY)
    step, history = load_checkpoint(tmp_path / "cut" / "checkpoint", model, opt)
    assert step == 5 and history["losses"] == whole.losses
    moments = [(k, v) for st in resumed.optimizer.state.values() for k, v in st.items() if isinstance(v, torch.Tensor)]
    loaded = [(k, v) for st in opt.state.values() for k, v in st.items() if isinstance(v, torch.Tensor)]
    assert moments and len(moments) == len(loaded)
    assert all(k1 == k2 and torch.equal(v1, v2) for (k1, v1), (k2, v2) in zip(moments, loaded, strict=True))


def test_saved_adapter_reloads_with_peft_to_the_same_outputs(tiny_model_dir, cpu_compute, few_examples, tmp_path,
                                                            tokenizer):
    from peft import PeftModel

    model, tok = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    train(model, tok, few_examples, replace(TINY, steps=2), progress=False)
    path = save_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in path.iterdir()}
    reloaded, _ = load_finetuned(path, tiny_model_dir, compute=cpu_compute, progress=False)
    assert isinstance(reloaded, PeftModel)
    batch = collate_examples(tokenizer, few_examples[:3])
    with torch.no_grad(), inference_mode(model), inference_mode(reloaded):
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)
    assert a.abs().sum() > 0


def test_a_crash_while_saving_keeps_the_previous_adapter(tiny_model_dir, cpu_compute, few_examples, tmp_path,
                                                         monkeypatch):
    from peft import PeftModel

    model, tok = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    path = save_adapter(model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    train(model, tok, few_examples, replace(TINY, steps=1), progress=False)  # the adapter changes

    real_save = PeftModel.save_pretrained

    def crash_midway(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half a file")  # half-written, then the crash
        raise OSError("killed while saving")

    monkeypatch.setattr(PeftModel, "save_pretrained", crash_midway)
    with pytest.raises(OSError, match="killed"):
        save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_evaluation_does_not_repack_the_4bit_weights(tiny_model_dir, cpu_compute, tokenizer):
    """bitsandbytes repacks a CPU Linear4bit in eval mode under no_grad; inference_mode must prevent it."""
    import bitsandbytes as bnb

    model, tok = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    model.train()
    result = evaluate(model, tok, load_dataset("heldout")[:3], max_new_tokens=4, progress=False)
    assert result.n == 3 and 0.0 <= result.score <= 1.0
    assert model.training  # the mode is restored
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)


def test_heldout_loss_is_transformers_loss_weighted_by_scored_tokens(tiny_model_dir, cpu_compute):
    """heldout_loss against transformers' own causal-LM loss: one batch of all the examples gives exactly the model's
    ``.loss`` (mean over the response tokens); smaller batches give the same number (batches weigh by their scored
    tokens); and it computes without gradients, in train mode afterwards, so the 4-bit weights are not repacked."""
    model, tok = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    examples = load_dataset("heldout")[:6]
    batch = collate_examples(tok, examples)
    with inference_mode(model), torch.no_grad():
        reference = float(model(**batch, use_cache=False).loss)
    whole = heldout_loss(model, tok, examples, batch_size=6)
    assert whole == pytest.approx(reference, rel=1e-5)
    assert heldout_loss(model, tok, examples, batch_size=4) == pytest.approx(reference, rel=1e-5)
    assert model.training and whole > 0
    with pytest.raises(ValueError, match="examples"):
        heldout_loss(model, tok, [], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        heldout_loss(model, tok, examples, batch_size=0)


def test_scratch_path_trains_only_the_adapters(tiny_model_dir, cpu_compute, few_examples, tmp_path, tokenizer):
    from transformers import LlamaForCausalLM

    from qlora_edu.ch07_qlora.qlora import QLoRALinear

    base = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = prepare_qlora(base, TINY, method="scratch", compute_dtype=torch.bfloat16)
    assert sum(isinstance(m, QLoRALinear) for m in model.modules()) == 14
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(model, tokenizer, few_examples, replace(TINY, steps=3), output_dir=tmp_path, progress=False)
    assert all(math.isfinite(x) for x in result.losses)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    # the course's adapters are saved in PEFT's format: peft loads them onto a bitsandbytes base, tensor for tensor
    path = save_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in path.iterdir()}
    reloaded, _ = load_finetuned(path, tiny_model_dir, compute=cpu_compute, progress=False)
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}  # <module>.lora_A
    loaded = {n: p for n, p in reloaded.named_parameters() if ".lora_" in n}  # ...<module>.lora_A.default.weight
    assert len(loaded) == len(ours) == 28
    for name, tensor in loaded.items():
        own = name.removeprefix("base_model.model.").removesuffix(".default.weight")
        assert torch.equal(tensor.detach(), ours[own].detach()), own
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in loaded.items() if "lora_B" in n)  # it trained
    # and the scratch checkpoint resumes into a fresh scratch model
    fresh = prepare_qlora(LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16), TINY,
                          method="scratch", compute_dtype=torch.bfloat16)
    opt = build_optimizer([p for p in fresh.parameters() if p.requires_grad], TINY)
    assert load_checkpoint(tmp_path / "checkpoint", fresh, opt)[0] == 3
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters()
               if p.requires_grad)


class _EchoLength(torch.nn.Module):
    """A stand-in generator: replies with the number of real (unpadded) tokens of its prompt."""

    def __init__(self, tokenizer):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert (attention_mask[:, -1] == 1).all(), "generation batches must be left-padded"
        replies = [self.tokenizer(str(int(n)), add_special_tokens=False)["input_ids"] for n in attention_mask.sum(1)]
        width = max(len(r) for r in replies)
        pad = self.tokenizer.pad_token_id
        tail = torch.tensor([r + [pad] * (width - len(r)) for r in replies])
        return torch.cat([input_ids, tail], dim=1)


def test_generate_replies_keeps_the_order_of_the_examples(tokenizer):
    from qlora_edu.ch08_finetune.finetune import generate_replies

    examples = [load_dataset("heldout")[i] for i in (5, 0, 17, 3, 9, 11, 2)]  # prompts of different lengths
    side = tokenizer.padding_side
    replies = generate_replies(_EchoLength(tokenizer), tokenizer, examples, batch_size=3, progress=False)
    expected = [str(len(tokenizer(tokenizer.apply_chat_template(build_messages(e), add_generation_prompt=True,
                                                                tokenize=False), add_special_tokens=False)
                          ["input_ids"])) for e in examples]
    assert replies == expected and len(set(expected)) > 1
    assert tokenizer.padding_side == side  # restored


def test_calibration_steps_time_and_train_only_adapters(tiny_model_dir, cpu_compute):
    from qlora_edu.ch08_finetune.finetune import calibration_step_seconds

    model, _ = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    times = calibration_step_seconds(model, steps=2, batch_size=2, seq_len=8)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_checkpoint_needs_a_folder(tiny_model_dir, cpu_compute, tmp_path):
    model, _ = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(tmp_path / "nothing", model, opt)
    path = save_checkpoint(tmp_path / "c", model, opt, 0, {"losses": []})
    assert load_checkpoint(path, model, opt) == (0, {"losses": []})


# ----------------------------------------------------------------------------------------------
# The command line


def _run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qlora_edu.ch08_finetune.finetune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_help_lists_the_options():
    out = _run_cli("--help")
    assert out.returncode == 0
    for option in ("--smoke", "--steps", "--output-dir", "--device", "--model", "--lr", "--lora-r", "--resume"):
        assert option in out.stdout


def _check_summary(out: subprocess.CompletedProcess, output_dir: Path) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("before", "after", "n_eval", "train_seconds", "device", "adapter"):
        assert key in summary
    assert 0.0 <= summary["before"] <= 1.0 and 0.0 <= summary["after"] <= 1.0
    assert summary["device"] in ("cpu", "cuda") and summary["train_seconds"] > 0
    assert Path(summary["adapter"]) == output_dir / "adapter"
    assert (output_dir / "adapter" / "adapter_config.json").is_file()
    return summary


def test_cli_smoke_on_a_tiny_model(tiny_model_dir, tmp_path):
    out = _run_cli("--smoke", "--model", str(tiny_model_dir), "--steps", "2", "--eval-size", "2", "--device", "cpu",
                   "--output-dir", str(tmp_path), "--no-progress")
    summary = _check_summary(out, tmp_path)
    assert summary["n_eval"] == 2 and summary["steps"] == 2


def test_run_finetune_scratch_path_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The command line's function with the course's own NF4 layers: the same summary, a PEFT-format adapter."""
    from qlora_edu.ch08_finetune.finetune import run_finetune

    lines = []
    summary = run_finetune(model=str(tiny_model_dir), device="cpu", smoke=True, method="scratch",
                           output_dir=tmp_path, progress=False, log=lines.append, steps=2, eval_size=2)
    assert summary["method"] == "scratch" and summary["n_eval"] == 2 and summary["steps"] == 2
    assert 0.0 <= summary["before"] <= 1.0 and 0.0 <= summary["after"] <= 1.0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 16
    assert json.dumps(summary)  # JSON-able, as the command line prints it
    assert any(line.startswith("before:") for line in lines) and any(line.startswith("after:") for line in lines)


@pytest.mark.slow
def test_cli_smoke_on_the_real_model(tmp_path):
    out = _run_cli("--smoke", "--device", "cpu", "--output-dir", str(tmp_path), "--no-progress", timeout=600)
    summary = _check_summary(out, tmp_path)
    assert summary["n_eval"] == 8 and summary["model"].startswith("SmolLM2")


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["scratch", "peft"])
def test_gpu_trains_a_tiny_llama_both_ways(method, tiny_model_dir, few_examples, tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    from qlora_edu.common.device import pick_compute

    compute = pick_compute("cuda")
    config = replace(TINY, steps=4, save_every=0)
    if method == "peft":
        model, tok = load_qlora_model(tiny_model_dir, config=config, compute=compute, progress=False)
    else:
        base = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=compute.dtype).to(compute.device)
        model, tok = prepare_qlora(base, config, method="scratch", compute_dtype=compute.dtype), tokenizer
    result = train(model, tok, few_examples, config, output_dir=tmp_path, progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters() if p.requires_grad)
    assert all(math.isfinite(x) for x in result.losses)
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes > 0
    assert (tmp_path / "checkpoint" / "optimizer.pt").is_file()


# ----------------------------------------------------------------------------------------------
# The held-out-templates split (issue 19: the held-out split shares the training sentences)


def test_heldout_templates_split_is_committed_and_shares_no_sentence_with_training():
    from qlora_edu.ch08_finetune.instruct_data import generate_heldout_templates

    committed = load_dataset("heldout_templates")
    assert [(e.id, e.message, e.answer) for e in committed] == \
        [(e.id, e.message, e.answer) for e in generate_heldout_templates()]
    train_set = load_dataset("train")
    train_text = " ".join(e.message for e in train_set)
    train_items = {e.answer["item"] for e in train_set}
    # the templates' fixed words: what is left of a message once its names, city and goods are cut out
    train_skeletons = {_skeleton(e) for e in train_set}
    for e in committed:
        first, last = e.answer["customer"].split()
        assert first not in train_text and last not in train_text and e.answer["city"] not in train_text, e
        assert e.answer["item"] not in train_items, e
        assert _skeleton(e) not in train_skeletons, e
    assert 0.15 < sum(e.answer["express"] for e in committed) / len(committed) < 0.5
    assert len({_skeleton(e) for e in committed}) >= 8


def _skeleton(example) -> str:
    """The message with its customer, city and goods (quantity and noun) replaced by placeholders: the template and
    the remark, the words a model sees in every message of their kind."""
    import re

    from qlora_edu.ch08_finetune.instruct_data import _NUMBER_WORDS, _QUANTITY_PHRASES

    text = example.message.replace(example.answer["customer"], "{name}").replace(example.answer["city"], "{city}")
    quantities = "|".join(sorted({*_QUANTITY_PHRASES.values(), *_NUMBER_WORDS, "a", r"\d+"}, key=len, reverse=True))
    goods, n = re.subn(rf"\b(?:{quantities}) {example.answer['item'][:3]}\w*", "{goods}", text)
    assert n == 1, example
    return goods
