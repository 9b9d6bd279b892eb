"""Chapter 11: a real sharded QLoRA run on PyTorch FSDP (``fully_shard``, FSDP2), and the same run on one process.

Both layers of the course are sharded: bitsandbytes' ``Linear4bit`` under peft's LoRA (the standard recipe) and
the course's own QLoRA layer (chapter 7). The model is a tiny random Llama (chapter 7's ``tiny_llama_config``: 2
layers, hidden 128, vocab 256); its unquantized weights stay in bf16 (FSDP-QLoRA does not upcast them), the
adapters in float32 (r = 8, alpha 16, no dropout, so both runs compute the same function).

The sharding plan (:func:`shard_model`): every decoder layer is one unit, the root holds the rest; peft's adapter
``Linear`` s are units of their own (what peft's ``fsdp_auto_wrap_policy`` does for FSDP1: a frozen weight and a
trainable one never share a flat buffer).

**What must change for a 4-bit weight to be sharded.** FSDP shards *parameters*. bitsandbytes keeps the packed
codes in a parameter (``Params4bit``), a ``(n/2, 1)`` uint8 tensor; FSDP1 flattens all the parameters of a unit
into one ``FlatParameter`` and refuses integer tensors (``ValueError: Cannot flatten integer dtype tensors``):
``bnb_4bit_quant_storage=torch.bfloat16`` stores the same bytes viewed as bf16 (``(n/4, 1)``), which
:func:`store_4bit_as` does to a model already quantized. FSDP2 shards each parameter on its own (a ``DTensor``)
and takes the uint8 codes too. The NF4 constants stay in the layer's ``QuantState`` (not a parameter): every rank
keeps them whole. The course's :class:`~qlora_edu.ch07_qlora.qlora.NF4Linear` keeps its codes in *buffers*,
which FSDP never shards: :class:`ShardableNF4Linear` registers them as frozen parameters instead (stored in any
dtype, viewed back to uint8 for the matmul), so its constants are sharded too.

Launch::

    python -m qlora_edu.ch11_fsdp.fsdp_run --world-size 2 --out results/     # CPU, gloo, forked processes
    torchrun --nproc-per-node 2 -m qlora_edu.ch11_fsdp.fsdp_run --out results/  # one process per GPU (nccl)

Each rank writes ``rank<r>.json`` (its bytes, the loss curve) into ``--out``; rank 0 saves the adapters once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import socket
import warnings
from pathlib import Path

import torch
from torch import nn

from qlora_edu.ch07_qlora.qlora import NF4Linear
from qlora_edu.ch11_fsdp.guards import (
    check_build_sharded_model_args,
    check_run_args,
    check_shardable_nf4_args,
    check_storage_dtype,
)
from qlora_edu.common import settings

__all__ = ["ShardableNF4Linear", "build_model", "rank_bytes", "reload_logits_diff", "run_sharded", "run_single",
           "run_summary", "shard_model", "store_4bit_as"]

LORA = dict(r=8, alpha=16.0, dropout=0.0)
LR = 1e-3


# ----------------------------------------------------------------------------------------------
# Making 4-bit weights shardable


def store_4bit_as(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every bitsandbytes ``Params4bit`` of ``model`` as ``dtype``: the same bytes, viewed.

    This is what ``BitsAndBytesConfig(bnb_4bit_quant_storage=dtype)`` makes ``quantize_4bit`` return
    (``packed.squeeze().view(dtype).unsqueeze(1)``); bitsandbytes views it back to uint8 before it dequantizes.
    A ``(n/2, 1)`` uint8 weight becomes ``(n/(2 e), 1)`` for a dtype of ``e`` bytes. Returns ``model``.
    """
    dtype = check_storage_dtype("dtype", dtype)
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            w.data = w.data.reshape(-1).view(torch.uint8).view(dtype).unsqueeze(1)
            w.quant_storage = module.quant_storage = dtype
    return model


