"""Battery for chapter 11: ``per_gpu_static``, the static memory one GPU holds when FSDP shards a QLoRA model.

Expected values come from a real sharded run that this file sets up itself, not from ``qlora_edu``: two CPU
processes (gloo) each build the same small random Llama with bitsandbytes' NF4 ``Linear4bit`` (bf16 quant storage)
and peft's LoRA, shard it with PyTorch's ``fully_shard`` (FSDP2), take one training step on their half of a
batch, and report the bytes they hold: the local shards of the parameters, gradients and optimizer states, and the
tensors every rank keeps whole (bitsandbytes' ``QuantState`` s, the rotary buffers). The run takes ~20 s and is
made once per process.
"""

from __future__ import annotations

import json
import socket
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from qlora_edu.checks import bnb_functional, case, expect_raises, expect_true, mistake

PARTS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False)
R = 8


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(**CONFIG)


def _nbytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _rank(rank: int, world: int, port: int, out: str) -> None:
    """One process of the measured run."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        bnb_functional()
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model
        from torch.distributed.fsdp import fully_shard
        from transformers import LlamaForCausalLM

        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = LlamaForCausalLM(_config())
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        lin = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                                compute_dtype=torch.bfloat16, compress_statistics=True,
                                                quant_type="nf4", quant_storage=torch.bfloat16, device="meta")
                        lin.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                       quant_type="nf4", quant_storage=torch.bfloat16,
                                                       module=lin).to("cpu")
                        setattr(parent, name, lin)
        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=16, lora_dropout=0.0, target_modules=list(PROJ)))
        constants = sum(_nbytes(t) for m in model.modules() for qs in [getattr(m, "quant_state", None)]
                        for q in [qs, getattr(qs, "state2", None)] if q is not None
                        for t in (q.absmax, q.code, q.offset) if isinstance(t, torch.Tensor))
        buffers = sum(_nbytes(b) for b in model.buffers())
        params = list(model.parameters())
        whole = {"frozen_weights": sum(_nbytes(p) for p in params if not p.requires_grad) + constants + buffers,
                 "trainable_weights": sum(_nbytes(p) for p in params if p.requires_grad)}
        if world > 1:
            for m in model.modules():  # adapters, decoder layers, root: peft's FSDP plan
                if next(m.children(), None) is None and getattr(m, "weight", None) is not None \
                        and m.weight.requires_grad:
                    fully_shard(m)
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        params = list(model.parameters())
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
        ids = torch.randint(CONFIG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
        ids = ids.chunk(world)[rank]
        model(input_ids=ids, labels=ids).loss.backward()
        held = {"frozen_weights": sum(_nbytes(p) for p in params if not p.requires_grad) + constants + buffers,
                "trainable_weights": sum(_nbytes(p) for p in params if p.requires_grad),
                "gradients": sum(_nbytes(p.grad) for p in params if p.grad is not None)}
        opt.step()
        held["optimizer_states"] = sum(_nbytes(v) for s in opt.state.values() for v in s.values() if v.dim() > 0)
        result = {"held": held, "whole": whole, "replicated": constants + buffers}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@cache
def _measured(world: int = 2) -> dict:
    """Rank 0's bytes in a real ``world``-process FSDP2 run (the largest shard: rank 0 takes the first rows)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        # fork: the children inherit the imported libraries (spawning re-imports them: ~10 s a process)
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_rank, args=(world, port, out), nprocs=world, join=True, start_method=method)
        return json.loads(Path(out, "rank0.json").read_text())


