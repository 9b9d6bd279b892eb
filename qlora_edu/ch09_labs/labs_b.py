"""Chapter 9 labs, part B: quantization sensitivity, adapter hot-swap, merging and export, the adapters' activations.

Each lab answers one question of the seed notes by a measurement on the course model (SmolLM2-135M-Instruct,
chapter 8's order-extraction task) and writes one small JSON file that ``notebooks/09_labs.ipynb`` reads::

    python qlora_edu/ch09_labs/labs_b.py lab4 [--smoke] [--out DIR]   # NF4 vs FP4 vs Int4 vs bf16 bases ->
    lab4_quant.json
    python qlora_edu/ch09_labs/labs_b.py lab5 [--smoke] [--out DIR]   # two adapters, one 4-bit base ->
    lab5_hotswap.json
    python qlora_edu/ch09_labs/labs_b.py lab6 [--smoke] [--out DIR]   # merge, export, GGUF -> lab6_merge_export.json
    python qlora_edu/ch09_labs/labs_b.py lab8 [--smoke] [--out DIR]   # the adapters' activations ->
    lab8_activations.json

``--smoke`` (or ``QLORA_EDU_SMOKE=1``) runs the same code on a tiny budget (CI runs it); the committed files come
from full runs (the default ``--out`` is ``notebooks/results``). ``--steps`` and ``--eval-size`` override a lab's
budget, ``--model`` takes another Llama-style model (a hub id or folder), ``--work`` keeps the files a lab writes
on the way (adapters, exported models) instead of a temporary folder.

Every results file holds ``lab``, ``question``, ``smoke``, ``wall_seconds`` (the whole lab, on this machine, under
the load it had: ``machine.load_average`` at the start and the end), the budget, and the lab's measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.ch08_finetune.finetune import (
    default_config,
    evaluate,
    generate_replies,
    inference_mode,
    lora_config,
    train,
)
from qlora_edu.ch08_finetune.instruct_data import (
    IGNORE_INDEX,
    Example,
    collate_examples,
    field_accuracy,
    load_dataset,
    paired_bootstrap_interval,
    sign_test_p_value,
)
from qlora_edu.common import settings
from qlora_edu.common.device import pick_compute

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "notebooks" / "results"
RESULT_FILES = {"lab4": "lab4_quant.json", "lab5": "lab5_hotswap.json", "lab6": "lab6_merge_export.json",
                "lab8": "lab8_activations.json"}
MiB = 2**20
EVAL_BATCH = 25  # orders generated at once in labs 5 and 6 (the prompts' logits of 100 at once take ~2 GB)

warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*")
warnings.filterwarnings("ignore", message=".*Merge lora module to 4-bit linear may get different generations.*")


# ----------------------------------------------------------------------------------------------
# Budgets, the run's record, helpers shared by the labs


@dataclass(frozen=True)
class Budget:
    """How much a lab trains and evaluates: ``steps`` optimizer steps of ``batch_size`` orders, ``eval_size``
    held-out orders scored, ``max_new_tokens`` generated per answer."""

    steps: int
    batch_size: int
    eval_size: int
    max_new_tokens: int = 48


# Full budgets: sized for two shared CPU cores (a lab in minutes, not hours); smoke budgets: CI.
FULL = {"lab4": Budget(steps=20, batch_size=8, eval_size=100), "lab5": Budget(steps=16, batch_size=8, eval_size=100),
        "lab6": Budget(steps=16, batch_size=8, eval_size=100), "lab8": Budget(steps=0, batch_size=2, eval_size=0)}
SMOKE = {"lab4": Budget(steps=2, batch_size=2, eval_size=4, max_new_tokens=12),
         "lab5": Budget(steps=2, batch_size=2, eval_size=4, max_new_tokens=12),
         "lab6": Budget(steps=2, batch_size=2, eval_size=4, max_new_tokens=12),
         "lab8": Budget(steps=0, batch_size=1, eval_size=0)}


def budget_for(lab: str, smoke: bool, steps: int | None = None, eval_size: int | None = None) -> Budget:
    """The lab's budget (smoke or full), with ``steps`` / ``eval_size`` overridden when given."""
    budget = (SMOKE if smoke else FULL)[lab]
    if steps is not None:
        budget = replace(budget, steps=steps)
    if eval_size is not None:
        budget = replace(budget, eval_size=eval_size)
    return budget


def machine() -> dict:
    """What ran the lab: CPU count, library versions, the load average (the machine is shared)."""
    import bitsandbytes
    import peft
    import transformers

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "cuda": torch.cuda.is_available(),
            "load_average_start": os.getloadavg()[0]}


def write_result(out: Path, lab: str, payload: dict) -> Path:
    """Write the lab's JSON (sorted keys are not used: the order of the payload is the order a reader wants)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULT_FILES[lab]
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def _finish(payload: dict, began: float) -> dict:
    payload["wall_seconds"] = round(time.perf_counter() - began, 1)
    payload["machine"]["load_average_end"] = os.getloadavg()[0]
    return payload


def _rounded(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def finetune_config(compute, budget: Budget, *, seed: int = 0, **overrides):
    """Chapter 8's CPU defaults (lr 1e-3, r = 16, alpha = 16, dropout 0.05, all seven projections, clip 0.3,
    3% warm-up) with this lab's budget; torch's AdamW (on a CPU bitsandbytes' paged AdamW is the same update,
    unpaged) and no gradient checkpointing unless ``overrides`` turn it on (lab 4 measures quality, not memory)."""
    fields = dict(steps=budget.steps, batch_size=budget.batch_size, eval_size=budget.eval_size,
                  max_new_tokens=budget.max_new_tokens, optimizer="adamw", gradient_checkpointing=False, seed=seed)
    return default_config(compute.device, smoke=False, **(fields | overrides))


def response_loss(model: nn.Module, tokenizer, examples: Sequence[Example], *, batch_size: int = 16) -> float:
    """Mean cross-entropy (nats a token) of the reference responses, teacher-forced: the held-out loss.

    The same tokens the training loss sees (the JSON and the end token, the prompt masked), on held-out orders; more
    sensitive than the exact-match score, which is 0 or 1 an order."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with inference_mode(model), torch.no_grad():
        for first in range(0, len(examples), batch_size):
            batch = collate_examples(tokenizer, list(examples[first:first + batch_size]))
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"][:, 1:].to(device)
            total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def _seeded(seed: int):
    """A fork of torch's global generator seeded with ``seed`` (adapters' init draws from it)."""
    @contextlib.contextmanager
    def context():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    return context()


def _log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Lab 4: quantization sensitivity


