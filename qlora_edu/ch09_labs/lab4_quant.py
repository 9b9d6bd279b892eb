"""Lab 4: NF4 vs FP4 vs Int4 vs bf16 bases.

Note 001: "compare NF4, Int4 and BF16 base weights to gauge accuracy drop"; the QLoRA paper: NF4 with double
quantization recovers 16-bit LoRA quality, FP4 falls short. Each base is the course model with every linear weight
replaced by ``dequantize(quantize(W))`` in that format (:func:`fake_quantizer`: the course's own functions, blocks
of 64), then the same adapters, batches and steps (chapter 8's loop). Measured: the weights' relative error, the base
model's perplexity on the course's reference text, the held-out loss before and after training, the score, the
fields right, and each 4-bit base's score difference from bf16 on the same orders (paired bootstrap, sign test).
"""

from __future__ import annotations

import copy
import gc
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from qlora_edu.ch08_finetune.finetune import evaluate, heldout_loss, train
from qlora_edu.ch08_finetune.instruct_data import field_accuracy, paired_bootstrap_interval, sign_test_p_value
from qlora_edu.ch09_labs.common import Budget, Context, finetune_config, score_text
from qlora_edu.common.training_setup import setup_training

QUESTION = ("Fine-tuned on an NF4, FP4, Int4 or bf16 base: does NF4 recover 16-bit quality, as the QLoRA paper "
            "says?")
FULL = Budget(steps=20, batch_size=8, eval_size=100, loss_size=100)
SMOKE = Budget(steps=2, batch_size=2, eval_size=4, loss_size=4, max_new_tokens=12)
FORMATS = ("bf16", "nf4", "fp4", "int4")
FORMAT_BITS = {"bf16": 16.0, "nf4": None, "fp4": 4.5, "int4": 4.5}  # nf4: storage.bits_per_param() (with DQ)
FORMAT_LABELS = {"bf16": "bf16 (16-bit reference)", "nf4": "NF4 + double quantization (QLoRA)",
                 "fp4": "FP4 (E2M1, bitsandbytes' default)", "int4": "Int4 absmax (chapter 1)"}


