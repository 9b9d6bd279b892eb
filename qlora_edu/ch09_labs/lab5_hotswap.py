"""Lab 5: two adapters, one 4-bit base, switched at inference.

Note 001: "train multiple adapters (chat, code) on the same 4-bit base and hot-swap them at inference". Two tasks on
the same orders: chapter 8's JSON, and a one-line shipping label (:func:`label_line`). One QLoRA adapter is trained
for each (chapter 8's recipe and loop); then one 4-bit base is loaded once, both adapters are attached with peft's
``load_adapter`` and switched with ``set_adapter``. Measured: the score of every (adapter, task) pair, whether the
served adapters compute bit for bit what they computed when trained, how long a load and a switch take, and the
memory each adapter adds (and would add on a 7B model, from chapters 3 and 6's formulas).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qlora_edu.ch08_finetune.finetune import generate_replies, train
from qlora_edu.ch08_finetune.instruct_data import Example, collate_examples, score_answers
from qlora_edu.ch09_labs.common import Budget, Context, finetune_config, logits, seeded
from qlora_edu.common.training_setup import bnb_config, lora_config

QUESTION = ("Two adapters for two tasks on one 4-bit base, switched at inference: do they work, how fast is a "
            "switch, and what memory does each adapter add?")
FULL = Budget(steps=16, batch_size=8, eval_size=100, loss_size=0)
SMOKE = Budget(steps=2, batch_size=2, eval_size=4, loss_size=0, max_new_tokens=12)
EVAL_BATCH = 25  # orders generated at once (the prompts' logits of 100 at once take ~2 GB)
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


def run(ctx: Context, budget: Budget) -> dict:
    from peft import PeftModel, prepare_model_for_kbit_training

    from qlora_edu.ch03_double_quant.storage import quantized_bytes, quantized_linear_params, total_params
    from qlora_edu.ch04_memory.memory_probe import static_bytes, tensor_bytes
    from qlora_edu.ch06_lora.lora import lora_param_count
    from qlora_edu.ch08_finetune.finetune import load_qlora_model
    from qlora_edu.common.base_model import load_base_model

    compute = ctx.compute
    # QLoRA's gradient checkpointing (chapter 8's recipe): a fraction of the activation memory, for 30% more time
    config = finetune_config(ctx, budget, gradient_checkpointing=True)
    train_orders, heldout_orders = ctx.train_set, ctx.heldout[:budget.eval_size]
    train_labels, heldout_labels = as_label_examples(train_orders), as_label_examples(heldout_orders)
    body = {"config": config.to_dict(), "label_instruction": LABEL_INSTRUCTION,
            "label_example": {"message": heldout_labels[0].message, "reply": heldout_labels[0].response}}

    # 1. Training: the orders adapter ("default") and, on the same model, a second adapter ("label").
    qmodel, tokenizer = load_qlora_model(ctx.model_path, config=config, compute=compute, progress=False)
    label_tokenizer = TaskTokenizer(tokenizer, LABEL_INSTRUCTION)
    ctx.say("lab5: training the orders adapter")
    orders_run = train(qmodel, tokenizer, train_orders, config, progress=ctx.progress)
    with seeded(config.seed + 1):
        qmodel.add_adapter("label", lora_config(config.lora_r, config.lora_alpha, config.lora_dropout,
                                                config.target_modules))
    qmodel.set_adapter("label")
    trainable = sum(p.numel() for p in qmodel.parameters() if p.requires_grad)
    ctx.say("lab5: training the label adapter")
    label_run = train(qmodel, label_tokenizer, train_labels, replace(config, seed=config.seed + 1),
                      progress=ctx.progress)
    with contextlib.ExitStack() as stack:
        work = ctx.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lab5-")))
        adapters_dir = Path(work) / "lab5_adapters"
        qmodel.save_pretrained(adapters_dir)  # "default" in the folder, "label" in its subfolder
        files = {"orders": adapters_dir / "adapter_model.safetensors",
                 "label": adapters_dir / "label" / "adapter_model.safetensors"}
        check_orders = collate_examples(tokenizer, list(heldout_orders[:4]))
        check_labels = collate_examples(label_tokenizer, list(heldout_labels[:4]))
        qmodel.set_adapter("default")
        trained_logits = {"orders": logits(qmodel, check_orders)}
        qmodel.set_adapter("label")
        trained_logits["label"] = logits(qmodel, check_labels)
        del qmodel

        # 2. Serving: one 4-bit base, prepared as for training, then the adapters loaded one after the other.
        t0 = time.perf_counter()
        device = compute.device if compute.device.type == "cuda" else None
        base, _ = load_base_model(ctx.model_path, dtype=compute.dtype, device=device,
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
        file_bytes = {k: v.stat().st_size for k, v in files.items()}
    served.eval()

    switches = []
    for name in ["orders", "label"] * (5 if ctx.smoke else 50):
        t0 = time.perf_counter()
        served.set_adapter(name)
        switches.append(time.perf_counter() - t0)
    switches.sort()

    served.set_adapter("orders")
    orders_logits = logits(served, check_orders)
    served.set_adapter("label")
    label_logits = logits(served, check_labels)
    served.set_adapter("orders")
    again = logits(served, check_orders)
    with served.disable_adapter():
        base_logits = logits(served, check_orders)
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
            ctx.say(f"lab5: adapter {adapter} on task {task}")
            t0 = time.perf_counter()
            context = served.disable_adapter() if adapter == "base" else contextlib.nullcontext()
            if adapter != "base":
                served.set_adapter(adapter)
            with context:
                new_tokens = budget.max_new_tokens if task == "orders" else min(32, budget.max_new_tokens)
                replies = generate_replies(served, tok, examples, batch_size=EVAL_BATCH, max_new_tokens=new_tokens,
                                           progress=ctx.progress)
            correct = score_answers(replies, examples) if task == "orders" else score_labels(replies, examples)
            matrix[adapter][task] = {"score": sum(correct) / len(correct), "n": len(correct),
                                     "example_reply": replies[0], "seconds": time.perf_counter() - t0}

    # 4. The same adapters on a 7B model (LLaMA-1 shape), from the memory formulas of chapters 3 and 6.
    n7 = lora_param_count("7B", config.lora_r, config.target_modules)
    linear7 = quantized_linear_params("7B")
    base7 = quantized_bytes(linear7) + (total_params("7B") - linear7) * 2  # 4-bit linears + bf16 rest
    return body | {
        "adapter_parameters": trainable,
        "memory": {"base_as_loaded_bytes": as_loaded, "base_prepared_bytes": prepared,
                   "orders_adapter_bytes": _adapter_bytes(served, "orders"),
                   "label_adapter_bytes": _adapter_bytes(served, "label"),
                   "added_by_orders_bytes": with_orders - prepared, "added_by_label_bytes": with_both - with_orders,
                   "adapter_file_bytes": file_bytes, "static_after_both": static_bytes(served)},
        "seconds": {"load_4bit_base": base_seconds, "load_orders_adapter": orders_seconds,
                    "load_label_adapter": label_seconds, "set_adapter_median": switches[len(switches) // 2],
                    "set_adapter_max": switches[-1], "n_switches": len(switches),
                    "train_orders": orders_run.seconds, "train_label": label_run.seconds},
        "losses": {"orders": orders_run.losses, "label": label_run.losses},
        "exact": exact, "matrix": matrix, "n_eval": len(heldout_orders),
        "llama7b": {"adapter_parameters": n7, "adapter_bytes_fp32": 4 * n7, "base_bytes_nf4": base7,
                    "lora_r": config.lora_r},
    }


def verdicts(res: dict) -> list[str]:
    """Lab 5's findings from its results file."""
    m, ex = res["matrix"], res["exact"]
    return [
        "own task / other task: " + ", ".join(f"{a} adapter {m[a][a]['score']:.0%} / "
                                              f"{m[a]['label' if a == 'orders' else 'orders']['score']:.0%}"
                                              for a in ("orders", "label")),
        "reloaded adapters give the trained logits exactly: "
        f"{ex['orders_equals_trained'] and ex['label_equals_trained']}; switching back changes nothing: "
        f"{ex['switch_back_equal']}",
    ]