FORMATS = ("bf16", "nf4", "fp4", "int4")
FORMAT_BITS = {"bf16": 16.0, "nf4": None, "fp4": 4.5, "int4": 4.5}  # nf4: storage.bits_per_param() (with DQ)
FORMAT_LABELS = {"bf16": "bf16 (16-bit reference)", "nf4": "NF4 + double quantization (QLoRA)",
                 "fp4": "FP4 (E2M1, bitsandbytes' default)", "int4": "Int4 absmax (chapter 1)"}


def fake_quantizer(fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``W -> dequantize(quantize(W))`` for a 4-bit format, with the course's own functions, blocksize 64.

    * ``nf4``: :func:`qlora_edu.ch03_double_quant.nf4_tensor.quantize_nf4` with double quantization (QLoRA's storage,
    byte for byte
      bitsandbytes'), back with :func:`~qlora_edu.ch03_double_quant.nf4_tensor.dequantize_nf4`;
    * ``fp4``: :func:`qlora_edu.ch02_nf4.quant4bit.quantize_4bit` with :func:`qlora_edu.ch02_nf4.nf4.fp4_code` (float32
    constants);
    * ``int4``: :func:`qlora_edu.ch01_absmax.absmax.absmax_quantize` (codes -7..7, one float32 scale a block).

    The 4-bit layer computes ``x @ dequantize(W)^T`` in the compute dtype on every pass; storing the dequantized
    ``W`` in that dtype once gives the same numbers (checked on one layer against ``NF4Linear``) and trains
    faster. Memory is not this lab's question.
    """
    from qlora_edu.ch01_absmax.absmax import absmax_dequantize, absmax_quantize
    from qlora_edu.ch02_nf4.nf4 import fp4_code
    from qlora_edu.ch02_nf4.quant4bit import dequantize_4bit, quantize_4bit
    from qlora_edu.ch03_double_quant.nf4_tensor import dequantize_nf4, quantize_nf4

    if fmt == "nf4":
        return lambda w: dequantize_nf4(quantize_nf4(w, 64, True))
    if fmt == "fp4":
        code = fp4_code()

        def fp4(w: torch.Tensor) -> torch.Tensor:
            packed, absmax = quantize_4bit(w, code, 64)
            return dequantize_4bit(packed, absmax, code, w.shape, 64, dtype=w.dtype)
        return fp4
    if fmt == "int4":
        return lambda w: absmax_dequantize(*absmax_quantize(w, 4, 64), 64).to(w.dtype)
    raise ValueError(f"no quantizer for format {fmt!r}")


def nf4_layer_check(linear: nn.Linear, compute_dtype: torch.dtype) -> float:
    """Largest |difference| between chapter 7's ``NF4Linear`` (dequantizes on every pass) and a plain linear layer
    holding ``dequantize(quantize(W))``, on random inputs: 0.0 means the shortcut computes the same numbers."""
    from qlora_edu.ch07_qlora.qlora import NF4Linear

    layer = NF4Linear.from_linear(linear, compute_dtype=compute_dtype)
    shortcut = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        shortcut.weight.copy_(fake_quantizer("nf4")(linear.weight.detach()))
        if linear.bias is not None:
            shortcut.bias.copy_(linear.bias)
        x = torch.randn(4, 7, linear.in_features, generator=torch.Generator().manual_seed(0)).to(
            device=linear.weight.device, dtype=compute_dtype)
        return float((layer(x).float() - shortcut(x).float()).abs().max())


def run_lab4(budget: Budget, *, model_name: str | None = None, progress: bool = True, smoke: bool = False,
             formats: Sequence[str] = FORMATS) -> dict:
    """Fine-tune the same adapters on four bases (bf16, NF4, FP4, Int4) with the same data, seed and steps.

    ``formats`` runs a subset (the formats are independent: several processes can share the work, and
    :func:`merge_lab4_parts` joins their files); the comparisons with bf16 are made when bf16 is among them."""
    from peft import get_peft_model

    from qlora_edu.ch03_double_quant.storage import bits_per_param
    from qlora_edu.common.base_model import load_base_model
    from qlora_edu.common.perplexity import perplexity, reference_text, replace_linear_weights

    began = time.perf_counter()
    payload = {"lab": "lab4", "question": "Fine-tuned on an NF4, FP4, Int4 or bf16 base: does NF4 recover 16-bit "
               "quality, as the QLoRA paper says?", "smoke": smoke, "machine": machine()}
    compute = pick_compute()
    config = finetune_config(compute, budget)
    train_set, heldout = load_dataset("train"), load_dataset("heldout")[:budget.eval_size]
    ppl_tokens = 256 if smoke else 4096
    ppl_text = reference_text()[:8 * ppl_tokens]  # tokenize a slice, not all 465k characters, four times
    device = compute.device if compute.device.type == "cuda" else None
    pristine, tokenizer = load_base_model(model_name, dtype=compute.dtype, device=device, progress=False)
    first_q = next(m for n, m in pristine.named_modules() if n.endswith("q_proj"))
    payload["nf4_shortcut_max_abs_diff"] = nf4_layer_check(first_q, compute.dtype)
    payload.update(budget=budget.__dict__, config=config.to_dict(), device=compute.device.type,
                   dtype=str(compute.dtype).removeprefix("torch."), perplexity_tokens=ppl_tokens)
    rows = {}
    for fmt in formats:
        t0 = time.perf_counter()
        _log(f"lab4: {fmt}")
        model = copy.deepcopy(pristine) if len(formats) > 1 else pristine
        err = {"num": 0.0, "den": 0.0, "n": 0}
        if fmt != "bf16":
            quantize = fake_quantizer(fmt)

            def measured(w: torch.Tensor, quantize=quantize, err=err) -> torch.Tensor:
                q = quantize(w)
                err["num"] += float((q.float() - w.float()).pow(2).sum())
                err["den"] += float(w.float().pow(2).sum())
                err["n"] += w.numel()
                return q
            replace_linear_weights(model, measured, progress=False)
        ppl = perplexity(model, tokenizer, ppl_text, max_tokens=ppl_tokens, window=256, batch_size=4, progress=False)
        loss_before = response_loss(model, tokenizer, heldout)
        with _seeded(config.seed):
            model = get_peft_model(model, lora_config(config))
        result = train(model, tokenizer, train_set, config, progress=progress)
        loss_after = response_loss(model, tokenizer, heldout)
        ev = evaluate(model, tokenizer, heldout, max_new_tokens=config.max_new_tokens, progress=progress)
        bits = bits_per_param() if fmt == "nf4" else FORMAT_BITS[fmt]
        rows[fmt] = {"label": FORMAT_LABELS[fmt], "bits_per_weight": bits,
                     "weight_relative_rmse": math.sqrt(err["num"] / err["den"]) if err["den"] else 0.0,
                     "quantized_weights": err["n"], "base_perplexity": ppl, "heldout_loss_before": loss_before,
                     "heldout_loss_after": loss_after, "score": ev.score, "correct": [bool(c) for c in ev.correct],
                     "field_accuracy": field_accuracy(ev.replies, heldout), "losses": result.losses,
                     "train_seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
                     "eval_seconds": ev.seconds, "seconds": time.perf_counter() - t0,
                     "example_replies": ev.replies[:3]}
        _log(f"lab4: {fmt}: score {ev.score:.3f}, held-out loss {loss_before:.3f} -> {loss_after:.4f}, "
             f"perplexity {ppl:.2f} ({time.perf_counter() - t0:.0f} s)")
        del model
        gc.collect()
    payload["formats"] = compare_with_bf16(rows)
    payload["n_eval"] = len(heldout)
    return _finish(payload, began)


def compare_with_bf16(rows: dict) -> dict:
    """Add to each 4-bit format's row its score difference from bf16 on the same orders (paired bootstrap 95%
    interval, sign test), when bf16 is there."""
    if "bf16" in rows:
        reference = rows["bf16"]["correct"]
        for fmt in rows:
            if fmt != "bf16":
                gain, low, high = paired_bootstrap_interval(reference, rows[fmt]["correct"])
                rows[fmt]["vs_bf16"] = {"difference": gain, "interval_95": [low, high],
                                        "sign_test_p": sign_test_p_value(reference, rows[fmt]["correct"])}
    return rows


def merge_lab4_parts(parts: Sequence[Path]) -> dict:
    """One lab 4 results payload from part files (``--formats`` runs), formats in the usual order.

    ``wall_seconds`` is the sum of the parts' (the cost of one sequential run); ``parts`` lists each part's
    formats, wall time and load averages (they ran side by side)."""
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    rows = {fmt: row for part in loaded for fmt, row in part["formats"].items()}
    if sorted(rows, key=FORMATS.index) != list(FORMATS):
        raise ValueError(f"the parts hold formats {sorted(rows)}, not all of {list(FORMATS)}")
    first = loaded[0]
    for part in loaded[1:]:
        if part["config"] != first["config"] or part["smoke"] != first["smoke"]:
            raise ValueError("the parts were run with different settings")
    payload = {k: v for k, v in first.items() if k not in ("formats", "wall_seconds")}
    payload["formats"] = compare_with_bf16({fmt: rows[fmt] for fmt in FORMATS})
    payload["parts"] = [{"formats": list(p["formats"]), "wall_seconds": p["wall_seconds"],
                         "load_average_start": p["machine"]["load_average_start"],
                         "load_average_end": p["machine"]["load_average_end"]} for p in loaded]
    payload["wall_seconds"] = round(sum(p["wall_seconds"] for p in loaded), 1)
    payload["machine"]["load_average_end"] = max(p["machine"]["load_average_end"] for p in loaded)
    return payload


# ----------------------------------------------------------------------------------------------
# Lab 5: two adapters, one 4-bit base


LABEL_INSTRUCTION = ("Write the order as one shipping label line: QUANTITY x ITEM (singular) | CITY | CUSTOMER | "
                     "EXPRESS or STANDARD.")


def label_line(answer: dict) -> str:
    """The second task's answer for an order: ``6 x shelf | Cape Town | Maya Novak | EXPRESS``."""
    speed = "EXPRESS" if answer["express"] else "STANDARD"
    return f"{answer['quantity']} x {answer['item']} | {answer['city']} | {answer['customer']} | {speed}"


@dataclass(frozen=True)
class LabelExample(Example):
    """An order whose expected reply is the shipping label (:func:`label_line`) instead of the JSON object."""

    @property
    def response(self) -> str:
        return label_line(self.answer)


def as_label_examples(examples: Sequence[Example]) -> list[LabelExample]:
    """The same orders, with the second task's replies (deterministic: a pure function of chapter 8's data)."""
    return [LabelExample(e.id, e.message, e.answer) for e in examples]


class TaskTokenizer:
    """A tokenizer whose chat template puts ``instruction`` in the system message: the second task's prompt.

    Chapter 8's functions (``collate_examples``, ``train``, ``generate_replies``) build the chat with chapter 8's
    instruction; this wrapper swaps it for another task's, and passes everything else to the wrapped tokenizer
    (``padding_side`` included, which ``generate_replies`` sets)."""

    def __init__(self, tokenizer, instruction: str):
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_instruction", instruction)

    def apply_chat_template(self, conversation, *args, **kwargs):
        conversation = [dict(m, content=self._instruction) if m["role"] == "system" else m for m in conversation]
        return self._tokenizer.apply_chat_template(conversation, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __setattr__(self, name, value):
        setattr(self._tokenizer, name, value)


def score_labels(replies: Sequence[str], examples: Sequence[LabelExample]) -> list[bool]:
    """Exact match of each reply (surrounding spaces ignored) with the expected label line."""
    return [r.strip() == e.response for r, e in zip(replies, examples, strict=True)]


def _adapter_bytes(model: nn.Module, name: str) -> int:
    from qlora_edu.ch04_memory.memory_probe import tensor_bytes

    return tensor_bytes([p for n, p in model.named_parameters() if f".{name}." in n])


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    with inference_mode(model), torch.no_grad():
        return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def run_lab5(budget: Budget, *, model_name: str | None = None, progress: bool = True, smoke: bool = False,
             work: Path | None = None) -> dict:
    """Train an adapter for each task on one 4-bit base, then serve both from one base with peft's
    ``load_adapter`` / ``set_adapter``: scores of every (adapter, task) pair, what each adapter costs in memory."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from qlora_edu.ch03_double_quant.storage import quantized_bytes, quantized_linear_params, total_params
    from qlora_edu.ch04_memory.memory_probe import static_bytes, tensor_bytes
    from qlora_edu.ch06_lora.lora import lora_param_count
    from qlora_edu.ch08_finetune.finetune import bnb_config, load_qlora_model
    from qlora_edu.common.base_model import load_base_model

    began = time.perf_counter()
    payload = {"lab": "lab5", "question": "Two adapters for two tasks on one 4-bit base, switched at inference: do "
               "they work, how fast is a switch, and what memory does each adapter add?", "smoke": smoke,
               "machine": machine()}
    compute = pick_compute()
    # QLoRA's gradient checkpointing (chapter 8's recipe): a fraction of the activation memory, for 30% more time
    config = finetune_config(compute, budget, gradient_checkpointing=True)
    payload.update(budget=budget.__dict__, config=config.to_dict(), device=compute.device.type,
                   dtype=str(compute.dtype).removeprefix("torch."), label_instruction=LABEL_INSTRUCTION)
    train_orders, heldout_orders = load_dataset("train"), load_dataset("heldout")[:budget.eval_size]
    train_labels, heldout_labels = as_label_examples(train_orders), as_label_examples(heldout_orders)
    payload["label_example"] = {"message": heldout_labels[0].message, "reply": heldout_labels[0].response}

    # 1. Training: the orders adapter ("default") and, on the same model, a second adapter ("label").
    qmodel, tokenizer = load_qlora_model(model_name, config=config, compute=compute, progress=False)
    label_tokenizer = TaskTokenizer(tokenizer, LABEL_INSTRUCTION)
    _log("lab5: training the orders adapter")
    orders_run = train(qmodel, tokenizer, train_orders, config, progress=progress)
    with _seeded(config.seed + 1):
        qmodel.add_adapter("label", lora_config(config))
    qmodel.set_adapter("label")
    trainable = sum(p.numel() for p in qmodel.parameters() if p.requires_grad)
    _log("lab5: training the label adapter")
    label_run = train(qmodel, label_tokenizer, train_labels, replace(config, seed=config.seed + 1),
                      progress=progress)
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="lab5-")
        work = Path(tmp.name)
    adapters_dir = Path(work) / "lab5_adapters"
    qmodel.save_pretrained(adapters_dir)  # "default" in the folder, "label" in its subfolder
    files = {"orders": adapters_dir / "adapter_model.safetensors",
             "label": adapters_dir / "label" / "adapter_model.safetensors"}
    check_orders = collate_examples(tokenizer, list(heldout_orders[:4]))
    check_labels = collate_examples(label_tokenizer, list(heldout_labels[:4]))
    qmodel.set_adapter("default")
    trained_logits = {"orders": _logits(qmodel, check_orders)}
    qmodel.set_adapter("label")
    trained_logits["label"] = _logits(qmodel, check_labels)
    del qmodel

    # 2. Serving: one 4-bit base, prepared as for training, then the adapters loaded one after the other.
    t0 = time.perf_counter()
    device = compute.device if compute.device.type == "cuda" else None
    base, _ = load_base_model(model_name, dtype=compute.dtype, device=device,
                              quantization_config=bnb_config(compute.dtype), progress=False)
    as_loaded = tensor_bytes(base)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    base_seconds = time.perf_counter() - t0
    prepared = tensor_bytes(base)
    t0 = time.perf_counter()
    served = PeftModel.from_pretrained(base, str(adapters_dir), adapter_name="orders")
    orders_seconds = time.perf_counter() - t0
    with_orders = tensor_bytes(served)
    t0 = time.perf_counter()
    served.load_adapter(str(adapters_dir / "label"), adapter_name="label")
    label_seconds = time.perf_counter() - t0
    with_both = tensor_bytes(served)
    served.eval()

    switches = []
    for name in ["orders", "label"] * (5 if smoke else 50):
        t0 = time.perf_counter()
        served.set_adapter(name)
        switches.append(time.perf_counter() - t0)
    switches.sort()

    served.set_adapter("orders")
    orders_logits = _logits(served, check_orders)
    served.set_adapter("label")
    label_logits = _logits(served, check_labels)
    served.set_adapter("orders")
    again = _logits(served, check_orders)
    with served.disable_adapter():
        base_logits = _logits(served, check_orders)
    exact = {"orders_equals_trained": bool(torch.equal(orders_logits, trained_logits["orders"])),
             "label_equals_trained": bool(torch.equal(label_logits, trained_logits["label"])),
             "switch_back_equal": bool(torch.equal(again, orders_logits)),
             "orders_max_abs_diff_vs_base": float((orders_logits.float() - base_logits.float()).abs().max())}

    # 3. Every adapter on every task (the base too: adapters disabled).
    tasks = {"orders": (tokenizer, heldout_orders), "label": (label_tokenizer, heldout_labels)}
    matrix = {}
    for adapter in ("base", "orders", "label"):
        matrix[adapter] = {}
        for task, (tok, examples) in tasks.items():
            _log(f"lab5: adapter {adapter} on task {task}")
            t0 = time.perf_counter()
            context = served.disable_adapter() if adapter == "base" else contextlib.nullcontext()
            if adapter != "base":
                served.set_adapter(adapter)
            with context:
                new_tokens = budget.max_new_tokens if task == "orders" else min(32, budget.max_new_tokens)
                replies = generate_replies(served, tok, examples, batch_size=EVAL_BATCH, max_new_tokens=new_tokens,
                                           progress=progress)
            if task == "orders":
                from qlora_edu.ch08_finetune.instruct_data import score_answers
                correct = score_answers(replies, examples)
            else:
                correct = score_labels(replies, examples)
            matrix[adapter][task] = {"score": sum(correct) / len(correct), "n": len(correct),
                                     "example_reply": replies[0], "seconds": time.perf_counter() - t0}

    # 4. The same adapters on a 7B model (LLaMA-1 shape), from the memory formulas of chapters 3 and 6.
    n7 = lora_param_count("7B", config.lora_r, config.target_modules)
    linear7 = quantized_linear_params("7B")
    base7 = quantized_bytes(linear7) + (total_params("7B") - linear7) * 2  # 4-bit linears + bf16 rest
    payload.update(
        adapter_parameters=trainable,
        memory={"base_as_loaded_bytes": as_loaded, "base_prepared_bytes": prepared,
                "orders_adapter_bytes": _adapter_bytes(served, "orders"),
                "label_adapter_bytes": _adapter_bytes(served, "label"),
                "added_by_orders_bytes": with_orders - prepared, "added_by_label_bytes": with_both - with_orders,
                "adapter_file_bytes": {k: v.stat().st_size for k, v in files.items()},
                "static_after_both": static_bytes(served)},
        seconds={"load_4bit_base": base_seconds, "load_orders_adapter": orders_seconds,
                 "load_label_adapter": label_seconds, "set_adapter_median": switches[len(switches) // 2],
                 "set_adapter_max": switches[-1], "n_switches": len(switches),
                 "train_orders": orders_run.seconds, "train_label": label_run.seconds},
        losses={"orders": orders_run.losses, "label": label_run.losses},
        exact=exact, matrix=matrix, n_eval=len(heldout_orders),
        llama7b={"adapter_parameters": n7, "adapter_bytes_fp32": 4 * n7, "base_bytes_nf4": base7,
                 "lora_r": config.lora_r},
    )
    if tmp is not None:
        tmp.cleanup()
    return _finish(payload, began)


# ----------------------------------------------------------------------------------------------
# Lab 6: merging into the 4-bit base, and exporting (safetensors, GGUF)


class CastLinear(nn.Module):
    """A frozen linear layer that computes like bitsandbytes' ``Linear4bit``: the input cast to the weight's dtype
    (the compute dtype), ``x W^T``, the output cast back to the input's dtype. Holds a dense (merged) weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, peft LoRA layer)`` of a PeftModel, name as in the plain model (``model.layers.0.self_attn.q_proj``)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out.append((name.removeprefix("base_model.model."), module))
    return out


def merged_weights(peft_model: nn.Module, adapter: str = "default") -> tuple[dict, dict]:
    """Dequantize every 4-bit base weight and add its adapters' update, in float32.

    Returns:
        ``(merged, stats)``: ``merged[name] = dequantize(W_nf4) + (alpha / r) B A`` (float32, ``(out, in)``);
        ``stats`` the sums over all layers that say how lossy each way of storing the merged weight is:
        ``delta`` = sum ||(alpha/r) B A||^2, ``bf16_error`` = sum ||bf16(W + dW) - (W + dW)||^2,
        ``nf4_error`` = sum ||NF4(W + dW) - (W + dW)||^2 (re-quantized with double quantization, as peft does),
        ``nf4_update`` = sum ||NF4(W + dW) - NF4(W)||^2 and ``nf4_update_dot`` = sum <NF4(W + dW) - NF4(W), dW>
        (how much of the update survives re-quantization, and in which direction), ``weights`` = sum ||W||^2.
    """
    import bitsandbytes.functional as bnbf

    from qlora_edu.ch03_double_quant.nf4_tensor import dequantize_nf4, quantize_nf4

    merged: dict[str, torch.Tensor] = {}
    stats = dict.fromkeys(("delta", "bf16_error", "nf4_error", "nf4_update", "nf4_update_dot", "weights"), 0.0)
    for name, layer in _lora_layers(peft_model):
        base = layer.get_base_layer()
        w = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        a, b = layer.lora_A[adapter].weight.detach().float(), layer.lora_B[adapter].weight.detach().float()
        delta = (b @ a) * layer.scaling[adapter]
        full = w + delta
        merged[name] = full
        requant = dequantize_nf4(quantize_nf4(full, 64, True)).float()
        update = requant - w
        stats["delta"] += float(delta.pow(2).sum())
        stats["bf16_error"] += float((full.to(torch.bfloat16).float() - full).pow(2).sum())
        stats["nf4_error"] += float((requant - full).pow(2).sum())
        stats["nf4_update"] += float(update.pow(2).sum())
        stats["nf4_update_dot"] += float((update * delta).sum())
        stats["weights"] += float(w.pow(2).sum())
    return merged, stats


def _skeleton(model_name, compute) -> nn.Module:
    """The base model unquantized, with the non-linear weights in float32 as ``prepare_model_for_kbit_training``
    leaves them (embeddings, norms): the frame into which merged weights go, computing as the QLoRA model does."""
    from qlora_edu.common.base_model import load_base_model

    device = compute.device if compute.device.type == "cuda" else None
    model, _ = load_base_model(model_name, dtype=compute.dtype, device=device, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
        p.data = p.data.float()
    return model.eval()


def _install(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    return model


def logit_comparison(models: dict[str, nn.Module], reference: str, tokenizer, examples: Sequence[Example], *,
                     batch_size: int = 8, contexts: dict | None = None) -> dict:
    """Teacher-forced comparison of several models with ``models[reference]`` on the response tokens of ``examples``.

    For each model: ``max_abs`` and ``mean_abs`` logit difference, ``kl`` = mean KL(reference || model) a token
    (nats), ``top1_agreement`` (same arg-max token), and its own held-out ``loss`` (cross-entropy of the reference
    response). ``contexts[name]`` (optional) is a context-manager factory entered around that model's forward
    (``peft_model.disable_adapter``)."""
    contexts = contexts or {}
    acc = {name: {"max_abs": 0.0, "sum_abs": 0.0, "kl": 0.0, "top1": 0, "nll": 0.0} for name in models}
    n_tokens, n_logits = 0, 0
    for first in range(0, len(examples), batch_size):
        batch = collate_examples(tokenizer, list(examples[first:first + batch_size]))
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        outs = {}
        for name, model in models.items():
            with contexts.get(name, contextlib.nullcontext)():
                outs[name] = _logits(model, batch)[:, :-1][mask].float()  # (response tokens, V)
        ref = outs[reference]
        ref_logp = ref.log_softmax(-1)
        target = labels[mask]
        for name, out in outs.items():
            logp = out.log_softmax(-1)
            diff = (out - ref).abs()
            acc[name]["max_abs"] = max(acc[name]["max_abs"], float(diff.max()))
            acc[name]["sum_abs"] += float(diff.sum())
            acc[name]["kl"] += float((ref_logp.exp() * (ref_logp - logp)).sum())
            acc[name]["top1"] += int((out.argmax(-1) == ref.argmax(-1)).sum())
            acc[name]["nll"] += float(F.nll_loss(logp, target.to(logp.device), reduction="sum"))
        n_tokens += int(mask.sum())
        n_logits += int(mask.sum()) * ref.shape[-1]
    return {name: {"max_abs": a["max_abs"], "mean_abs": a["sum_abs"] / n_logits, "kl": a["kl"] / n_tokens,
                   "top1_agreement": a["top1"] / n_tokens, "loss": a["nll"] / n_tokens}
            for name, a in acc.items()} | {"_tokens": n_tokens}


# GGUF names of a Llama model's tensors (llama.cpp's convert_hf_to_gguf.py; gguf's tensor_mapping has the table).
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight`` (and the embedding, final norm, head)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    parts = hf_name.split(".")  # model layers N <module path...> weight
    return f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k weights (the inverse of what transformers' GGUF loader undoes):
    within each head, the two interleaved halves of the rotary pairs are regrouped."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: nn.Module, path: Path, *, kind: str = "bf16", tokenizer_from: Path | None = None) -> dict:
    """Write a Llama model as a GGUF file with the ``gguf`` package's ``GGUFWriter``.

    Args:
        model: a ``LlamaForCausalLM`` (its config gives the hyperparameters).
        path: the file to write.
        kind: ``"bf16"`` (2-D weights in BF16: exact for a bf16 model) or ``"q4_1"`` (the decoder's linears in
            llama.cpp's Q4_1, the embedding in Q8_0: how the course's own base model was shipped); norms stay F32.
        tokenizer_from: a GGUF file whose ``tokenizer.*`` entries to copy (the bundled model's), or None.

    Returns:
        ``{"bytes", "tensor_types"}``.
    """
    import gguf
    import numpy as np

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("qlora-edu merged fine-tune")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if kind == "bf16" else gguf.LlamaFileType.MOSTLY_Q4_1)
    if tokenizer_from is not None:
        reader = gguf.GGUFReader(str(tokenizer_from))
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    types: dict[str, int] = {}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # one tensor for both: the GGUF has no output.weight, the loader ties them
        w = tensor.detach().float().cpu()
        if name.endswith("q_proj.weight"):
            w = permute_for_gguf(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_for_gguf(w, cfg.num_key_value_heads)
        data = w.numpy().astype(np.float32)
        if data.ndim == 1:
            qtype = gguf.GGMLQuantizationType.F32
        elif kind == "bf16":
            qtype = gguf.GGMLQuantizationType.BF16
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0 if "embed_tokens" in name else gguf.GGMLQuantizationType.Q4_1
        if qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"bytes": path.stat().st_size, "tensor_types": types}


def _dense_gguf() -> dict:
    """``from_pretrained`` keywords that unpack a GGUF file into plain dense weights. transformers 5 can keep the
    blocks packed and compute with kernels from the ``kernels`` package (when installed); this lab compares weights
    and logits, so it asks for the dense model, which older transformers (4.41+) always build."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _bundled_gguf(model_name) -> Path | None:
    """The bundled model's GGUF (for its tokenizer entries) when the lab runs on the bundled model."""
    if model_name is not None or settings.model_override() is not None:
        return None
    from qlora_edu.common.base_model import find_gguf

    return find_gguf()


def run_lab6(budget: Budget, *, model_name: str | None = None, progress: bool = True, smoke: bool = False,
             work: Path | None = None) -> dict:
    """Train a QLoRA adapter, merge it three ways, export the merged model as safetensors and GGUF, reload both."""
    import transformers
    from transformers import AutoModelForCausalLM

    from qlora_edu.ch07_qlora.qlora import to_bnb_linear4bit
    from qlora_edu.ch08_finetune.finetune import load_qlora_model

    began = time.perf_counter()
    payload = {"lab": "lab6", "question": "Merging adapters into a 4-bit base is lossy: how lossy, compared with "
               "merging into the dequantized bf16 base? And does the merged model survive export to safetensors "
               "and GGUF?", "smoke": smoke, "machine": machine()}
    compute = pick_compute()
    config = finetune_config(compute, budget, gradient_checkpointing=True)  # as lab 5: memory
    payload.update(budget=budget.__dict__, config=config.to_dict(), device=compute.device.type,
                   dtype=str(compute.dtype).removeprefix("torch."), transformers_version=transformers.__version__)
    train_set, heldout = load_dataset("train"), load_dataset("heldout")[:budget.eval_size]
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="lab6-")
        work = Path(tmp.name)
    work = Path(work)

    # (a) the trained QLoRA model, unmerged
    qmodel, tokenizer = load_qlora_model(model_name, config=config, compute=compute, progress=False)
    _log("lab6: training")
    run = train(qmodel, tokenizer, train_set, config, progress=progress)
    qmodel.eval()

    # the merged weights, and what each way of storing them loses
    merged, stats = merged_weights(qmodel)
    payload["weights"] = {
        "update_relative_to_weights": math.sqrt(stats["delta"] / stats["weights"]),
        "bf16_rounding_error_relative_to_update": math.sqrt(stats["bf16_error"] / stats["delta"]),
        "nf4_requant_error_relative_to_update": math.sqrt(stats["nf4_error"] / stats["delta"]),
        "nf4_surviving_update_norm_ratio": math.sqrt(stats["nf4_update"] / stats["delta"]),
        "nf4_surviving_update_cosine": stats["nf4_update_dot"] / math.sqrt(stats["nf4_update"] * stats["delta"]),
        "n_layers": len(merged)}

    # (b) merged into the dequantized base, stored in bf16; (c) merged, then re-quantized to NF4 (what peft's
    # merge_and_unload does on a 4-bit model): both computed like the QLoRA model (float32 residual stream,
    # bf16 matmuls), so the differences are the merge's alone.
    skeleton = _skeleton(model_name, compute)
    model_b = _install(copy.deepcopy(skeleton), {n: CastLinear(w.to(compute.dtype)) for n, w in merged.items()})
    c_layers = {}
    for name, w in merged.items():
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        with torch.no_grad():
            linear.weight.copy_(w)
        c_layers[name] = to_bnb_linear4bit(linear, 64, True, compute.dtype)
    model_c = _install(skeleton, c_layers)

    # (d) the exported model: a plain LlamaForCausalLM, every tensor bf16 (what you would ship)
    from qlora_edu.common.base_model import load_base_model

    export, _ = load_base_model(model_name, dtype=compute.dtype, progress=False)
    original = {name: export.get_submodule(name).weight.detach().float().clone() for name in merged}
    with torch.no_grad():
        for name, w in merged.items():
            export.get_submodule(name).weight.copy_(w.to(compute.dtype))
    export.eval()
    st_dir = work / "merged_safetensors"
    t0 = time.perf_counter()
    export.save_pretrained(st_dir)
    tokenizer.save_pretrained(st_dir)
    st_seconds = time.perf_counter() - t0
    st_bytes = sum(f.stat().st_size for f in st_dir.glob("*.safetensors"))
    gguf_dir = work / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_gguf = _bundled_gguf(model_name)
    ggufs = {}
    for kind in ("bf16", "q4_1"):
        t0 = time.perf_counter()
        info = write_gguf(export, gguf_dir / f"merged-{kind}.gguf", kind=kind, tokenizer_from=tokenizer_gguf)
        ggufs[kind] = info | {"write_seconds": time.perf_counter() - t0}
        _log(f"lab6: wrote {kind} GGUF, {info['bytes'] / MiB:.0f} MiB")

    # reload: safetensors with plain from_pretrained; GGUF with from_pretrained(..., gguf_file=...)
    reloaded_st = AutoModelForCausalLM.from_pretrained(st_dir, dtype=compute.dtype).eval()
    reloaded = {}
    for kind in ggufs:
        t0 = time.perf_counter()
        reloaded[kind] = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=f"merged-{kind}.gguf",
                                                              dtype=compute.dtype, **_dense_gguf()).eval()
        ggufs[kind]["load_seconds"] = time.perf_counter() - t0
    if tokenizer_gguf is not None:
        from transformers import AutoTokenizer

        gtok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="merged-bf16.gguf")
        probe = "Ship to: Riga. Contact: Yuki Ito. Items: four kettles."
        payload["gguf_tokenizer_same_ids"] = gtok(probe)["input_ids"] == tokenizer(probe)["input_ids"]
    check = collate_examples(tokenizer, list(heldout[:4]))
    exported = _logits(export, check)
    payload["export"] = {
        "safetensors_bytes": st_bytes, "safetensors_save_seconds": st_seconds,
        "safetensors_logits_equal": bool(torch.equal(_logits(reloaded_st, check), exported)),
        "gguf": ggufs,
        "gguf_bf16_logits_equal": bool(torch.equal(_logits(reloaded["bf16"], check), exported)),
        "gguf_bf16_max_abs_diff": float((_logits(reloaded["bf16"], check).float() - exported.float()).abs().max()),
        "gguf_q4_1_max_abs_diff": float((_logits(reloaded["q4_1"], check).float() - exported.float()).abs().max()),
        "config_roundtrip": {k: [getattr(export.config, k), getattr(reloaded["bf16"].config, k)]
                             for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "intermediate_size", "rms_norm_eps", "vocab_size",
                                       "tie_word_embeddings")}}
    del reloaded_st
    # Where do the Q4_1 weights sit: near the merged weights they were made from, or near the base model's own
    # weights (which came from a Q4_1 file: blocks of 32, the same grid)? Distances relative to ||W_base||.
    dist = dict.fromkeys(("q4_to_base", "q4_to_merged", "merged_to_base", "base"), 0.0)
    for name, w0 in original.items():
        wq = reloaded["q4_1"].get_submodule(name).weight.detach().float()
        dist["q4_to_base"] += float((wq - w0).pow(2).sum())
        dist["q4_to_merged"] += float((wq - merged[name]).pow(2).sum())
        dist["merged_to_base"] += float((merged[name] - w0).pow(2).sum())
        dist["base"] += float(w0.pow(2).sum())
    payload["export"]["q4_1_weights"] = {k: math.sqrt(v / dist["base"]) for k, v in dist.items() if k != "base"}
    del original, merged, reloaded["bf16"]
    gc.collect()

    # teacher-forced comparison on the held-out responses, all against (a)
    _log("lab6: comparing logits")
    models = {"a_unmerged_qlora": qmodel, "base_no_adapter": qmodel, "b_merged_bf16": model_b,
              "c_merged_requantized_nf4": model_c, "d_exported_bf16": export, "e_gguf_q4_1": reloaded["q4_1"]}
    payload["logits_vs_a"] = logit_comparison(models, "a_unmerged_qlora", tokenizer, heldout, batch_size=4,
                                              contexts={"base_no_adapter": qmodel.disable_adapter})

    # the task score of each
    scores = {}
    for name in ("a_unmerged_qlora", "b_merged_bf16", "c_merged_requantized_nf4", "d_exported_bf16",
                 "e_gguf_q4_1"):
        _log(f"lab6: scoring {name}")
        ev = evaluate(models[name], tokenizer, heldout, batch_size=EVAL_BATCH, max_new_tokens=budget.max_new_tokens,
                      progress=progress)
        scores[name] = {"score": ev.score, "correct": [bool(c) for c in ev.correct], "seconds": ev.seconds}
    for name in scores:
        if name != "a_unmerged_qlora":
            gain, low, high = paired_bootstrap_interval(scores["a_unmerged_qlora"]["correct"], scores[name]["correct"])
            scores[name]["vs_a"] = {"difference": gain, "interval_95": [low, high]}
    payload.update(scores=scores, n_eval=len(heldout), losses=run.losses, train_seconds=run.seconds)
    if tmp is not None:
        tmp.cleanup()
    return _finish(payload, began)


