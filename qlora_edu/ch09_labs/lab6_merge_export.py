"""Lab 6: merging into a 4-bit base, and exporting (safetensors, GGUF).

Note 001: "after training, optionally merge LoRA into 4-bit weights when converting to GGUF or CPU inference".
Merging computes ``W' = dequantize(W_NF4) + (alpha/r) B A``; storing ``W'`` again in NF4 rounds the update away
wherever it is smaller than NF4's step. One QLoRA adapter is trained (chapter 8's recipe and loop), then compared,
all against (a), teacher-forced on the held-out responses (:func:`logit_comparison`) and by score: (a) the unmerged
QLoRA model, (b) ``W'`` stored in bf16, (c) ``W'`` re-quantized to NF4 (what ``merge_and_unload`` does on a 4-bit
model), (d) the model exported with every tensor in bf16 (safetensors), (e) that model written as a Q4_1 GGUF file
(:func:`write_gguf`) and loaded back by transformers. :func:`merged_weights` measures how much of the update each
way of storing ``W'`` keeps.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.ch08_finetune.finetune import evaluate, train
from qlora_edu.ch08_finetune.instruct_data import IGNORE_INDEX, Example, collate_examples, paired_bootstrap_interval
from qlora_edu.ch09_labs.common import Budget, Context, MiB, finetune_config, logits, lora_layers
from qlora_edu.common import settings
from qlora_edu.common.training_setup import to_bnb_linear4bit

QUESTION = ("Merging adapters into a 4-bit base is lossy: how lossy, compared with merging into the dequantized "
            "bf16 base? And does the merged model survive export to safetensors and GGUF?")
FULL = Budget(steps=16, batch_size=8, eval_size=100, loss_size=100)
SMOKE = Budget(steps=2, batch_size=2, eval_size=4, loss_size=4, max_new_tokens=12)
EVAL_BATCH = 25  # orders generated at once (the prompts' logits of 100 at once take ~2 GB)


class CastLinear(nn.Module):
    """A frozen linear layer that computes like bitsandbytes' ``Linear4bit``: the input cast to the weight's dtype
    (the compute dtype), ``x W^T``, the output cast back to the input's dtype. Holds a dense (merged) weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


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

    from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4, quantize_nf4

    merged: dict[str, torch.Tensor] = {}
    stats = dict.fromkeys(("delta", "bf16_error", "nf4_error", "nf4_update", "nf4_update_dot", "weights"), 0.0)
    for name, layer in lora_layers(peft_model):
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


def _skeleton(model_path, compute) -> nn.Module:
    """The base model unquantized, with the non-linear weights in float32 as ``prepare_model_for_kbit_training``
    leaves them (embeddings, norms): the frame into which merged weights go, computing as the QLoRA model does."""
    from qlora_edu.common.base_model import load_base_model

    device = compute.device if compute.device.type == "cuda" else None
    model, _ = load_base_model(model_path, dtype=compute.dtype, device=device, progress=False)
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
                outs[name] = logits(model, batch)[:, :-1][mask].float()  # (response tokens, V)
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


def _bundled_gguf(model_path) -> Path | None:
    """The bundled model's GGUF (for its tokenizer entries) when the lab runs on the bundled model."""
    if model_path is not None or settings.model_override() is not None:
        return None
    from qlora_edu.common.base_model import find_gguf

    return find_gguf()


def run(ctx: Context, budget: Budget) -> dict:
    with contextlib.ExitStack() as stack:  # the files written on the way: in ctx.work, or a temporary folder
        work = ctx.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lab6-")))
        return _run(ctx, budget, Path(work))


