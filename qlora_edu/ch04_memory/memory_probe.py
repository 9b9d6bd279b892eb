"""Chapter 4: measuring the bytes a training step really holds, to check :mod:`qlora_edu.ch04_memory.memory` against.

Counting each storage once (views share their storage; so do tied weights):

* :func:`tensor_bytes`: the bytes of some tensors, a module's weights (with bitsandbytes' quantization
  constants) or an optimizer's states;
* :func:`static_bytes`: a model's frozen weights, trainable weights, gradients and optimizer states;
* :func:`saved_activation_bytes`: what autograd saves for backward during one forward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (each saved tensor's storage once, weights left out);
* :func:`measure_training_step`: the peak of real training steps (forward with labels, backward, gradient
  clipping, optimizer step, ``zero_grad``) as ``qlora_edu/reference/gpu_probe.py`` took it: on CUDA
  ``torch.cuda.max_memory_allocated`` (paged optimizer states, in unified memory, reported apart); on CPU
  :func:`cpu_peak_bytes`, the peak of torch's CPU allocations recorded by its profiler;
* :class:`LiveTensorBytes`: a per-operation timeline of live tensor bytes, to see which operation is at
  the peak.

:func:`build_training_model` sets a random-weight model up the way gpu_probe.py did (bf16 Llama, decoder
linears swapped for NF4 ``Linear4bit`` for QLoRA, peft's ``prepare_model_for_kbit_training``, LoRA on the
seven projections); :func:`course_training_model` does the same with the course model. Both are
:func:`qlora_edu.common.training_setup.setup_training`, the course's one model set-up; the optimizers are its
:func:`~qlora_edu.common.training_setup.make_optimizer`.
:func:`gpu_facts_rows` reads the measured rows of ``qlora_edu/reference/gpu-facts.md`` (:data:`H100_ROWS`: the
copy committed with this module, checked against the file by a test).
``python benchmarks/memory_validation.py`` prints predicted vs measured.
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qlora_edu.ch04_memory.guards import (
    check_build_training_model_args,
    check_course_training_model_args,
    check_cpu_peak_bytes_args,
    check_gpu_facts_config_args,
    check_gpu_facts_rows_args,
    check_measure_training_step_args,
    check_random_batch_args,
    check_saved_activation_bytes_args,
    check_static_bytes_args,
    check_tensor_bytes_args,
)
from qlora_edu.common.names import LLAMA_TARGETS
from qlora_edu.common.reference import reference_path
from qlora_edu.common.training_setup import load_for_training, setup_training

__all__ = [
    "H100_ROWS",
    "LiveTensorBytes",
    "build_training_model",
    "course_training_model",
    "GPU_FACTS_PATH",
    "cpu_peak_bytes",
    "gpu_facts_config",
    "gpu_facts_rows",
    "measure_training_step",
    "quant_state_tensors",
    "random_batch",
    "saved_activation_bytes",
    "static_bytes",
    "tensor_bytes",
]

MiB = 2**20

#: The course's GPU measurements, in the repository (with their provenance).
GPU_FACTS_PATH = reference_path("gpu-facts.md")


def _row(model, method, batch, seq, ckpt, prepare, weights, setup, peak, states, total, hidden, intermediate, layers,
         r) -> dict:
    return {"model": model, "method": method, "batch": batch, "seq": seq, "ckpt": ckpt, "prepare": prepare,
            "weights_mib": weights, "setup_mib": setup, "torch_peak_mib": peak, "states_mib": states,
            "total_mib": total, "hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": 32000,
            "lora_r": r}


#: The training rows of gpu-facts.md as committed with this chapter (H100 80GB, torch 2.11, bnb 0.50.2,
#: transformers 5.17, peft 0.21.2; PagedAdamW32bit, LoRA r=64 alpha=16 dropout 0.05 on all seven
#: projections; total = torch peak + optimizer states), in MiB. :func:`gpu_facts_rows` reads the file itself
#: when it is there (and a test checks this copy against it).
H100_ROWS: tuple[dict, ...] = (
    _row("7B", "qlora", 1, 512, True, True, 3687, 4798, 5776, 1220, 6996, 4096, 11008, 32, 64),
    _row("7B", "qlora", 4, 512, True, True, 3687, 4798, 6838, 1220, 8058, 4096, 11008, 32, 64),
    _row("7B", "qlora", 1, 2048, True, True, 3687, 4798, 6839, 1220, 8059, 4096, 11008, 32, 64),
    _row("7B", "qlora", 1, 512, False, True, 3687, 4798, 11483, 1220, 12703, 4096, 11008, 32, 64),
    _row("7B", "qlora", 4, 512, False, True, 3687, 4798, 31171, 1220, 32391, 4096, 11008, 32, 64),
    _row("7B", "qlora", 1, 512, True, False, 3687, 4297, 5148, 1220, 6368, 4096, 11008, 32, 64),
    _row("7B", "lora", 1, 512, True, False, 12853, 13463, 14281, 1220, 15501, 4096, 11008, 32, 64),
    _row("13B", "qlora", 1, 512, True, True, 6893, 8532, 9935, 1910, 11845, 5120, 13824, 40, 64),
    _row("13B", "qlora", 1, 512, True, False, 6893, 7917, 9260, 1910, 11170, 5120, 13824, 40, 64),
)

_HEADING = re.compile(r"^##\s+Llama-(?P<model>[\w.]+) shape \(hidden (?P<hidden>\d+), MLP (?P<mlp>\d+), "
                      r"(?P<layers>\d+) layers(?:, vocab (?P<vocab>\d+))?\)(?P<rest>.*)$")


def _number(cell: str) -> int:
    return int(cell.replace("*", "").replace(",", "").strip())


def gpu_facts_rows(path: str | Path | None = None) -> tuple[dict, ...]:
    """The measured training rows of ``gpu-facts.md``, read from its tables.

    Each ``## Llama-<name> shape (hidden h, MLP i, L layers[, vocab V]) ... r=64[, batch b x s]`` section's
    table with a ``total MiB`` column gives rows; a column missing from a table takes its value from the
    heading (batch x seq) or the recipe the file describes (QLoRA, checkpointing on). The model's heads are
    128-dimensional (LLaMA's shapes).

    Args:
        path: the file; ``None``: :data:`GPU_FACTS_PATH` (``qlora_edu/reference/gpu-facts.md``).

    Returns:
        a tuple of row dicts with the keys of :data:`H100_ROWS`.
    """
    path = check_gpu_facts_rows_args(path)
    path = GPU_FACTS_PATH if path is None else path
    rows: list[dict] = []
    section = None
    header: list[str] | None = None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            m = _HEADING.match(line)
            section = m.groupdict() if m else None
            header = None
            continue
        if section is None or not line.startswith("|"):
            header = None if not line.startswith("|") else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the |---|---| line
        if "total mib" not in header:
            continue
        cell = dict(zip(header, cells, strict=False))
        bs = re.search(r"(\d+) x (\d+)", cell.get("batch x seq", "") or section["rest"])
        rank = re.search(r"r=(\d+)", section["rest"])
        method = cell.get("method", "QLoRA").lower()
        method = "qlora" if method.startswith("qlora") else "lora" if method.startswith("lora") else "full"
        rows.append({"model": section["model"], "method": method, "batch": int(bs.group(1)),
                     "seq": int(bs.group(2)), "ckpt": cell.get("checkpointing", "on").lower() != "off",
                     "prepare": cell.get("prepare", "yes").lower().startswith("yes"),
                     "weights_mib": _number(cell["weights mib"]), "setup_mib": _number(cell["after set-up mib"]),
                     "torch_peak_mib": _number(cell["torch peak mib"]),
                     "states_mib": _number(cell["optimizer states mib"]), "total_mib": _number(cell["total mib"]),
                     "hidden": int(section["hidden"]), "intermediate": int(section["mlp"]),
                     "layers": int(section["layers"]), "vocab": int(section["vocab"] or 32000),
                     "lora_r": int(rank.group(1)) if rank else 64})
    return tuple(rows)


def gpu_facts_config(row: dict):
    """The ``LlamaConfig`` of a :func:`gpu_facts_rows` row (128-dimensional heads, untied, as LLaMA-1)."""
    check_gpu_facts_config_args(row)
    from transformers import LlamaConfig

    heads = row["hidden"] // 128
    return LlamaConfig(hidden_size=row["hidden"], intermediate_size=row["intermediate"],
                       num_hidden_layers=row["layers"], num_attention_heads=heads, num_key_value_heads=heads,
                       vocab_size=row["vocab"], tie_word_embeddings=False, max_position_embeddings=4096)


# ----------------------------------------------------------------------------------------------
# Counting bytes


def quant_state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors of bitsandbytes' quantization states held by ``module``'s 4-bit weights: absmax (or its
    8-bit codes), the code tables, the offset and the nested state's absmax and table."""
    out = []
    for p in module.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            out += [t for t in (qs.absmax, qs.code, qs.offset) if isinstance(t, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    return out


def _flatten(obj, out: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, torch.nn.Module):
        out.extend(obj.parameters())
        out.extend(obj.buffers())
        out.extend(quant_state_tensors(obj))
    elif isinstance(obj, torch.optim.Optimizer):
        _flatten(list(obj.state.values()), out)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _flatten(v, out)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            _flatten(v, out)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``.

    Args:
        tensors: a tensor, a module (its parameters, buffers and 4-bit quantization constants), an
            optimizer (its state tensors), or a list / tuple / dict nesting them. Meta and empty tensors
            count 0.

    Returns:
        the sum of ``untyped_storage().nbytes()`` over distinct storages (a storage shared by views or tied
        weights counts once).
    """
    check_tensor_bytes_args(tensors)
    flat: list[torch.Tensor] = []
    _flatten(tensors, flat)
    seen: dict[tuple, int] = {}
    for t in flat:
        if t.device.type != "meta" and t.untyped_storage().nbytes():
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def static_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """The static parts of a training set-up, measured on its real tensors.

    Args:
        model: the model (frozen = parameters without ``requires_grad``, its buffers and 4-bit constants).
        optimizer: its optimizer, or None.

    Returns:
        ``{"frozen_weights", "trainable_weights", "gradients", "optimizer_states", "paged_states"}`` in bytes;
        gradients are the ``.grad`` tensors present now, states those present now (call after a step);
        ``paged_states`` are the states bitsandbytes put in CUDA unified memory (``is_paged``).
    """
    check_static_bytes_args(model, optimizer)
    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad] + list(model.buffers()) + quant_state_tensors(model)
    states = [] if optimizer is None else [v for st in optimizer.state.values() for v in st.values()
                                           if isinstance(v, torch.Tensor)]
    return {"frozen_weights": tensor_bytes(frozen), "trainable_weights": tensor_bytes([p for p in params
                                                                                      if p.requires_grad]),
            "gradients": tensor_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer_states": tensor_bytes(states),
            "paged_states": tensor_bytes([s for s in states if getattr(s, "is_paged", False)])}


def saved_activation_bytes(model: torch.nn.Module, batch) -> int:
    """Bytes autograd saves for backward during one forward of ``model`` on ``batch`` (labels = inputs).

    Every tensor packed by ``torch.autograd.graph.saved_tensors_hooks`` is counted once per storage
    (keyed by its storage's data pointer); the model's parameters, buffers and 4-bit constants are left
    out (they are weights, not activations). Under gradient checkpointing the checkpointed layers save only
    their inputs here: the tensors they save again during the backward belong to one layer at a time.
    The graph is dropped without a backward.

    Args:
        model: a causal LM (transformers / peft), in the mode you want measured (``model.train()``).
        batch: a ``(batch, seq)`` tensor of token ids, or a dict with ``input_ids`` (and ``labels``).

    Returns:
        bytes saved for backward by the end of the forward (with the loss's saved tensors).
    """
    batch = check_saved_activation_bytes_args(model, batch)
    weights = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *quant_state_tensors(model)]}
    seen: dict[tuple, int] = {}
    keep: list[torch.Tensor] = []  # hold every packed tensor so no storage is freed and its address reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in weights and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    keep.clear()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------
# The peak of CPU memory


def cpu_peak_bytes(fn) -> tuple[int, str]:
    """Run ``fn()`` and return the peak of CPU bytes it allocated (above what was allocated before) and
    the operation during which the peak was reached.

    The CPU analogue of ``torch.cuda.max_memory_allocated``: torch's profiler with ``profile_memory=True``
    records every allocation and free of torch's CPU allocator (tensors, and kernels' scratch); summing
    them in time order gives the live bytes at each moment. Nothing else changes how autograd runs (a
    ``TorchDispatchMode`` would: see :class:`LiveTensorBytes`).

    Returns:
        ``(peak_bytes, op_name)``.
    """
    check_cpu_peak_bytes_args(fn)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            op = e.parent.name if e.parent is not None else ""
            events.append((e.start_time_ns, e.extra_fields.alloc_size, op))
        stack.extend(e.children)
    events.sort(key=lambda x: x[0])
    current = peak = 0
    peak_op = ""
    for _, delta, op in events:
        current += delta
        if current > peak:
            peak, peak_op = current, op
    return peak, peak_op


# ----------------------------------------------------------------------------------------------
# Live tensor bytes on CPU


class LiveTensorBytes(TorchDispatchMode):
    """Follow the bytes of live tensor storages operation by operation (CPU or CUDA): a memory timeline.

    Inside ``with tracker:`` each operation's outputs are recorded once per storage and released when the
    storage dies (a weakref finalizer on the storage); ``tracker.peak`` is the largest sum seen and
    ``tracker.peak_op`` the operation that reached it. Tensors that existed before (weights, states) are
    added with :meth:`track`. Kernels' internal scratch is not seen, and an active dispatch mode makes
    autograd add gradients that meet at a tensor out of place (it treats every tensor as a subclass), so
    the peak can read one gradient-sized tensor high: :func:`cpu_peak_bytes` measures without that.

    Attributes:
        current: bytes alive now. peak: the largest ``current`` so far. peak_op: the operation at the peak.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.peak_op = ""
        self._live: dict[int, int] = {}
        self._op = ""

    def track(self, tensors) -> None:
        """Add tensors created outside the tracker (a model, an optimizer, a list of tensors)."""
        flat: list[torch.Tensor] = []
        _flatten(tensors, flat)
        for t in flat:
            self._add(t)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now."""
        self.peak, self.peak_op = self.current, ""

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = id(storage)  # torch keeps one Python object per live storage
        if key in self._live or storage.nbytes() == 0:
            return
        self._live[key] = storage.nbytes()
        self.current += storage.nbytes()
        weakref.finalize(storage, self._release, key)
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, self._op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._add(t)
        return out


# ----------------------------------------------------------------------------------------------
# Set-ups like gpu_probe.py, and real training steps


def build_training_model(config, method: str, *, device: str | torch.device = "cpu", lora_r: int = 64,
                         lora_alpha: int = 16, lora_dropout: float = 0.05, lora_targets=LLAMA_TARGETS,
                         gradient_checkpointing: bool = True, prepare_kbit: bool = True,
                         weight_dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype = torch.bfloat16,
                         seed: int = 0):
    """A random-weight Llama set up for training the way gpu_probe.py did (memory does not depend on values).

    ``LlamaForCausalLM(config)`` in ``weight_dtype``, built from torch's generator seeded with ``seed``, then
    :func:`~qlora_edu.common.training_setup.setup_training` (the adapters drawn from the same generator, the
    checkpointing kind left to the libraries, as gpu_probe.py did):

    * full: every parameter trained, checkpointing with ``gradient_checkpointing_enable()``;
    * lora: the model frozen, peft LoRA (``r``, ``alpha``, ``dropout``) on ``lora_targets``,
      checkpointing with ``gradient_checkpointing_enable()`` + ``enable_input_require_grads()``;
    * qlora: the seven projections swapped for ``bnb.nn.Linear4bit`` (NF4, double quantization, ``compute_dtype``),
      ``is_loaded_in_4bit`` set as ``from_pretrained`` does, then ``prepare_model_for_kbit_training``
      (if ``prepare_kbit``; it also turns checkpointing on) and LoRA.

    Args:
        config: a ``LlamaConfig``.
        method: "full", "lora" or "qlora".
        device: where to build it ("cpu" or "cuda").
        the rest: the recipe (see :func:`qlora_edu.ch04_memory.memory.training_memory`).

    Returns:
        ``(model, trainable)``: the model in train mode and the list of its trainable parameters.
    """
    lora_targets = check_build_training_model_args(config, method, device, lora_r, lora_alpha, lora_dropout,
                                                   lora_targets, gradient_checkpointing, prepare_kbit,
                                                   weight_dtype, compute_dtype, seed)
    from transformers import LlamaForCausalLM

    device = torch.device(device)
    torch.manual_seed(seed)
    with torch.device(device):  # built in weight_dtype; the rotary buffers stay float32, as in gpu_probe.py
        model = LlamaForCausalLM._from_config(config, dtype=weight_dtype)
    model = setup_training(model, method, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets,
                           gradient_checkpointing=gradient_checkpointing, reentrant=None, prepare_kbit=prepare_kbit,
                           compute_dtype=compute_dtype, seed=None)
    return model, [p for p in model.parameters() if p.requires_grad]


def course_training_model(method: str, *, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05,
                          gradient_checkpointing: bool = True, prepare_kbit: bool = True):
    """The course model (SmolLM2-135M, float32 on the CPU) set up for training with ``method``.

    :func:`~qlora_edu.common.training_setup.load_for_training`:

    * qlora: loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)``, peft's
      ``prepare_model_for_kbit_training`` (if ``prepare_kbit``), LoRA on the seven projections;
    * lora: the float32 model frozen, LoRA, checkpointing with ``enable_input_require_grads``;
    * full: the float32 model, every weight trained.

    Predict it with ``training_memory(llama_config("course"), method, weight_dtype=torch.float32,
    device="cpu", ...)``: the unquantized weights load in float32.

    Returns:
        ``(model, trainable)`` as :func:`build_training_model`.
    """
    check_course_training_model_args(method, lora_r, lora_alpha, lora_dropout, gradient_checkpointing,
                                     prepare_kbit)
    model, _ = load_for_training(method, dtype=torch.float32, compute_dtype=torch.bfloat16, progress=False,
                                 r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=LLAMA_TARGETS,
                                 gradient_checkpointing=gradient_checkpointing, reentrant=None,
                                 prepare_kbit=prepare_kbit, seed=None)
    return model, [p for p in model.parameters() if p.requires_grad]


def measure_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, *, steps: int = 3,
                          max_grad_norm: float | None = 0.3, baseline_bytes: int = 0) -> dict[str, object]:
    """Run ``steps`` training steps as gpu_probe.py did and measure their memory.

    Each step: ``model(**batch).loss``, ``backward()``, ``clip_grad_norm_`` (if ``max_grad_norm``),
    ``optimizer.step()``, ``zero_grad(set_to_none=True)``. On CUDA the peak is
    ``torch.cuda.max_memory_allocated() - baseline_bytes`` (pass ``baseline_bytes =
    torch.cuda.memory_allocated()`` taken before building the model, so the weights count as in gpu-facts.md);
    on CPU it is :func:`cpu_peak_bytes` of the step plus the bytes of the model's and optimizer's tensors
    before it.

    Returns:
        ``{"device", "peak" (the torch pool / CPU allocations), "paged_states" (outside it), "total" (peak +
        paged_states), "peak_op" (CPU: the operation at the peak), "saved_activations", and the static parts
        of :func:`static_bytes` measured after the first backward (gradients) and the last step (states)}``.
    """
    batch = check_measure_training_step_args(model, optimizer, batch, steps, max_grad_norm, baseline_bytes)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    grads: list[int] = []

    # kept beside chapter 8's train (the course's loop): an instrument, one step exactly as gpu_probe.py measured it
    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        if not grads:
            grads.append(tensor_bytes([p.grad for p in trainable if p.grad is not None]))
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak, peak_op = 0, ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                peak = max(peak, torch.cuda.max_memory_allocated(device) - baseline_bytes)
            else:
                before = tensor_bytes([model, optimizer])
                step_peak, op = cpu_peak_bytes(step)
                if before + step_peak > peak:
                    peak, peak_op = before + step_peak, op
    static = static_bytes(model, optimizer)
    static["gradients"] = grads[0]
    saved = saved_activation_bytes(model, batch)
    return {"device": device.type, "peak": peak, "paged_states": static["paged_states"],
            "total": peak + static["paged_states"], "peak_op": peak_op, "saved_activations": saved, **static}


def random_batch(config, batch_size: int, seq_len: int, *, device: str | torch.device = "cpu",
                 seed: int = 0, pad: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids ``(batch_size, seq_len)`` below ``config.vocab_size``, with labels = inputs (what
    gpu_probe.py trained on: memory does not depend on the tokens).

    ``pad > 0`` makes a padded batch, as chapter 8's collator does: the last ``pad`` positions of every row but the
    first are padding (``attention_mask`` 0 there, labels -100). transformers then passes SDPA an explicit mask,
    which changes what attention saves (predict it with ``training_memory(..., padded=True)``).

    Returns:
        ``{"input_ids": ids, "labels": ids}`` (int64, on ``device``), with ``"attention_mask"`` when ``pad > 0``.
    """
    check_random_batch_args(config, batch_size, seq_len, seed, pad)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=g, device="cpu")
    if not pad:
        ids = ids.to(device)
        return {"input_ids": ids, "labels": ids}
    mask = torch.ones_like(ids)
    mask[1:, seq_len - pad:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