# ----------------------------------------------------------------------------------------------
# Lab 8: what the adapters cost in activations


def activation_model(method: str, dtype: torch.dtype, *, r: int = 16, model_name: str | None = None) -> nn.Module:
    """The course model set up for one training step, without checkpointing (:func:`enable_checkpointing` adds it).

    * ``qlora``: NF4 + double quantization, bf16 compute, ``prepare_model_for_kbit_training`` (float32 residual
      stream), LoRA r on all seven projections, dropout 0.05 (the chapter 8 recipe);
    * ``lora``: the model in ``dtype``, frozen, LoRA (peft keeps the adapters in float32);
    * ``full``: the model in ``dtype``, every weight trained.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_edu.ch04_memory.guards import LORA_TARGETS
    from qlora_edu.ch08_finetune.finetune import bnb_config
    from qlora_edu.common.base_model import load_base_model

    quant = bnb_config(torch.bfloat16) if method == "qlora" else None
    model, _ = load_base_model(model_name, dtype=dtype, quantization_config=quant, progress=False)
    if method != "full":
        model.requires_grad_(False)
        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        with _seeded(0):
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, lora_dropout=0.05, bias="none",
                                                     task_type="CAUSAL_LM", target_modules=list(LORA_TARGETS)))
    return model.train()


def enable_checkpointing(model: nn.Module, method: str) -> None:
    """Turn on gradient checkpointing as ``prepare_model_for_kbit_training(use_gradient_checkpointing=True)`` does:
    the reentrant kind (peft's default, so :class:`qlora_edu.ch07_qlora.qlora.SavedTensorLog` also sees what the
    recomputed
    layers save during the backward) and, for adapters, input gradients (a reentrant checkpoint needs an input that
    requires grad, or nothing inside it is differentiated)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if method != "full":
        inner.enable_input_require_grads()