def fake_quantizer(fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``W -> dequantize(quantize(W))`` for a 4-bit format, with the course's own functions, blocksize 64.

    * ``nf4``: :func:`qlora_edu.ch03_double_quant.nf4_codec.quantize_nf4` with double quantization (QLoRA's
      storage, byte for byte bitsandbytes'), back with :func:`~qlora_edu.ch03_double_quant.nf4_codec.dequantize_nf4`;
    * ``fp4``: :func:`qlora_edu.ch02_nf4.quant4bit.quantize_4bit` with :func:`qlora_edu.ch02_nf4.nf4.fp4_code`
      (float32 constants);
    * ``int4``: :func:`qlora_edu.ch01_absmax.absmax.absmax_quantize` (codes -7..7, one float32 scale a block).

    The 4-bit layer computes ``x @ dequantize(W)^T`` in the compute dtype on every pass; storing the dequantized
    ``W`` in that dtype once gives the same numbers (:func:`nf4_layer_check`) and trains faster. Memory is not this
    lab's question.
    """
    from qlora_edu.ch01_absmax.absmax import absmax_dequantize, absmax_quantize
    from qlora_edu.ch02_nf4.nf4 import fp4_code
    from qlora_edu.ch02_nf4.quant4bit import dequantize_4bit, quantize_4bit
    from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4, quantize_nf4

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


def compare_with_bf16(rows: dict) -> dict:
    """Add to each 4-bit format's row its score difference from bf16 on the same orders (paired bootstrap 95%
    interval, sign test)."""
    reference = rows["bf16"]["correct"]
    for fmt in rows:
        if fmt != "bf16":
            gain, low, high = paired_bootstrap_interval(reference, rows[fmt]["correct"])
            rows[fmt]["vs_bf16"] = {"difference": gain, "interval_95": [low, high],
                                    "sign_test_p": sign_test_p_value(reference, rows[fmt]["correct"])}
    return rows


def run(ctx: Context, budget: Budget) -> dict:
    from qlora_edu.ch03_double_quant.storage import bits_per_param
    from qlora_edu.common.base_model import load_base_model
    from qlora_edu.common.perplexity import perplexity, reference_text, replace_linear_weights

    config = finetune_config(ctx, budget)
    heldout, tokenizer = ctx.heldout[:budget.eval_size], ctx.tokenizer
    ppl_tokens = 256 if ctx.smoke else 4096
    ppl_text = reference_text()[:8 * ppl_tokens]  # tokenize a slice, not all 465k characters, four times
    device = ctx.compute.device if ctx.compute.device.type == "cuda" else None
    pristine, _ = load_base_model(ctx.model_path, dtype=ctx.compute.dtype, device=device, progress=False)
    first_q = next(m for n, m in pristine.named_modules() if n.endswith("q_proj"))
    body = {"nf4_shortcut_max_abs_diff": nf4_layer_check(first_q, ctx.compute.dtype), "config": config.to_dict(),
            "perplexity_tokens": ppl_tokens}
    rows = {}
    for fmt in FORMATS:
        t0 = time.perf_counter()
        ctx.say(f"lab4: {fmt}")
        model = copy.deepcopy(pristine)
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
        loss_before = heldout_loss(model, tokenizer, ctx.heldout[:budget.loss_size], batch_size=16)
        model = setup_training(model, "lora", r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                               targets=config.target_modules, gradient_checkpointing=False, seed=config.seed)
        result = train(model, tokenizer, ctx.train_set, config, progress=ctx.progress)
        loss_after = heldout_loss(model, tokenizer, ctx.heldout[:budget.loss_size], batch_size=16)
        ev = evaluate(model, tokenizer, heldout, max_new_tokens=config.max_new_tokens, progress=ctx.progress)
        bits = bits_per_param() if fmt == "nf4" else FORMAT_BITS[fmt]
        rows[fmt] = {"label": FORMAT_LABELS[fmt], "bits_per_weight": bits,
                     "weight_relative_rmse": math.sqrt(err["num"] / err["den"]) if err["den"] else 0.0,
                     "quantized_weights": err["n"], "base_perplexity": ppl, "heldout_loss_before": loss_before,
                     "heldout_loss_after": loss_after, "score": ev.score, "correct": [bool(c) for c in ev.correct],
                     "field_accuracy": field_accuracy(ev.replies, heldout), "losses": result.losses,
                     "train_seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
                     "eval_seconds": ev.seconds, "seconds": time.perf_counter() - t0,
                     "example_replies": ev.replies[:3]}
        ctx.say(f"lab4: {fmt}: score {ev.score:.3f}, held-out loss {loss_before:.3f} -> {loss_after:.4f}, "
                f"perplexity {ppl:.2f} ({time.perf_counter() - t0:.0f} s)")
        del model
        gc.collect()
    return body | {"formats": compare_with_bf16(rows), "n_eval": len(heldout)}


def verdicts(res: dict) -> list[str]:
    """Lab 4's findings from its results file (one seed each)."""
    f = res["formats"]
    four_bit = [k for k, v in f.items() if v["bits_per_weight"] < 8]
    by_loss = sorted(four_bit, key=lambda k: f[k]["heldout_loss_after"])
    by_score = sorted(four_bit, key=lambda k: -sum(f[k]["correct"]))
    return [
        "before training, perplexity: " + ", ".join(f"{k} {v['base_perplexity']:.1f}" for k, v in f.items()),
        "after the same steps, one seed, held-out loss: " + ", ".join(f"{k} {v['heldout_loss_after']:.4f}"
                                                                     for k, v in f.items()),
        "exact score, one seed: " + ", ".join(f"{k} {score_text(v['correct'])}" for k, v in f.items())
        + (": the score ranks the 4-bit formats as the loss does" if by_loss == by_score else
           f": the score ranks the 4-bit formats {', '.join(by_score)}, the loss {', '.join(by_loss)} (one seed, "
           f"{res['n_eval']} orders: the loss resolves them, the score does not)"),
    ]
