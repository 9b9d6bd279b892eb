# Provenance (added by qlora-edu): copied on 2026-12-04 from the project's shared reference notes (a folder
# outside this repository, read-only; file `gpu_probe.py`).
# Everything below the line that ends this header is byte-identical to that file (tests/test_reference.py diffs
# them where the folder is present).
# Figures: the script that measured `gpu-facts.md` (its sections `parity`, `dequant_speed`, `mem7b`, `mem13b`,
# `paging`, `diag`); it is kept for reference and is not imported by the package.
# ruff: noqa  (the body is kept as measured, not restyled)
# end of provenance header
"""GPU probe for the course's later chapters (memory formula, paged AdamW, QLoRA speed).

Run where torch (CUDA), bitsandbytes and peft are importable; the parity section also compares with
the course's own qlora_edu when a copy of it is in .proj/. Each section prints one JSON line (and appends
it to $OUT/probe.jsonl); memory and speed do not depend on weight values, so the models use random weights.

  python3 gpu_probe.py SECTION [SECTION ...]
sections: env, parity, dequant_speed, mem7b, mem13b, paging, diag, small_speed
"""
import gc
import json
import os
import sys
import time

import torch

OUT = os.environ.get("OUT", "/tmp")
GiB = 2**30
MiB = 2**20


def emit(**kw):
    line = json.dumps(kw, default=str)
    print(line, flush=True)
    with open(os.path.join(OUT, "probe.jsonl"), "a") as f:
        f.write(line + "\n")


def sync():
    torch.cuda.synchronize()


def cuda_timer(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        sync()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2]


def env():
    import bitsandbytes as bnb
    import peft
    import transformers

    p = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    emit(section="env", torch=torch.__version__, cuda=torch.version.cuda, bnb=bnb.__version__,
         transformers=transformers.__version__, peft=peft.__version__, gpu=p.name,
         total_gib=round(total / GiB, 2), free_gib=round(free / GiB, 2), bf16=torch.cuda.is_bf16_supported(),
         python=sys.version.split()[0])