def _run(ctx: Context, budget: Budget, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from qlora_edu.ch08_finetune.finetune import load_qlora_model
    from qlora_edu.common.base_model import load_base_model

    compute = ctx.compute
    config = finetune_config(ctx, budget, gradient_checkpointing=True)  # as lab 5: memory
    heldout = ctx.heldout[:budget.eval_size]
    payload: dict = {"config": config.to_dict()}

    # (a) the trained QLoRA model, unmerged
    qmodel, tokenizer = load_qlora_model(ctx.model_path, config=config, compute=compute, progress=False)
    ctx.say("lab6: training")
    run = train(qmodel, tokenizer, ctx.train_set, config, progress=ctx.progress)
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
    skeleton = _skeleton(ctx.model_path, compute)
    model_b = _install(copy.deepcopy(skeleton), {n: CastLinear(w.to(compute.dtype)) for n, w in merged.items()})
    c_layers = {}
    for name, w in merged.items():
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        with torch.no_grad():
            linear.weight.copy_(w)
        c_layers[name] = to_bnb_linear4bit(linear, 64, True, compute.dtype)
    model_c = _install(skeleton, c_layers)

    # (d) the exported model: a plain LlamaForCausalLM, every tensor bf16 (what you would ship)
    export, _ = load_base_model(ctx.model_path, dtype=compute.dtype, progress=False)
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
    tokenizer_gguf = _bundled_gguf(ctx.model_path)
    ggufs = {}
    for kind in ("bf16", "q4_1"):
        t0 = time.perf_counter()
        info = write_gguf(export, gguf_dir / f"merged-{kind}.gguf", kind=kind, tokenizer_from=tokenizer_gguf)
        ggufs[kind] = info | {"write_seconds": time.perf_counter() - t0}
        ctx.say(f"lab6: wrote {kind} GGUF, {info['bytes'] / MiB:.0f} MiB")

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
    exported = logits(export, check)
    payload["export"] = {
        "safetensors_bytes": st_bytes, "safetensors_save_seconds": st_seconds,
        "safetensors_logits_equal": bool(torch.equal(logits(reloaded_st, check), exported)),
        "gguf": ggufs,
        "gguf_bf16_logits_equal": bool(torch.equal(logits(reloaded["bf16"], check), exported)),
        "gguf_bf16_max_abs_diff": float((logits(reloaded["bf16"], check).float() - exported.float()).abs().max()),
        "gguf_q4_1_max_abs_diff": float((logits(reloaded["q4_1"], check).float() - exported.float()).abs().max()),
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
    ctx.say("lab6: comparing logits")
    models = {"a_unmerged_qlora": qmodel, "base_no_adapter": qmodel, "b_merged_bf16": model_b,
              "c_merged_requantized_nf4": model_c, "d_exported_bf16": export, "e_gguf_q4_1": reloaded["q4_1"]}
    payload["logits_vs_a"] = logit_comparison(models, "a_unmerged_qlora", tokenizer, ctx.heldout[:budget.loss_size],
                                              batch_size=4, contexts={"base_no_adapter": qmodel.disable_adapter})

    # the task score of each
    scores = {}
    for name in ("a_unmerged_qlora", "b_merged_bf16", "c_merged_requantized_nf4", "d_exported_bf16",
                 "e_gguf_q4_1"):
        ctx.say(f"lab6: scoring {name}")
        ev = evaluate(models[name], tokenizer, heldout, batch_size=EVAL_BATCH, max_new_tokens=budget.max_new_tokens,
                      progress=ctx.progress)
        scores[name] = {"score": ev.score, "correct": [bool(c) for c in ev.correct], "seconds": ev.seconds}
    for name in scores:
        if name != "a_unmerged_qlora":
            gain, low, high = paired_bootstrap_interval(scores["a_unmerged_qlora"]["correct"], scores[name]["correct"])
            scores[name]["vs_a"] = {"difference": gain, "interval_95": [low, high]}
    payload.update(scores=scores, n_eval=len(heldout), losses=run.losses, train_seconds=run.seconds)
    return payload


def verdicts(res: dict) -> list[str]:
    """Lab 6's findings from its results file."""
    s, w = res["scores"], res["weights"]
    return [
        f"merged then re-quantized to NF4: {s['c_merged_requantized_nf4']['score']:.0%} against "
        f"{s['a_unmerged_qlora']['score']:.0%} unmerged (what survives of the update: cosine "
        f"{w['nf4_surviving_update_cosine']:.3f}); merged in bf16: {s['b_merged_bf16']['score']:.0%}",
        f"bf16 GGUF reloads to identical logits: {res['export']['gguf_bf16_logits_equal']}; Q4_1 GGUF: "
        f"{s['e_gguf_q4_1']['score']:.0%}",
    ]
