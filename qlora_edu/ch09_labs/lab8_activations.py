"""Lab 8: what the adapters cost in activations.

peft keeps the adapters in float32 and applies dropout to each adapted layer's input, ``B A dropout(x)``: the
dropped-out copy of ``x`` (and its mask) is saved for backward, once per adapted projection. How much, and when does
it matter? Saved-for-backward bytes of QLoRA, LoRA (dropout 0.05 and 0) and full fine-tuning on the same batch, with
and without gradient checkpointing (:func:`measure_activations`), chapter 4's prediction beside each, and the 7B
picture from the same formula. No training: ``steps`` is 0.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from qlora_edu.ch08_finetune.instruct_data import collate_examples
from qlora_edu.ch09_labs.common import Budget, Context, MiB, lora_layers, seeded
from qlora_edu.ch09_labs.trials import set_checkpointing
from qlora_edu.common.training_setup import load_for_training

QUESTION = ("What do the adapters cost in activations? peft keeps them in float32 and applies dropout to each adapted "
            "layer's input, which saves extra copies for backward: how much, and when does it matter?")
FULL = Budget(steps=0, batch_size=2, eval_size=0, loss_size=0)
SMOKE = Budget(steps=0, batch_size=1, eval_size=0, loss_size=0)


def activation_model(method: str, dtype: torch.dtype, *, r: int = 16, model_path: str | None = None) -> nn.Module:
    """The course model set up for one training step, without checkpointing (:func:`enable_checkpointing` adds it).

    * ``qlora``: NF4 + double quantization, bf16 compute, ``prepare_model_for_kbit_training`` (float32 residual
      stream), LoRA r on all seven projections, dropout 0.05 (the chapter 8 recipe);
    * ``lora``: the model in ``dtype``, frozen, LoRA (peft keeps the adapters in float32);
    * ``full``: the model in ``dtype``, every weight trained.
    """
    model, _ = load_for_training(method, model_path, dtype=dtype, compute_dtype=torch.bfloat16, progress=False, r=r,
                                 alpha=float(r), dropout=0.05, gradient_checkpointing=False, seed=0)
    return model


def enable_checkpointing(model: nn.Module, method: str) -> None:
    """Turn on gradient checkpointing as ``prepare_model_for_kbit_training(use_gradient_checkpointing=True)`` does:
    the reentrant kind (peft's default, so :class:`qlora_edu.ch07_qlora.tools.SavedTensorLog` also sees what the
    recomputed layers save during the backward) and, for adapters, input gradients (a reentrant checkpoint needs an
    input that requires grad, or nothing inside it is differentiated)."""
    set_checkpointing(model, True)
    if method != "full":
        (model.get_base_model() if hasattr(model, "get_base_model") else model).enable_input_require_grads()


def set_lora_dropout(model: nn.Module, p: float) -> None:
    """Change every LoRA layer's dropout in place (peft builds ``nn.Identity`` for 0, ``nn.Dropout(p)`` else)."""
    for _, layer in lora_layers(model):
        for key in layer.lora_dropout:
            layer.lora_dropout[key] = nn.Dropout(p) if p > 0 else nn.Identity()