def parity():
    """CUDA bitsandbytes NF4 (+DQ) bytes vs CPU bitsandbytes and the project's own quantize_nf4."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(0)
    res = {}
    for shape in [(4096, 4096), (1536, 576), (11008, 4096)]:
        w = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
        qc, sc = F.quantize_4bit(w.cuda(), blocksize=64, quant_type="nf4", compress_statistics=True)
        qp, sp = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        key = "x".join(map(str, shape))
        res[key] = {
            "packed_bytes_differ_frac": (qc.cpu() != qp).float().mean().item(),
            "dq_absmax_codes_differ_frac": (sc.absmax.cpu() != sp.absmax).float().mean().item(),
            "offset_equal": bool(sc.offset.cpu() == sp.offset),
        }
        dc = F.dequantize_4bit(qc, sc).float().cpu()
        dp = F.dequantize_4bit(qp, sp).float()
        res[key]["dequant_max_abs_diff_cuda_vs_cpu"] = (dc - dp).abs().max().item()
        try:
            sys.path.insert(0, ".proj")
            import qlora_edu

            t = qlora_edu.quantize_nf4(w)
            ours = t.packed if hasattr(t, "packed") else None
            res[key]["project_obj"] = type(t).__name__
            if ours is not None:
                res[key]["project_vs_cuda_bytes_differ_frac"] = (ours.reshape(-1).cpu() != qc.reshape(-1).cpu()).float().mean().item()
                res[key]["project_grid_vs_cuda_absmax_codes_differ_frac"] = (t.absmax.cpu() != sc.absmax.cpu()).float().mean().item()
                tn = qlora_edu.quantize_nf4(w, rounding="nearest")
                res[key]["project_nearest_vs_cuda_absmax_codes_differ_frac"] = (tn.absmax.cpu() != sc.absmax.cpu()).float().mean().item()
        except Exception as e:  # the project's API may differ; parity with CPU is covered elsewhere
            res[key]["project_error"] = repr(e)[:200]
    emit(section="parity", **res)


def dequant_speed():
    """bnb CUDA dequantize_4bit vs plain torch code[q]*absmax on the GPU (the from-scratch QLoRA path)."""
    import bitsandbytes.functional as F

    w = (torch.randn(4096, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    q, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    code = s.code.cuda()
    absmax = F.dequantize_blockwise(s.absmax, s.state2) + s.offset  # float32, one per block

    def torch_dequant():
        b = q.reshape(-1)
        idx = torch.stack([b >> 4, b & 15], dim=1).reshape(-1).long()
        return (code[idx].view(-1, 64) * absmax.view(-1, 1)).to(torch.bfloat16).view(4096, 4096)

    ref = F.dequantize_4bit(q, s)
    same = torch.equal(torch_dequant(), ref)
    t_bnb = cuda_timer(lambda: F.dequantize_4bit(q, s))
    t_torch = cuda_timer(torch_dequant)
    try:
        comp = torch.compile(torch_dequant)
        comp()
        t_comp = cuda_timer(comp)
        same_c = torch.equal(comp(), ref)
    except Exception as e:
        t_comp, same_c = repr(e)[:120], None
    x = torch.randn(8 * 512, 4096, device="cuda", dtype=torch.bfloat16)
    t_mm = cuda_timer(lambda: x @ ref.t())
    bytes_moved = q.numel() + w.numel() * 2
    emit(section="dequant_speed", shape="4096x4096", bnb_ms=t_bnb, torch_eager_ms=t_torch, torch_compile_ms=t_comp,
         eager_equal_bnb=same, compiled_equal_bnb=same_c, matmul_4096tok_ms=t_mm,
         hbm_floor_ms=bytes_moved / 3.0e12 * 1e3)


def llama_config(name):
    from transformers import LlamaConfig

    shapes = {
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=32000),
        "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                    num_key_value_heads=40, vocab_size=32000),
        "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    }
    return LlamaConfig(max_position_embeddings=4096, **shapes[name])


def build_streaming(name):
    """Like build(name, "nf4") but never holds more than one bf16 weight: the model is made on the meta
    device and each decoder linear is drawn on the GPU and quantized at once (for 33B and 65B shapes)."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = llama_config(name)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for cname, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    w = torch.randn(child.out_features, child.in_features, device="cuda", dtype=torch.bfloat16) * 0.02
                    lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                            compute_dtype=torch.bfloat16, compress_statistics=True,
                                            quant_type="nf4", device="meta")
                    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                                   quant_type="nf4").to("cuda")
                    setattr(parent, cname, lin)
                    del w
        for mod in (layer.input_layernorm, layer.post_attention_layernorm):
            mod.to_empty(device="cuda")
            mod.weight.data.fill_(1.0)
    model.model.norm.to_empty(device="cuda")
    model.model.norm.weight.data.fill_(1.0)
    for mod in (model.model.embed_tokens, model.lm_head):
        mod.to_empty(device="cuda")
        mod.weight.data.normal_(0, 0.02)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg, device="cuda")
    model.is_loaded_in_4bit = True
    gc.collect()
    torch.cuda.empty_cache()
    return model