def set_lora_dropout(model: nn.Module, p: float) -> None:
    """Change every LoRA layer's dropout in place (peft builds ``nn.Identity`` for 0, ``nn.Dropout(p)`` else)."""
    for _, layer in _lora_layers(model):
        for key in layer.lora_dropout:
            layer.lora_dropout[key] = nn.Dropout(p) if p > 0 else nn.Identity()


def measure_activations(model: nn.Module, batch: dict) -> dict:
    """What autograd saves for backward in one step on ``batch``: the distinct bytes saved by the end of the forward
    (:func:`qlora_edu.ch04_memory.memory_probe.saved_activation_bytes`) and, over forward and backward, the most held
    at once
    with their breakdown by dtype (:class:`qlora_edu.ch07_qlora.qlora.SavedTensorLog`)."""
    from qlora_edu.ch04_memory.memory_probe import saved_activation_bytes
    from qlora_edu.ch07_qlora.qlora import SavedTensorLog

    with _seeded(0):
        forward_saved = saved_activation_bytes(model, batch)
    with _seeded(0), SavedTensorLog(exclude=model) as log:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    by_dtype: dict[str, int] = {}
    for _, dtype, nbytes in log.records:
        key = str(dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + nbytes
    return {"forward_saved_bytes": forward_saved, "peak_held_bytes": log.peak_bytes, "n_saves": len(log.records),
            "saved_by_dtype_bytes": by_dtype}


def run_lab8(budget: Budget, *, model_name: str | None = None, progress: bool = True, smoke: bool = False) -> dict:
    """Saved-for-backward bytes of LoRA (dropout 0.05 and 0) and full fine-tuning on the same batch, with and without
    gradient checkpointing; chapter 4's prediction beside each, and the 7B picture from the same formula."""
    from qlora_edu.ch04_memory.memory import llama_config, training_memory
    from qlora_edu.common.progress import progress_bar

    began = time.perf_counter()
    payload = {"lab": "lab8", "question": "What do the adapters cost in activations? peft keeps them in float32 and "
               "applies dropout to each adapted layer's input, which saves extra copies for backward: how much, and "
               "when does it matter?", "smoke": smoke, "machine": machine()}
    from qlora_edu.ch08_finetune.instruct_data import load_tokenizer

    tokenizer = load_tokenizer(model_name)
    examples = load_dataset("train")[:budget.batch_size]
    collated = collate_examples(tokenizer, examples)
    batch = {k: collated[k] for k in ("input_ids", "attention_mask", "labels")}
    n_batch, seq = batch["input_ids"].shape
    payload.update(budget=budget.__dict__, batch_size=n_batch, seq_len=seq, tokens=n_batch * seq, lora_r=16)
    set_ups = [("qlora", torch.bfloat16, "NF4 base, bf16 compute, prepare (float32 residual)"),
               ("lora", torch.float32, "float32 base"), ("lora", torch.bfloat16, "bf16 base"),
               ("full", torch.float32, "float32"), ("full", torch.bfloat16, "bf16")]
    if smoke:  # one adapter set-up and full fine-tuning: every code path, a fraction of the loading
        set_ups = [set_ups[0], set_ups[3]]
    rows = []
    bar = progress_bar(desc="lab8 set-ups", total=len(set_ups), unit="set-ups", enabled=progress)
    with bar:
        for method, dtype, what in set_ups:
            model = activation_model(method, dtype, model_name=model_name)
            config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
            for ckpt in (False, True):
                if ckpt:
                    enable_checkpointing(model, method)
                for dropout in ((0.05, 0.0) if method != "full" else (None,)):
                    if dropout is not None:
                        set_lora_dropout(model, dropout)
                    measured = measure_activations(model, batch)
                    settings_ = {"weight_dtype": dtype, "device": "cpu"}
                    if method != "full":
                        settings_["lora_dropout"] = dropout
                    predicted = training_memory(config, method, batch_size=n_batch, seq_len=seq, lora_r=16,
                                                gradient_checkpointing=ckpt, **settings_)
                    rows.append({"method": method, "dtype": str(dtype).removeprefix("torch."), "what": what,
                                 "checkpointing": ckpt, "lora_dropout": dropout, **measured,
                                 "predicted_saved_bytes": predicted.saved_activations,
                                 "predicted_layer_saved": [list(x) for x in predicted.layer_saved]})
                    _log(f"lab8: {method} {dtype} ckpt={ckpt} dropout={dropout}: forward saves "
                         f"{measured['forward_saved_bytes'] / MiB:.1f} MiB (predicted "
                         f"{predicted.saved_activations / MiB:.1f}), peak held {measured['peak_held_bytes'] / MiB:.1f}")
            del model
            gc.collect()  # peft's hooks make reference cycles: free this set-up's tensors before the next one
            bar.update()
    payload["rows"] = rows

    # When it matters: the same formula for LLaMA-7B on a GPU (QLoRA, r = 64, paged AdamW), dropout 0.05 vs 0.
    big = []
    for batch_size, seq_len in ((1, 512), (4, 512), (1, 2048), (8, 2048)):
        for ckpt in (True, False):
            totals = {}
            for dropout in (0.05, 0.0):
                m = training_memory(llama_config("7B"), "qlora", batch_size=batch_size, seq_len=seq_len, lora_r=64,
                                    gradient_checkpointing=ckpt, optimizer="paged_adamw", lora_dropout=dropout)
                totals[dropout] = {"total": m.total, "saved_activations": m.saved_activations}
            big.append({"batch_size": batch_size, "seq_len": seq_len, "checkpointing": ckpt,
                        "total_dropout_0.05": totals[0.05]["total"], "total_dropout_0": totals[0.0]["total"],
                        "saved_dropout_0.05": totals[0.05]["saved_activations"],
                        "saved_dropout_0": totals[0.0]["saved_activations"]})
    payload["llama7b_gpu_predicted"] = big
    return _finish(payload, began)


# ----------------------------------------------------------------------------------------------
# The command line


LABS = {"lab4": run_lab4, "lab5": run_lab5, "lab6": run_lab6, "lab8": run_lab8}


def run(lab: str, *, smoke: bool | None = None, out: Path = DEFAULT_OUT, steps: int | None = None,
        eval_size: int | None = None, model_name: str | None = None, work: Path | None = None,
        progress: bool = True, formats: Sequence[str] | None = None) -> Path:
    """Run one lab and write its results file; returns the file's path.

    ``formats`` (lab 4 only): run these bases only and write ``lab4_quant.part-<formats>.json``; join the parts
    with ``python qlora_edu/ch09_labs/labs_b.py lab4 --merge PART...``."""
    if lab not in LABS:
        raise ValueError(f"lab must be one of {sorted(LABS)}, got {lab!r}")
    smoke = settings.smoke_mode() if smoke is None else smoke
    budget = budget_for(lab, smoke, steps, eval_size)
    if not progress:  # this process only: a script, not the package
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    kwargs = {"model_name": model_name, "progress": progress, "smoke": smoke}
    if lab in ("lab5", "lab6"):
        kwargs["work"] = work
    if formats is not None:
        if lab != "lab4" or not formats or any(f not in FORMATS for f in formats):
            raise ValueError(f"formats are for lab4, a subset of {list(FORMATS)}; got {formats!r} for {lab}")
        kwargs["formats"] = [f for f in FORMATS if f in formats]
    payload = LABS[lab](budget, **kwargs)
    if formats is not None and len(kwargs["formats"]) < len(FORMATS):
        path = Path(out) / f"lab4_quant.part-{'-'.join(kwargs['formats'])}.json"
        Path(out).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1) + "\n")
    else:
        path = write_result(Path(out), lab, payload)
    _log(f"{lab}: wrote {path} ({payload['wall_seconds']:.0f} s)")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lab", choices=sorted(LABS))
    parser.add_argument("--smoke", action="store_true", default=None, help="the CI budget (default: QLORA_EDU_SMOKE)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, help="training steps (default: the lab's budget)")
    parser.add_argument("--eval-size", type=int, help="held-out orders scored (default: the lab's budget)")
    parser.add_argument("--model", help="hub id or folder of a Llama-style model (default: the bundled SmolLM2)")
    parser.add_argument("--work", type=Path, help="keep adapters and exported models here (default: a temp folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--formats", help="lab4: a comma-separated subset of bf16,nf4,fp4,int4 (a part file)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="PART",
                        help="lab4: join part files (from --formats runs) into OUT/lab4_quant.json")
    args = parser.parse_args(argv)
    if args.merge:
        if args.lab != "lab4":
            parser.error("--merge is for lab4")
        path = write_result(args.out, "lab4", merge_lab4_parts(args.merge))
        _log(f"lab4: merged {len(args.merge)} parts into {path}")
        return 0
    formats = args.formats.split(",") if args.formats else None
    run(args.lab, smoke=args.smoke, out=args.out, steps=args.steps, eval_size=args.eval_size, model_name=args.model,
        work=args.work, progress=not args.no_progress, formats=formats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