def _static(impl, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return impl.static_tensors(_config(), "qlora", lora_r=R, prepare_kbit=False, device="cpu", **kw)


def _expect_parts(got: dict, expected: dict, what: str, hint: str = "") -> None:
    expect_true(isinstance(got, dict), "per_gpu_static should return a dict of bytes by part", "dict",
                type(got).__name__)
    for part, value in expected.items():
        expect_true(got.get(part) == value, f"{what}: {part} (off by {got.get(part, 0) - value:+d} bytes)", value,
                    got.get(part), hint)


# ----------------------------------------------------------------------------------- cases


@case("per_gpu_static", hint="shard (ceil(n / N) on rank 0) every parameter, gradient and optimizer state; keep "
      "whole what is not a parameter (the QuantState's absmax codes, absmax2, offset, code tables; the rotary "
      "buffers)")
def per_gpu_static_matches_fsdp_rank(impl):
    """Two processes shard a QLoRA model (bitsandbytes NF4, bf16 quant storage, peft LoRA r=8) with FSDP2: each
    part of rank 0's bytes after a step equals ``per_gpu_static(static_tensors(...), 2)``."""
    m = _measured()
    _expect_parts(impl.per_gpu_static(_static(impl), 2), m["held"], "rank 0 of 2, measured")


@case("per_gpu_static", hint="with world_size=1 nothing is divided: every part is the whole model's")
def per_gpu_static_one_gpu_is_whole(impl):
    """One GPU holds the whole model: the frozen and trainable bytes measured before sharding."""
    m = _measured()
    _expect_parts(impl.per_gpu_static(_static(impl), 1), m["whole"], "world_size=1, the unsharded model")


@case("per_gpu_static", hint="cpu_offload: the sharded pieces (parameters, gradients, optimizer states) all go to "
      "'host'; the GPU keeps only what every rank holds whole")
def per_gpu_static_offload_moves_shards_to_host(impl):
    """With CPU offload the GPU keeps the replicated tensors; the host holds rank 0's shards (the measured shards
    of the parameters, gradients and states)."""
    m = _measured()
    shards = sum(m["held"].values()) - m["replicated"]
    _expect_parts(impl.per_gpu_static(_static(impl), 2, cpu_offload=True),
                  {"frozen_weights": m["replicated"], "trainable_weights": 0, "gradients": 0, "optimizer_states": 0,
                   "host": shards}, "cpu_offload=True")


@case("per_gpu_static", hint="keep the given argument check as the first line")
def per_gpu_static_rejects_bad_arguments(impl):
    tensors = _static(impl)
    expect_raises("world_size=0", ValueError, lambda: impl.per_gpu_static(tensors, 0), "world_size")
    expect_raises("world_size='2'", TypeError, lambda: impl.per_gpu_static(tensors, "2"), "world_size")


# ----------------------------------------------------------------------------------- known mistakes


def _per_gpu_static(tensors, world_size, *, cpu_offload=False, shard_constants=False, shard_frozen=True,
                    shard_grads=True, shard_states=True, offload_states=True):
    """A re-implementation for the known mistakes below; every switch at its default is right."""
    from qlora_edu.ch11_fsdp.guards import check_per_gpu_static_args

    tensors, world_size = check_per_gpu_static_args(tensors, world_size, cpu_offload)
    parts = dict.fromkeys((*PARTS, "host"), 0)
    for t in tensors:
        param = t.part != "frozen_weights" or t.what in ("weight", "packed NF4 codes")
        sharded = {"frozen_weights": (param or shard_constants) and shard_frozen, "trainable_weights": True,
                   "gradients": shard_grads, "optimizer_states": shard_states}[t.part]
        if not sharded:
            parts[t.part] += t.nbytes
            continue
        to_host = cpu_offload and param and (offload_states or t.part != "optimizer_states")
        parts["host" if to_host else t.part] += -(-t.nbytes // world_size)
    return parts


@mistake("per_gpu_static", caught_by=per_gpu_static_matches_fsdp_rank)
def per_gpu_static_constants_sharded(tensors, world_size, *, cpu_offload=False):
    """The NF4 constants divided among the GPUs too: bitsandbytes keeps them in the QuantState, which FSDP
    never sees."""
    return _per_gpu_static(tensors, world_size, cpu_offload=cpu_offload, shard_constants=True)


@mistake("per_gpu_static", caught_by=per_gpu_static_matches_fsdp_rank)
def per_gpu_static_frozen_whole(tensors, world_size, *, cpu_offload=False):
    """Only the trainable side sharded (ZeRO-2 style): every GPU keeps the whole 4-bit model."""
    return _per_gpu_static(tensors, world_size, cpu_offload=cpu_offload, shard_frozen=False)


@mistake("per_gpu_static", caught_by=per_gpu_static_matches_fsdp_rank)
def per_gpu_static_whole_gradients(tensors, world_size, *, cpu_offload=False):
    """The gradients all-reduced and kept whole (DDP), not reduce-scattered."""
    return _per_gpu_static(tensors, world_size, cpu_offload=cpu_offload, shard_grads=False)


@mistake("per_gpu_static", caught_by=per_gpu_static_matches_fsdp_rank)
def per_gpu_static_whole_states(tensors, world_size, *, cpu_offload=False):
    """The optimizer states kept whole on every GPU."""
    return _per_gpu_static(tensors, world_size, cpu_offload=cpu_offload, shard_states=False)


@mistake("per_gpu_static", caught_by=per_gpu_static_offload_moves_shards_to_host)
def per_gpu_static_offload_keeps_states(tensors, world_size, *, cpu_offload=False):
    """CPU offload of the parameters and gradients, the optimizer states left on the GPU."""
    return _per_gpu_static(tensors, world_size, cpu_offload=cpu_offload, offload_states=False)
