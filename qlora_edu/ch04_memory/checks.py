"""Battery for chapter 4: ``static_tensors``, every tensor that is resident for a whole training step.

Expected values come from outside the code under test: the bytes of the real tensors of small Llama models
that this file sets up itself with transformers, bitsandbytes (NF4 ``Linear4bit``, its optimizers) and peft
(``prepare_model_for_kbit_training``, LoRA), after a real forward, backward and optimizer step on the CPU
(each storage counted once); and the H100 measurements of ``gpu-facts.md`` (weights, set-up, optimizer
states of Llama-7B and 13B). Never from ``qlora_edu``.
"""

from __future__ import annotations

import math
import re
import warnings
from functools import cache

import torch

from qlora_edu.checks import bnb_functional, case, expect_raises, expect_true, mistake

MiB = 2**20
PARTS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------- real tensors


def _config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=False, use_cache=False)  # training: no KV cache (and no note about it)
    return LlamaConfig(**{**base, **kw})


#: The set-ups the cases measure: (config keywords, method, LoRA rank, bitsandbytes optimizer).
SETUPS = {
    "qlora": ({}, "qlora", 8, "AdamW32bit"),                                  # GQA, untied, prepare
    "lora": ({"num_key_value_heads": 4, "tie_word_embeddings": True}, "lora", 8, "AdamW32bit"),
    "qlora8bit": ({}, "qlora", 16, "AdamW8bit"),
}


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _quant_state_tensors(model) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            out += [t for t in (qs.absmax, qs.code, qs.offset) if isinstance(t, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    return out


@cache
def _measured(setup: str) -> dict:
    """Set a small random Llama up as QLoRA / LoRA training does, take one real step on the CPU, and
    return the bytes of its tensors: the four parts, and the gradient bytes by ``(layer, module)``."""
    bnb_functional()  # imports bitsandbytes without its note about the optional `kernels` package
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaForCausalLM

    config_kw, method, r, opt_name = SETUPS[setup]
    config = _config(**config_kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # bf16 weights as from_pretrained(dtype=torch.bfloat16) loads them: the
        p.data = p.data.to(torch.bfloat16)  # rotary buffers (inv_freq) stay float32, as it computes them
    if method == "qlora":  # every decoder linear -> NF4 + double quantization, as from_pretrained does
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if not isinstance(child, torch.nn.Linear):
                        continue  # the activation
                    lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                            compute_dtype=torch.bfloat16, compress_statistics=True,
                                            quant_type="nf4", device="meta")
                    lin.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                   compress_statistics=True, quant_type="nf4").to("cpu")
                    setattr(parent, name, lin)
        model.is_loaded_in_4bit = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "qlora":
            model = prepare_model_for_kbit_training(model)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, lora_dropout=0.05, target_modules=list(PROJ),
                                                 task_type="CAUSAL_LM"))
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = getattr(bnb.optim, opt_name)([p for _, p in trainable], lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {}
        for n, p in trainable:
            m = re.search(r"layers\.(\d+)\..*?(\w+_proj)\.", n)
            key = (int(m.group(1)), m.group(2))
            grads[key] = grads.get(key, 0) + p.grad.untyped_storage().nbytes()
        grad_bytes = _storage_bytes([p.grad for _, p in trainable])
        optimizer.step()
    params = list(model.parameters())
    states = [v for st in optimizer.state.values() for v in st.values()]
    return {"config": config, "method": method, "r": r,
            "optimizer": "adamw8bit" if opt_name.endswith("8bit") else "adamw",
            "parts": {"frozen_weights": _storage_bytes([p for p in params if not p.requires_grad]
                                                       + list(model.buffers()) + _quant_state_tensors(model)),
                      "trainable_weights": _storage_bytes([p for p in params if p.requires_grad]),
                      "gradients": grad_bytes, "optimizer_states": _storage_bytes(states)},
            "grads_by_module": grads}


def _parts(tensors) -> dict[str, int]:
    expect_true(isinstance(tensors, list | tuple), "static_tensors should return a list of StaticTensor",
                "list", type(tensors).__name__)
    parts = dict.fromkeys(PARTS, 0)
    for t in tensors:
        expect_true(getattr(t, "part", None) in parts, "every StaticTensor's part should be one of the four parts",
                    PARTS, getattr(t, "part", t))
        parts[t.part] += t.nbytes
    return parts


def _expect_parts(impl, setup: str, hint: str) -> None:
    m = _measured(setup)
    got = _parts(impl.static_tensors(m["config"], m["method"], lora_r=m["r"], optimizer=m["optimizer"],
                                     device="cpu"))
    for part in PARTS:
        expect_true(got[part] == m["parts"][part],
                    f"{setup}: {part} should be the bytes of the real tensors after one step "
                    f"(off by {got[part] - m['parts'][part]:+d} bytes)", m["parts"][part], got[part], hint)


# ----------------------------------------------------------------------------------- cases


@case("static_tensors", hint="NF4 base per projection: ceil(n/2) packed bytes + 16*4 (NF4 table) + n/64 uint8 "
      "codes + 4*ceil(n/64/256) + 4 (offset) + 256*4 (dynamic map); prepare makes the other frozen weights "
      "float32; adapters r*in and out*r in float32; k_proj/v_proj are (hidden -> kv_heads*head_dim)")
def static_tensors_qlora_match_real_tensors(impl):
    """QLoRA (NF4 + double quantization, prepare_model_for_kbit_training, LoRA r=8 on the seven projections,
    grouped-query attention, untied head) on a 2-layer random Llama: each part equals, byte for byte, the real
    tensors after one step with bitsandbytes' AdamW32bit."""
    _expect_parts(impl, "qlora", "")


@case("static_tensors", hint="LoRA without prepare: every frozen weight stays in weight_dtype (bf16); with "
      "tie_word_embeddings lm_head is the embedding (one tensor, counted once)")
def static_tensors_lora_match_real_tensors(impl):
    """LoRA on a bf16 base (no prepare), multi-head attention, tied embeddings: each part equals the real
    tensors' bytes."""
    _expect_parts(impl, "lora", "")


@case("static_tensors", hint="bitsandbytes' 8-bit AdamW: two uint8 states and two float32 absmax per 256 values "
      "for tensors of at least 4096 elements, float32 states below; plus one pair of 256-value float32 maps "
      "shared by every parameter")
def static_tensors_8bit_states_match_bitsandbytes(impl):
    """AdamW8bit at r=16: some adapters have 8-bit states, the smaller ones keep float32 states."""
    _expect_parts(impl, "qlora8bit", "")


@case("static_tensors", hint="label each adapter's tensors with its layer index and projection name "
      "(StaticTensor(part, module, layer, what, nbytes)): training_memory frees them layer by layer")
def static_tensors_labels_layers_and_modules(impl):
    """The gradients of each (layer, projection) add up to the real gradients of that layer's adapter."""
    m = _measured("qlora")
    got: dict = {}
    for t in impl.static_tensors(m["config"], m["method"], lora_r=m["r"], device="cpu"):
        if t.part == "gradients":
            got[(t.layer, t.module)] = got.get((t.layer, t.module), 0) + t.nbytes
    expect_true(got == m["grads_by_module"], "gradient bytes by (layer, module)", m["grads_by_module"], got)


def _gpu_facts_config(name: str):
    hidden, inter, layers = {"7B": (4096, 11008, 32), "13B": (5120, 13824, 40)}[name]
    return _config(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                   num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128)


@case("static_tensors", hint="gpu-facts.md: 7B NF4 weights 3,687 MiB (bf16 embeddings and head), LoRA's bf16 "
      "base 12,853 MiB, paged fp32 AdamW states 1,220 MiB (7B) and 1,910 MiB (13B) at r=64")
def static_tensors_match_gpu_facts(impl):
    """The H100 measurements of gpu-facts.md (torch's allocator rounds each tensor up to 512 bytes: 0.5%)."""
    for name, method, kw, part, mib, tol in [
        ("7B", "qlora", {"prepare_kbit": False}, "frozen_weights", 3687, 0.005),
        ("13B", "qlora", {"prepare_kbit": False}, "frozen_weights", 6893, 0.005),
        ("7B", "lora", {}, "frozen_weights", 12853, 0.005),
        ("7B", "qlora", {}, "setup", 4798, 0.02),  # after prepare, with the adapters
        ("7B", "qlora", {}, "optimizer_states", 1220, 0.01),
        ("13B", "qlora", {}, "optimizer_states", 1910, 0.01),
    ]:
        tensors = impl.static_tensors(_gpu_facts_config(name), method, lora_r=64, optimizer="paged_adamw", **kw)
        parts = _parts(tensors)
        got = (parts["frozen_weights"] + parts["trainable_weights"] if part == "setup" else parts[part]) / MiB
        expect_true(math.isclose(got, mib, rel_tol=tol), f"{name} {method} {kw or ''} {part}: gpu-facts.md "
                    f"measured {mib} MiB (tolerance {tol:.1%})", mib, round(got, 1))
        if part == "optimizer_states":
            paged = sum(t.nbytes for t in tensors if t.part == "optimizer_states" and t.paged)
            expect_true(paged == parts[part], f"{name}: every state of >= 1e5 elements is paged (all of them "
                        "at r=64)", parts[part], paged)


@case("static_tensors", hint="keep the given argument check as the first line")
def static_tensors_rejects_bad_arguments(impl):
    config = _config()
    expect_raises("method='qlora4'", ValueError, lambda: impl.static_tensors(config, "qlora4"), "method")
    expect_raises("lora_r=0", ValueError, lambda: impl.static_tensors(config, "qlora", lora_r=0), "lora_r")
    expect_raises("an unknown setting", TypeError, lambda: impl.static_tensors(config, "qlora", weight_dtpye=1),
                  "weight_dtpye")


# ----------------------------------------------------------------------------------- known mistakes


def _static_tensors(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", adapter_bytes=4,
                    nf4_constants=True, double_quant_constants=True, upcast=True, gqa=True, tied=True,
                    two_states=True, min_8bit=4096, labels=True, **settings):
    """A re-implementation for the known mistakes below (lora / qlora); every switch at its default is right."""
    from qlora_edu.ch04_memory.guards import check_static_tensors_args
    from qlora_edu.ch04_memory.memory import StaticTensor

    dims, targets, s = check_static_tensors_args(config, method, lora_r, lora_targets, optimizer, settings)
    wd = s["weight_dtype"].itemsize
    base = 4 if (s["prepare_kbit"] if upcast else False) else wd
    h, V, r = dims.hidden, dims.vocab, lora_r
    kv = dims.kv_dim if gqa else dims.q_dim
    linears = {**dims.linears(), "k_proj": (h, kv), "v_proj": (h, kv)}
    paging = optimizer.startswith("paged") and s["device"] == "cuda"
    out = [StaticTensor("frozen_weights", "rotary_emb", None, w, 4 * (dims.head_dim // 2))
           for w in ("inv_freq", "original_inv_freq")]

    def train(module, layer, what, numel):
        layer = layer if labels else None
        out.append(StaticTensor("trainable_weights", module, layer, what, numel * adapter_bytes))
        out.append(StaticTensor("gradients", module, layer, what, numel * adapter_bytes))
        paged = paging and numel >= 100_000
        if optimizer.endswith("8bit") and numel >= min_8bit:
            if not any(t.module == "optimizer" for t in out):
                out.extend(StaticTensor("optimizer_states", "optimizer", None, q, 1024) for q in ("q1", "q2"))
            out.extend(StaticTensor("optimizer_states", module, layer, w, numel, paged) for w in ("s1", "s2"))
            out.extend(StaticTensor("optimizer_states", module, layer, w, 4 * -(-numel // 256)) for w in ("a1", "a2"))
        else:
            for w in ("exp_avg", "exp_avg_sq")[: 2 if two_states else 1]:
                out.append(StaticTensor("optimizer_states", module, layer, w, 4 * numel, paged))

    for layer in range(dims.layers):
        for name, (n_in, n_out) in linears.items():
            n = n_in * n_out
            if method == "qlora":
                blocks = -(-n // 64)
                sizes = [-(-n // 2)]
                if nf4_constants:
                    sizes += ([16 * 4, blocks, 4 * -(-blocks // 256), 4, 1024] if double_quant_constants
                              else [16 * 4, 4 * blocks])
                out.extend(StaticTensor("frozen_weights", name, layer, "w", b) for b in sizes)
            else:
                out.append(StaticTensor("frozen_weights", name, layer, "w", n * base))
            if name in targets:
                train(name, layer, "lora_A", r * n_in)
                train(name, layer, "lora_B", n_out * r)
        out.extend(StaticTensor("frozen_weights", "norms", layer, "w", h * base) for _ in range(2))
    out += [StaticTensor("frozen_weights", "embed_tokens", None, "w", V * h * base),
            StaticTensor("frozen_weights", "norm", None, "w", h * base)]
    if not (dims.tied and tied):
        out.append(StaticTensor("frozen_weights", "lm_head", None, "w", V * h * base))
    return out


@mistake("static_tensors", caught_by=static_tensors_qlora_match_real_tensors)
def static_tensors_bf16_adapters(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """The adapters counted in bf16 (2 bytes), as the seed notes say; peft keeps them in float32."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           adapter_bytes=2, **settings)


@mistake("static_tensors", caught_by=static_tensors_qlora_match_real_tensors)
def static_tensors_half_a_byte(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """NF4 as 0.5 bytes a weight, nothing else: the quantization constants and tables forgotten."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           nf4_constants=False, **settings)


@mistake("static_tensors", caught_by=static_tensors_qlora_match_real_tensors)
def static_tensors_float32_absmax(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """One float32 absmax per block of 64, as without double quantization."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           double_quant_constants=False, **settings)


@mistake("static_tensors", caught_by=static_tensors_qlora_match_real_tensors)
def static_tensors_no_upcast(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """prepare_model_for_kbit_training's upcast forgotten: embeddings, norms and head left in bf16."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           upcast=False, **settings)


@mistake("static_tensors", caught_by=static_tensors_qlora_match_real_tensors)
def static_tensors_no_gqa(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """k_proj and v_proj as wide as q_proj (grouped-query attention ignored)."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           gqa=False, **settings)


@mistake("static_tensors", caught_by=static_tensors_qlora_match_real_tensors)
def static_tensors_one_adam_state(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """AdamW with one float32 state per parameter instead of two (m and v)."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           two_states=False, **settings)


@mistake("static_tensors", caught_by=static_tensors_lora_match_real_tensors)
def static_tensors_tied_head_twice(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """A tied lm_head counted as a second copy of the embedding."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           tied=False, **settings)


@mistake("static_tensors", caught_by=static_tensors_8bit_states_match_bitsandbytes)
def static_tensors_8bit_everywhere(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """8-bit states for every tensor, also those under 4096 elements (bitsandbytes keeps those float32)."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           min_8bit=1, **settings)


@mistake("static_tensors", caught_by=static_tensors_labels_layers_and_modules)
def static_tensors_no_layer(config, method, *, lora_r=64, lora_targets=PROJ, optimizer="adamw", **settings):
    """Right bytes, but the adapters' tensors not labelled with their layer."""
    return _static_tensors(config, method, lora_r=lora_r, lora_targets=lora_targets, optimizer=optimizer,
                           labels=False, **settings)