class ShardableNF4Linear(NF4Linear):
    """Chapter 7's :class:`~qlora_edu.ch07_qlora.qlora.NF4Linear` with its 4-bit storage in frozen *parameters*
    (which FSDP shards) instead of buffers (which it copies whole to every rank).

    ``packed``, ``absmax`` and ``absmax2`` are flattened and viewed as ``storage`` (bf16 for FSDP1, which
    flattens a unit's parameters into one tensor of one dtype; any dtype for FSDP2); :attr:`nf4_weight` views
    them back. The 4-byte ``offset`` (a 0-d tensor, which FSDP cannot split) stays a buffer.
    """

    _SHARDED = ("packed", "absmax", "absmax2")

    @classmethod
    def from_nf4_linear(cls, layer: NF4Linear, storage: torch.dtype = torch.bfloat16) -> ShardableNF4Linear:
        """The same layer (the same bytes, shared) with its codes and constants as parameters of ``storage``."""
        check_shardable_nf4_args(layer, storage)
        new = cls(layer.nf4_weight, layer.bias, layer.compute_dtype)
        new._views = {}
        new._STORAGE = ("offset",)  # the buffers NF4Linear._apply keeps in their dtype: the others become parameters
        for name in cls._SHARDED:
            t = new._buffers.pop(name)
            if t is None:
                continue
            raw = t.reshape(-1).view(torch.uint8)
            if raw.numel() % storage.itemsize:
                raise ValueError(f"storage {storage}: {name} has {raw.numel()} bytes, not a multiple of "
                                 f"{storage.itemsize}; use torch.uint8")
            new._views[name] = (t.dtype, tuple(t.shape))
            setattr(new, name, nn.Parameter(raw.view(storage), requires_grad=False))
        return new

    def _stored(self, name: str) -> torch.Tensor | None:
        t = getattr(self, name)
        if name not in self._views:
            return t
        dtype, shape = self._views[name]
        return t.reshape(-1).view(torch.uint8).view(dtype).reshape(shape)

    @property
    def nf4_weight(self):
        from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor

        return NF4Tensor(self._stored("packed"), self._stored("absmax"),
                         torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.blocksize,
                         self.double_quant, self.offset, self._stored("absmax2"), self.blocksize2)

    def _apply(self, fn, recurse=True):
        # like NF4Linear: move the stored bytes to fn's device but never change their dtype
        stored = {n: self._parameters.pop(n) for n in self._SHARDED if n in self._parameters}
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.offset.device if self.offset is not None else fn(torch.empty(0, dtype=torch.uint8)).device
            for n, p in stored.items():
                self._parameters[n] = nn.Parameter(p.data.to(device), requires_grad=False)
        return self


# ----------------------------------------------------------------------------------------------
# The model and the sharding plan


def build_model(layer: str = "bnb", storage: torch.dtype = torch.bfloat16, *, seed: int = 0,
                adapter_seed: int | None = None) -> nn.Module:
    """The tiny random Llama set up for QLoRA, identically on every rank (same seed, same bytes).

    Args:
        layer: ``"bnb"`` (bitsandbytes ``Linear4bit`` + peft LoRA, through
            :func:`qlora_edu.common.training_setup.setup_training`) or ``"course"`` (chapter 7's QLoRA layer, its
            base made a :class:`ShardableNF4Linear`).
        storage: the dtype the 4-bit bytes are stored in (``bnb_4bit_quant_storage``).
        seed: seeds the random weights and (unless ``adapter_seed`` is given) the adapters.
        adapter_seed: seeds the adapters' initialization.
    """
    check_build_sharded_model_args(layer, storage, seed)
    adapter_seed = seed if adapter_seed is None else adapter_seed
    from transformers import LlamaForCausalLM

    from qlora_edu.ch07_qlora.tools import tiny_llama_config
    from qlora_edu.common.training_setup import setup_training

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config())
    for p in model.parameters():  # bf16 weights as from_pretrained(dtype=torch.bfloat16) loads them; the rotary
        p.data = p.data.to(torch.bfloat16)  # buffers stay float32
    common = dict(gradient_checkpointing=False, prepare_kbit=False, seed=adapter_seed, **LORA)
    if layer == "bnb":
        return store_4bit_as(setup_training(model, "qlora", **common), storage)
    model = setup_training(model, "qlora_scratch", **common)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NF4Linear:
                setattr(parent, name, ShardableNF4Linear.from_nf4_linear(child, storage))
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(inner.model.layers)