def measure_activations(model: nn.Module, batch: dict) -> dict:
    """What autograd saves for backward in one step on ``batch``: the distinct bytes saved by the end of the forward
    (:func:`qlora_edu.ch04_memory.memory_probe.saved_activation_bytes`) and, over forward and backward, the most held
    at once with their breakdown by dtype (:class:`qlora_edu.ch07_qlora.tools.SavedTensorLog`)."""
    from qlora_edu.ch04_memory.memory_probe import saved_activation_bytes
    from qlora_edu.ch07_qlora.tools import SavedTensorLog

    with seeded(0):
        forward_saved = saved_activation_bytes(model, batch)
    with seeded(0), SavedTensorLog(exclude=model) as log:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    by_dtype: dict[str, int] = {}
    for _, dtype, nbytes in log.records:
        key = str(dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + nbytes
    return {"forward_saved_bytes": forward_saved, "peak_held_bytes": log.peak_bytes, "n_saves": len(log.records),
            "saved_by_dtype_bytes": by_dtype}


def run(ctx: Context, budget: Budget) -> dict:
    from qlora_edu.ch04_memory.memory import llama_config, training_memory
    from qlora_edu.common.progress import progress_bar

    examples = ctx.train_set[:budget.batch_size]
    collated = collate_examples(ctx.tokenizer, examples)
    batch = {k: collated[k] for k in ("input_ids", "attention_mask", "labels")}
    n_batch, seq = batch["input_ids"].shape
    padded = bool((batch["attention_mask"] == 0).any())  # chapter 4 predicts a padded batch's attention apart
    payload: dict = {"batch_size": n_batch, "seq_len": seq, "tokens": n_batch * seq, "lora_r": 16, "padded": padded}
    set_ups = [("qlora", torch.bfloat16, "NF4 base, bf16 compute, prepare (float32 residual)"),
               ("lora", torch.float32, "float32 base"), ("lora", torch.bfloat16, "bf16 base"),
               ("full", torch.float32, "float32"), ("full", torch.bfloat16, "bf16")]
    if ctx.smoke:  # one adapter set-up and full fine-tuning: every code path, a fraction of the loading
        set_ups = [set_ups[0], set_ups[3]]
    rows = []
    bar = progress_bar(desc="lab8 set-ups", total=len(set_ups), unit="set-ups", enabled=ctx.progress)
    with bar:
        for method, dtype, what in set_ups:
            model = activation_model(method, dtype, model_path=ctx.model_path)
            config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
            for ckpt in (False, True):
                if ckpt:
                    enable_checkpointing(model, method)
                for dropout in ((0.05, 0.0) if method != "full" else (None,)):
                    if dropout is not None:
                        set_lora_dropout(model, dropout)
                    measured = measure_activations(model, batch)
                    settings_ = {"weight_dtype": dtype, "device": "cpu", "padded": padded}
                    if method != "full":
                        settings_["lora_dropout"] = dropout
                    predicted = training_memory(config, method, batch_size=n_batch, seq_len=seq, lora_r=16,
                                                gradient_checkpointing=ckpt, **settings_)
                    rows.append({"method": method, "dtype": str(dtype).removeprefix("torch."), "what": what,
                                 "checkpointing": ckpt, "lora_dropout": dropout, **measured,
                                 "predicted_saved_bytes": predicted.saved_activations,
                                 "predicted_layer_saved": [list(x) for x in predicted.layer_saved]})
                    ctx.say(f"lab8: {method} {dtype} ckpt={ckpt} dropout={dropout}: forward saves "
                            f"{measured['forward_saved_bytes'] / MiB:.1f} MiB (predicted "
                            f"{predicted.saved_activations / MiB:.1f}), peak held "
                            f"{measured['peak_held_bytes'] / MiB:.1f}")
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
    return payload


def verdicts(res: dict) -> list[str]:
    """Lab 8's findings from its results file."""
    def saved(ckpt, dropout):
        return next(r["forward_saved_bytes"] for r in res["rows"] if r["method"] == "qlora"
                    and r["checkpointing"] == ckpt and r["lora_dropout"] == dropout) / MiB

    extra, extra_ckpt = saved(False, 0.05) - saved(False, 0.0), saved(True, 0.05) - saved(True, 0.0)
    errors = [(r["predicted_saved_bytes"] - r["forward_saved_bytes"]) / r["forward_saved_bytes"] for r in res["rows"]]
    batch = "a padded batch" if res.get("padded") else "an unpadded batch"
    return [f"dropout 0.05 adds {extra:.0f} MiB ({extra / saved(False, 0.0):.0%}) to QLoRA's activations without "
            f"checkpointing, {extra_ckpt:.0f} MiB with it",
            f"chapter 4's prediction of the bytes saved for backward, {batch} of {res['batch_size']} x "
            f"{res['seq_len']}: off by at most {max(abs(e) for e in errors):.2%} over {len(errors)} set-ups "
            f"(largest {max(errors, key=abs):+.2%})"]