def build(name, quant, dtype=torch.bfloat16):
    if quant == "nf4" and name not in ("7b", "13b", "smollm2-135m"):
        return build_streaming(name)
    """Random-weight Llama of a given shape on the GPU; quant='nf4' swaps decoder linears for bnb Linear4bit."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    cfg = llama_config(name)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(prev)
    if quant == "nf4":
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for cname, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                compute_dtype=torch.bfloat16, compress_statistics=True,
                                                quant_type="nf4", device="meta")
                        lin.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                       compress_statistics=True, quant_type="nf4").to("cuda")
                        setattr(parent, cname, lin)
                        del child
        gc.collect()
        torch.cuda.empty_cache()
        # what from_pretrained(quantization_config=...) sets; peft's prepare_model_for_kbit_training only
        # enables gradient checkpointing when it sees it
        model.is_loaded_in_4bit = True
    return model


def train_probe(name, method, batch, seq, steps=3, r=64, alpha=16, paged=True, ckpt=True, prepare=True):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_before = torch.cuda.memory_allocated()
    model = build(name, "nf4" if method == "qlora" else None)
    weights = torch.cuda.memory_allocated() - base_before
    if method in ("qlora", "lora"):
        if method == "qlora" and prepare:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
        elif ckpt:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, cfg)
        trainable = [p for p in model.parameters() if p.requires_grad]
    else:
        if ckpt:
            model.gradient_checkpointing_enable()
        trainable = list(model.parameters())
    n_train = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    after_setup = torch.cuda.memory_allocated() - base_before
    opt_cls = bnb.optim.PagedAdamW32bit if paged else torch.optim.AdamW
    opt = opt_cls(trainable, lr=2e-4)
    model.train()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda", generator=g)
    times, peaks = [], []
    free0, _ = torch.cuda.mem_get_info()
    min_free = free0
    for _ in range(steps):
        torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
        peaks.append(torch.cuda.max_memory_allocated() - base_before)
        min_free = min(min_free, torch.cuda.mem_get_info()[0])
    state_bytes = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                state_bytes += v.numel() * v.element_size()
    emit(section="train", model=name, method=method, batch=batch, seq=seq, r=r, ckpt=ckpt, paged=paged,
         prepare=prepare, n_total=n_total, n_trainable=n_train,
         weights_mib=round(weights / MiB, 1), after_setup_mib=round(after_setup / MiB, 1),
         optimizer_state_mib=round(state_bytes / MiB, 1),
         peak_torch_mib=round(max(peaks) / MiB, 1), peak_torch_per_step_mib=[round(p / MiB) for p in peaks],
         device_used_delta_mib=round((free0 - min_free) / MiB, 1),
         step_s=[round(x, 3) for x in times], tokens_per_s=round(batch * seq / min(times[1:] or times), 1))
    del opt, model, trainable, loss
    gc.collect()
    torch.cuda.empty_cache()


def mem7b():
    for kw in [
        dict(method="qlora", batch=1, seq=512),
        dict(method="qlora", batch=4, seq=512),
        dict(method="qlora", batch=1, seq=2048),
        dict(method="qlora", batch=1, seq=512, ckpt=False),
        dict(method="qlora", batch=1, seq=512, prepare=False),
        dict(method="lora", batch=1, seq=512),
    ]:
        try:
            train_probe("7b", **kw)
        except Exception as e:
            emit(section="train", model="7b", error=repr(e)[:300], **kw)
            gc.collect()
            torch.cuda.empty_cache()


def mem13b():
    for kw in [dict(method="qlora", batch=1, seq=512), dict(method="qlora", batch=1, seq=512, prepare=False)]:
        try:
            train_probe("13b", **kw)
        except Exception as e:
            emit(section="train", model="13b", error=repr(e)[:300], **kw)
            gc.collect()
            torch.cuda.empty_cache()


def paging():
    """What a PagedAdamW32bit step costs when its states were evicted to host memory (no oversubscription:
    the states are moved with an explicit prefetch, the card never runs out)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    n = 160_000_000  # about the LoRA parameters of a 7B model at r=64 on all seven projections
    p = torch.nn.Parameter(torch.zeros(n, device="cuda", dtype=torch.float32))
    p.grad = torch.randn_like(p) * 1e-3
    opt = bnb.optim.PagedAdamW32bit([p], lr=2e-4)
    opt.step()
    sync()
    st = opt.state[p]
    states = [v for v in st.values() if torch.is_tensor(v) and v.numel() >= 1e5]
    is_paged = [getattr(v, "is_paged", False) for v in states]

    def step_resident():
        opt.step()

    import ctypes

    host = [ctypes.create_string_buffer(v.numel() * v.element_size()) for v in states]

    def evict():
        # bnb's prefetch_tensor(to_cpu=True) aborts with "invalid device ordinal" on CUDA 13; reading the
        # managed pages from the CPU migrates them to host memory instead (what the driver's eviction does).
        for v, hb in zip(states, host):
            ctypes.memmove(hb, v.data_ptr(), v.numel() * v.element_size())

    t_res = cuda_timer(step_resident, repeats=10)
    ts, te = [], []
    for _ in range(5):
        t = time.perf_counter()
        evict()
        te.append((time.perf_counter() - t) * 1e3)
        sync()
        t = time.perf_counter()
        opt.step()
        sync()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    state_bytes = sum(v.numel() * v.element_size() for v in states)
    # plain AdamW on the same parameter, and raw host->device copy speed for context
    p2 = torch.nn.Parameter(torch.zeros(n, device="cuda"))
    p2.grad = p.grad
    o2 = torch.optim.AdamW([p2], lr=2e-4, fused=True)
    t_adamw = cuda_timer(lambda: o2.step(), repeats=10)
    h = torch.empty(state_bytes // 4, dtype=torch.float32, pin_memory=True)
    d = torch.empty_like(h, device="cuda")
    t_h2d = cuda_timer(lambda: d.copy_(h, non_blocking=True), repeats=5)
    emit(section="paging", params=n, state_mib=round(state_bytes / MiB), states_paged=is_paged,
         step_resident_ms=round(t_res, 2), step_after_eviction_ms=[round(x, 1) for x in ts],
         eviction_by_cpu_read_ms=[round(x, 1) for x in te],
         torch_fused_adamw_ms=round(t_adamw, 2), pinned_h2d_ms=round(t_h2d, 2),
         pinned_h2d_gbps=round(state_bytes / (t_h2d / 1e3) / 1e9, 1))


def small_speed():
    for method in ["qlora", "lora"]:
        try:
            train_probe("smollm2-135m", method, batch=8, seq=256, steps=6, r=16, alpha=32)
        except Exception as e:
            emit(section="train", model="smollm2-135m", method=method, error=repr(e)[:300])


VARIANTS = ["prepare", "prepare_nonreentrant", "fp32_upcast_manual", "none"]


def diag():
    """Where the extra memory of prepare_model_for_kbit_training goes (7B shape, batch 1, seq 512)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    for variant in VARIANTS:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        model = build("7b", "nf4")
        if variant == "prepare":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        elif variant == "prepare_nonreentrant":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif variant == "fp32_upcast_manual":
            for n, p in model.named_parameters():
                if p.dtype == torch.bfloat16:
                    p.data = p.data.float()
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        seen = {"ckpt_flags": sorted({str(getattr(m, "gradient_checkpointing", None)) for m in model.model.layers})}
        dtypes = {}
        for n, p in model.named_parameters():
            k = f"{type(p).__name__}:{p.dtype}"
            dtypes[k] = dtypes.get(k, 0) + p.numel()
        cfg = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, cfg)
        lora_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)
        model.train()
        ids = torch.randint(0, 32000, (1, 512), device="cuda")

        def hook(mod, inp, out):
            h = out[0] if isinstance(out, tuple) else out
            seen.setdefault("layer_out_dtype", str(h.dtype))

        hd = model.base_model.model.model.layers[0].register_forward_hook(hook)
        setup = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        out = model(input_ids=ids, labels=ids)
        sync()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        after_fwd = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        out.loss.backward()
        sync()
        bwd_peak = torch.cuda.max_memory_allocated() - base
        hd.remove()
        emit(section="diag", variant=variant, params_by_dtype={k: round(v / 1e6, 1) for k, v in dtypes.items()},
             lora_dtype=str(lora_dtype), logits_dtype=str(out.logits.dtype), **seen,
             setup_mib=round(setup / MiB), fwd_peak_mib=round(fwd_peak / MiB), after_fwd_mib=round(after_fwd / MiB),
             bwd_peak_mib=round(bwd_peak / MiB))
        del model, out
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    for name in sys.argv[1:]:
        t = time.time()
        try:
            globals()[name]()
        except Exception as e:
            import traceback

            traceback.print_exc()
            emit(section=name, error=repr(e)[:400])
        print(f"# {name} took {time.time() - t:.1f} s", flush=True)