def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """FSDP2's ``fully_shard`` on every trainable leaf module (peft's adapter ``Linear`` s), every decoder
    layer, then the root. Returns ``model`` (its parameters are now ``DTensor`` shards)."""
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        leaf = next(m.children(), None) is None
        if leaf and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.requires_grad:
            fully_shard(m, mesh=mesh)
    for block in _decoder_layers(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ----------------------------------------------------------------------------------------------
# Measuring one rank


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _quant_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors of bitsandbytes' QuantStates, read from the modules (FSDP's parameters no longer carry them)."""
    out = []
    for m in model.modules():
        qs = getattr(m, "quant_state", None)
        while qs is not None:
            out += [t for t in (qs.absmax, qs.code, qs.offset) if isinstance(t, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    return out


def rank_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """The bytes this process holds for ``model`` (its shards, for a sharded model), by part.

    ``frozen_weights``: frozen parameters (local shards), buffers and bitsandbytes' QuantState tensors;
    ``trainable_weights``: trainable parameters' shards; ``gradients``: their ``.grad`` shards;
    ``optimizer_states``: the optimizer's state tensors (shards), the step counters included.
    """
    params = list(model.parameters())
    out = {"frozen_weights": sum(_nbytes(p) for p in params if not p.requires_grad)
           + sum(_nbytes(b) for b in model.buffers()) + sum(_nbytes(t) for t in _quant_state_tensors(model)),
           "trainable_weights": sum(_nbytes(p) for p in params if p.requires_grad),
           "gradients": sum(_nbytes(p.grad) for p in params if p.grad is not None),
           "optimizer_states": 0}
    if optimizer is not None:
        out["optimizer_states"] = sum(_nbytes(v) for st in optimizer.state.values() for v in st.values()
                                      if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


def batches(steps: int, batch_size: int, seq_len: int, vocab: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """The token batches of the run, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (batch_size, seq_len), generator=g, device="cpu") for _ in range(steps)]


def _train(model: nn.Module, optimizer, steps: list[torch.Tensor], reduce=None) -> tuple[list[float], dict]:
    """Forward with labels, backward, clip the global gradient norm to 1, AdamW step. Returns the loss curve (the
    mean over the ranks when ``reduce`` is given) and the bytes held after the first backward."""
    losses, after_backward = [], {}
    params = [p for p in model.parameters() if p.requires_grad]
    for i, ids in enumerate(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if i == 0:
            after_backward = rank_bytes(model)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if reduce is not None:
            value = reduce(value)
        losses.append(float(value))
    return losses, after_backward


def _adapter_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors by name, whole (all-gathered from the shards when ``sharded``: a collective)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        full = model.state_dict()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().clone() for n, t in full.items() if n in names}


def _run(layer: str, storage: torch.dtype, steps: int, batch_size: int, seq_len: int, rank: int, world_size: int,
         out_dir: Path | None) -> dict:
    """One process's part of a run (a single process when ``world_size == 1``)."""
    import torch.distributed as dist

    sharded = world_size > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(layer, storage)
        whole = rank_bytes(model)
        if sharded:
            shard_model(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        held = rank_bytes(model)
        device = next(model.parameters()).device
        mine = [b.chunk(world_size)[rank].to(device) for b in batches(steps, batch_size, seq_len)]

        def mean(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t / world_size

        losses, after_backward = _train(model, optimizer, mine, mean if sharded else None)
        states = rank_bytes(model, optimizer)["optimizer_states"]
        probe = batches(1, 2, seq_len, seed=1)[0].to(device)
        with torch.no_grad():
            logits = model(input_ids=probe, use_cache=False).logits.float()
        adapters = _adapter_state(model, sharded)
    result = {"layer": layer, "storage": str(storage), "rank": rank, "world_size": world_size, "losses": losses,
              "whole_bytes": whole, "held_bytes": {**held, "gradients": after_backward["gradients"],
                                                   "optimizer_states": states}}
    if out_dir is not None and rank == 0:  # saved once, by rank 0
        tag = f"{layer}_{str(storage).removeprefix('torch.')}"
        torch.save({"layer": layer, "storage": str(storage).removeprefix("torch."), "adapters": adapters,
                    "probe": probe.cpu(), "logits": logits.cpu()}, out_dir / f"{tag}_adapters_logits.pt")
        result["saved"] = str(out_dir / f"{tag}_adapters_logits.pt")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, jobs: list[tuple[str, str]], steps: int, batch_size: int,
            seq_len: int, out_dir: str) -> None:
    """A started process: join the gloo group, run each ``(layer, storage)`` job, write ``rank<r>.json``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = [_run(layer, getattr(torch, storage), steps, batch_size, seq_len, rank, world_size, Path(out_dir))
                   for layer, storage in jobs]
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


def run_sharded(world_size: int = 2, jobs=(("bnb", "bfloat16"), ("course", "bfloat16")), *, steps: int = 4,
                batch_size: int = 4, seq_len: int = 32, out_dir: str | Path) -> list[list[dict]]:
    """Run ``jobs`` (``(layer, storage dtype name)`` pairs) sharded over ``world_size`` CPU processes (gloo).

    Every rank builds the same model, takes its slice of each batch (``batch_size / world_size`` sequences), and
    FSDP averages the gradients. Returns ``results[rank][job]``: the loss curve (the mean of the ranks' losses),
    the bytes the rank held (:func:`rank_bytes` after sharding; gradients after the first backward; optimizer
    states after the last step), the whole model's bytes; rank 0 saves the whole adapters and the logits of a
    probe batch to ``out_dir``.
    """
    for layer, storage in jobs:
        check_run_args(world_size, layer, getattr(torch, storage, None), steps, batch_size, seq_len, out_dir)
    import torch.multiprocessing as mp

    for name in ("bitsandbytes", "peft", "transformers.models.llama"):  # imported once, inherited by forked ranks
        importlib.import_module(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # fork where the OS has it: the children inherit the imported libraries (spawning re-imports them)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(world_size, _free_port(), list(jobs), steps, batch_size, seq_len, str(out_dir)),
                       nprocs=world_size, join=True, start_method=method)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


def run_single(layer: str = "bnb", storage: torch.dtype = torch.bfloat16, *, steps: int = 4, batch_size: int = 4,
               seq_len: int = 32) -> dict:
    """The same run in this process, unsharded, on the whole batches: the reference curve."""
    check_run_args(1, layer, storage, steps, batch_size, seq_len, None)
    return _run(layer, storage, steps, batch_size, seq_len, 0, 1, None)


def reload_logits_diff(saved: str | Path) -> float:
    """Load the adapters that a sharded run's rank 0 saved into a fresh, unsharded model of the same layer and
    storage (its own adapters initialized from another seed, then overwritten) and return the largest absolute
    difference between its logits on the probe batch and those of the sharded model."""
    saved = torch.load(Path(saved), weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(saved["layer"], getattr(torch, saved["storage"]), adapter_seed=1)
        missing = set(saved["adapters"]) - {n for n, p in model.named_parameters() if p.requires_grad}
        if missing:
            raise ValueError(f"saved adapters name parameters the model lacks: {sorted(missing)[:3]}")
        model.load_state_dict(saved["adapters"], strict=False)
        with torch.no_grad():
            logits = model(input_ids=saved["probe"], use_cache=False).logits.float()
    return float((logits - saved["logits"]).abs().max())


def run_summary(world_size: int = 2, *, steps: int = 4, out_dir: str | Path) -> dict:
    """Run both layers sharded and unsharded and gather what chapter 11 reports: the two loss curves and their
    largest difference, each rank's bytes and the whole model's, and the logits of the adapters saved by rank 0
    and reloaded unsharded."""
    jobs = (("bnb", "bfloat16"), ("course", "bfloat16"))
    ranks = run_sharded(world_size, jobs, steps=steps, out_dir=out_dir)
    out = {"world_size": world_size, "steps": steps, "jobs": {}}
    for j, (layer, storage) in enumerate(jobs):
        single = run_single(layer, getattr(torch, storage), steps=steps)
        sharded = ranks[0][j]["losses"]
        out["jobs"][layer] = {
            "storage": storage, "single_losses": single["losses"], "sharded_losses": sharded,
            "max_loss_diff": max(abs(a - b) for a, b in zip(single["losses"], sharded, strict=True)),
            "whole_bytes": single["whole_bytes"], "rank_bytes": [r[j]["held_bytes"] for r in ranks],
            "single_held_bytes": single["held_bytes"],
            "reload_max_logit_diff": reload_logits_diff(ranks[0][j]["saved"])}
    return out


def main(argv=None) -> None:
    """``python -m qlora_edu.ch11_fsdp.fsdp_run``: start ``--world-size`` CPU processes, or, under ``torchrun``
    (``RANK`` set), be one rank (nccl on CUDA, gloo on CPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--layer", choices=("bnb", "course"), action="append")
    p.add_argument("--storage", default="bfloat16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--out", required=True)
    p.add_argument("--summary", help="also run unsharded, reload the adapters, and write chapter 11's summary here")
    a = p.parse_args(argv)
    if a.summary:
        Path(a.summary).write_text(json.dumps(run_summary(a.world_size, steps=a.steps, out_dir=a.out), indent=1) + "\n")
        return
    jobs = [(layer, a.storage) for layer in (a.layer or ["bnb", "course"])]
    launched = settings.torchrun_ranks()
    if launched is None:
        for rank in run_sharded(a.world_size, jobs, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                                out_dir=a.out):
            print(json.dumps(rank))
        return
    import torch.distributed as dist

    rank, world, local_rank = launched
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        torch.set_default_device(f"cuda:{torch.cuda.current_device()}")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    try:
        results = [_run(layer, getattr(torch, s), a.steps, a.batch_size, a.seq_len, rank, world, Path(a.out))
                   for layer, s in jobs]
    finally:
        dist.destroy_process_group()
    (Path(a.out) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
