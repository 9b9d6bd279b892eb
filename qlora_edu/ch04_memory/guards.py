"""Argument checks for chapter 4's memory model (:mod:`qlora_edu.ch04_memory.memory`) and its probe
(:mod:`qlora_edu.ch04_memory.memory_probe`).

Each public function of those modules starts with one call to its guard here. A guard raises a
``TypeError`` or ``ValueError`` that names the argument and says what was expected, and returns the
normalized values the function goes on with (e.g. the settings with their defaults filled in).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from qlora_edu.common.guards import check_bool, check_choice, check_device, check_int, check_power_of_two
from qlora_edu.common.names import OPTIMIZERS, check_targets

METHODS = ("full", "lora", "qlora")
STATIC_PARTS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")
ATTENTIONS = ("sdpa", "eager")
#: ``config.model_type`` values whose models are dense Llama-style decoders (what the memory formula describes).
COVERED_MODEL_TYPES = ("llama", "mistral")
DEVICES = ("cuda", "cpu")
LLAMA_NAMES = ("7B", "13B", "33B", "65B", "course")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The keyword settings of ``training_memory`` and their defaults (``None`` = derived from the method
#: and the other arguments; :func:`resolve_settings` fills them in). The standard QLoRA recipe that
#: ``qlora_edu/reference/gpu-facts.md`` measured.
SETTING_DEFAULTS: dict[str, object] = {
    "weight_dtype": torch.bfloat16,   # dtype the unquantized weights are built in
    "compute_dtype": torch.bfloat16,  # the 4-bit linears' compute dtype (bnb_4bit_compute_dtype)
    "adapter_dtype": torch.float32,   # peft's default: adapters in float32 (autocast_adapter_dtype)
    "lora_dropout": 0.05,
    "prepare_kbit": None,             # peft's prepare_model_for_kbit_training: True for qlora, else False
    "attention": "sdpa",
    "padded": False,                  # the batch holds padding: transformers passes SDPA an explicit mask
    "blocksize": 64,                  # NF4 block size
    "double_quant": True,             # 8-bit constants in blocks of 256 (bnb_4bit_use_double_quant)
    "full_precision": None,           # full fine-tuning: dtype of a master copy of the weights, or None
    "device": "cuda",                 # which kernels run: "cuda" or "cpu"
    "foreach": False,                 # torch's multi-tensor AdamW: one state-sized temporary at the step
    "input_requires_grad": None,      # does the embedding output require grad? derived
    "reentrant": None,                # checkpointing flavour: derived (peft's prepare -> reentrant)
    "workspace_bytes": 0,             # CUDA libraries' scratch allocated in the torch pool (cuBLAS)
}


def check_float_dtype(name: str, value: object) -> torch.dtype:
    """``value`` must be one of float32, bfloat16, float16 (a ``torch.dtype``)."""
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (torch.float32, torch.bfloat16 or torch.float16), "
                        f"got {type(value).__name__}")
    if value not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be torch.float32, torch.bfloat16 or torch.float16, got {value}")
    return value


def check_bytes(name: str, value: object) -> int:
    """``value`` must be a non-negative int number of bytes (a float like 24e9 is accepted if integral)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_int(name, value, low=0)


@dataclass(frozen=True)
class LlamaDims:
    """The dimensions of a Llama model that decide its memory, read from its config by
    :func:`check_llama_shape`."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """``name -> (in_features, out_features)`` of the seven projections of a decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def check_llama_shape(name: str, config: object) -> LlamaDims:
    """``config`` must look like a Llama config: positive int ``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size``; optional ``num_key_value_heads``
    (dividing the heads), ``head_dim`` and bool ``tie_word_embeddings``. Returns its :class:`LlamaDims`."""
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [a for a in required if not hasattr(config, a)]
    if missing:
        raise TypeError(f"{name} must be a Llama-style transformers config (e.g. LlamaConfig) with {list(required)}; "
                        f"{type(config).__name__} lacks {missing}")
    # Five attribute names are not enough: an encoder (BERT) or a mixture of experts (Mixtral) has them too, and the
    # formula would answer for a dense Llama-style decoder it is not. A config that names its family must be one
    # the formula covers; an unnamed one (a LlamaShape, a namespace) is taken as the Llama shape it describes.
    model_type = getattr(config, "model_type", None)
    if model_type not in (None, "", *COVERED_MODEL_TYPES):
        raise ValueError(f"{name} is a {model_type!r} config; the memory formula covers dense Llama-style decoders "
                         f"({', '.join(COVERED_MODEL_TYPES)})")
    experts = max(int(getattr(config, a, 0) or 0) for a in ("num_local_experts", "num_experts", "n_routed_experts"))
    if experts > 1:
        raise ValueError(f"{name} describes a mixture of experts ({experts} experts a layer); the memory formula "
                         "covers dense decoders, whose every layer has one MLP")
    for attr in required:
        check_int(f"{name}.{attr}", getattr(config, attr), low=1)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    check_int(f"{name}.num_key_value_heads", kv, low=1)
    if heads % kv:
        raise ValueError(f"{name}.num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    check_int(f"{name}.head_dim", head_dim, low=1)
    return LlamaDims(hidden=config.hidden_size, intermediate=config.intermediate_size,
                     layers=config.num_hidden_layers, heads=heads, kv_heads=kv, head_dim=head_dim,
                     vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)))


def check_lora_targets(name: str, value: object) -> tuple[str, ...]:
    """``value`` must be a non-empty sequence of distinct names from the one target list
    (:data:`qlora_edu.common.training_setup.LLAMA_TARGETS`)."""
    return check_targets(name, value)


def resolve_settings(method: str, gradient_checkpointing: bool, settings: Mapping[str, object]) -> dict:
    """Check the keyword settings of ``training_memory`` and fill in the defaults.

    Raises:
        TypeError: an unknown setting (named), or a setting of the wrong type.
        ValueError: a setting out of range, or one that does not apply to ``method``.
    """
    unknown = sorted(set(settings) - set(SETTING_DEFAULTS))
    if unknown:
        raise TypeError(f"training_memory got unknown setting(s) {unknown}; known settings: "
                        f"{sorted(SETTING_DEFAULTS)}")
    s = {**SETTING_DEFAULTS, **settings}
    for key in ("weight_dtype", "compute_dtype", "adapter_dtype"):
        check_float_dtype(key, s[key])
    if not isinstance(s["lora_dropout"], int | float) or isinstance(s["lora_dropout"], bool):
        raise TypeError(f"lora_dropout must be a float in [0, 1), got {type(s['lora_dropout']).__name__}")
    if not 0.0 <= s["lora_dropout"] < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {s['lora_dropout']}")
    if s["prepare_kbit"] is None:
        s["prepare_kbit"] = method == "qlora"
    check_bool("prepare_kbit", s["prepare_kbit"])
    if s["prepare_kbit"] and method == "full":
        raise ValueError("prepare_kbit=True applies to adapter training (method 'lora' or 'qlora'), not 'full'")
    check_choice("attention", s["attention"], ATTENTIONS)
    check_bool("padded", s["padded"])
    check_power_of_two("blocksize", s["blocksize"], low=32, high=4096)
    check_bool("double_quant", s["double_quant"])
    if s["full_precision"] is not None:
        check_float_dtype("full_precision", s["full_precision"])
        if method != "full":
            raise ValueError(f"full_precision (a master copy of the weights) applies to method 'full', not {method!r}")
    check_choice("device", s["device"], DEVICES)
    check_bool("foreach", s["foreach"])
    if s["input_requires_grad"] is None:
        # What the measured recipe does: full training has a trainable embedding; peft's prepare and
        # transformers' enable_input_require_grads (called with checkpointing) mark the embedding output.
        s["input_requires_grad"] = method == "full" or gradient_checkpointing
    check_bool("input_requires_grad", s["input_requires_grad"])
    if s["reentrant"] is None:
        # prepare_model_for_kbit_training passes gradient_checkpointing_kwargs={} -> torch's default
        # (reentrant); transformers' own gradient_checkpointing_enable() asks for use_reentrant=False.
        s["reentrant"] = gradient_checkpointing and s["prepare_kbit"]
    check_bool("reentrant", s["reentrant"])
    s["workspace_bytes"] = check_bytes("workspace_bytes", s["workspace_bytes"])
    return s


def _check_optimizer(optimizer: object) -> str:
    if not isinstance(optimizer, str):
        raise TypeError(f"optimizer must be a str, one of {list(OPTIMIZERS)}, got {type(optimizer).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)} (adamw: two float32 states; adamw8bit: "
                         f"bitsandbytes' blockwise 8-bit states; paged_*: the same states in CUDA unified memory; "
                         f"sgd: no state), got {optimizer!r}")
    return optimizer


def check_covered(config: object, dims: LlamaDims, seq_len: int, lora_r: int, targets: tuple[str, ...]) -> None:
    """What the formula would answer silently but the model cannot do: a sequence beyond the model's positions,
    or an adapter rank above the smallest side of a targeted projection (a rank-r update of an m x n matrix has
    rank at most min(m, n))."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and not isinstance(positions, bool) and seq_len > positions:
        raise ValueError(f"seq_len ({seq_len}) must not exceed the model's max_position_embeddings ({positions})")
    smallest = min(min(dims.linears()[t]) for t in targets)
    if lora_r > smallest:
        raise ValueError(f"lora_r ({lora_r}) must not exceed the smallest side of a targeted projection ({smallest}): "
                         "an update of rank r needs r <= min(in_features, out_features)")


def check_training_memory_args(config, method, batch_size, seq_len, lora_r, lora_targets, gradient_checkpointing,
                               optimizer, settings) -> tuple[LlamaDims, tuple[str, ...], dict]:
    """Guard of :func:`qlora_edu.ch04_memory.memory.training_memory`. Returns ``(dims, lora_targets, settings)``
    normalized."""
    dims = check_llama_shape("config", config)
    check_choice("method", method, METHODS)
    check_int("batch_size", batch_size, low=1)
    check_int("seq_len", seq_len, low=1)
    check_int("lora_r", lora_r, low=1)
    targets = check_lora_targets("lora_targets", lora_targets)
    check_covered(config, dims, seq_len, lora_r, targets)
    check_bool("gradient_checkpointing", gradient_checkpointing)
    _check_optimizer(optimizer)
    return dims, targets, resolve_settings(method, gradient_checkpointing, settings)


SHARDINGS = ("none", "fsdp")


def check_sharding_args(world_size, sharding, cpu_offload) -> bool:
    """The sharding keywords of ``training_memory`` (chapter 11). Returns whether FSDP shards the model."""
    check_int("world_size", world_size, low=1)
    check_choice("sharding", sharding, SHARDINGS)
    check_bool("cpu_offload", cpu_offload)
    if sharding == "none" and (world_size > 1 or cpu_offload):
        raise ValueError(f"world_size={world_size}, cpu_offload={cpu_offload} need sharding='fsdp' (without "
                         "sharding every GPU holds the whole model: predict one with world_size=1)")
    return sharding == "fsdp"


def check_static_tensors_args(config, method, lora_r, lora_targets, optimizer,
                              settings) -> tuple[LlamaDims, tuple[str, ...], dict]:
    """Guard of :func:`qlora_edu.ch04_memory.memory.static_tensors`. Returns ``(dims, lora_targets, settings)``: the
    model's dimensions, the targets as a tuple, and every setting with its default filled in."""
    dims = check_llama_shape("config", config)
    check_choice("method", method, METHODS)
    check_int("lora_r", lora_r, low=1)
    targets = check_lora_targets("lora_targets", lora_targets)
    _check_optimizer(optimizer)
    return dims, targets, resolve_settings(method, False, settings)


def check_static_parts_args(tensors) -> list:
    """Guard of :func:`qlora_edu.ch04_memory.memory.static_parts`: a list of ``StaticTensor`` (anything with ``part``
    and ``nbytes``). Returns it as a list."""
    if isinstance(tensors, str) or not isinstance(tensors, Iterable):
        raise TypeError(f"tensors must be a list of StaticTensor (from static_tensors), got {type(tensors).__name__}")
    tensors = list(tensors)
    for t in tensors:
        if not hasattr(t, "part") or not hasattr(t, "nbytes"):
            raise TypeError(f"tensors must hold StaticTensor entries (with .part and .nbytes), got {type(t).__name__}")
        if t.part not in STATIC_PARTS:
            raise ValueError(f"tensors: part must be one of {list(STATIC_PARTS)}, got {t.part!r}")
    return tensors


def check_llama_config_args(name: object) -> str:
    """Guard of :func:`qlora_edu.ch04_memory.memory.llama_config`: returns the canonical name ("7B", ..., "course")."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {list(LLAMA_NAMES)}, got {type(name).__name__}")
    key = name.strip().upper().removeprefix("LLAMA-").removeprefix("LLAMA")
    aliases = {"COURSE": "course", "SMOLLM2-135M": "course", "SMOLLM2-135M-INSTRUCT": "course"}
    key = aliases.get(key, key)
    if key not in LLAMA_NAMES:
        raise ValueError(f"name must be one of {list(LLAMA_NAMES)} (or 'SmolLM2-135M' for the course model), "
                         f"got {name!r}")
    return key


def check_gpu_bytes(name: str, value: object) -> int:
    """A GPU's memory in bytes: a positive int (or an integral float such as ``24e9``)."""
    value = check_bytes(name, value)
    if value == 0:
        raise ValueError(f"{name} must be positive, got 0")
    return value


def check_largest_batch_size_args(config, method, gpu_bytes, seq_len, max_batch_size) -> int:
    """Guard of :func:`qlora_edu.ch04_memory.memory.largest_batch_size`. Returns ``gpu_bytes`` as an int."""
    check_llama_shape("config", config)
    check_choice("method", method, METHODS)
    gpu_bytes = check_gpu_bytes("gpu_bytes", gpu_bytes)
    check_int("seq_len", seq_len, low=1)
    check_int("max_batch_size", max_batch_size, low=1)
    return gpu_bytes


def check_largest_seq_len_args(config, method, gpu_bytes, batch_size, multiple_of, max_seq_len) -> int:
    """Guard of :func:`qlora_edu.ch04_memory.memory.largest_seq_len`. Returns ``gpu_bytes`` as an int."""
    check_llama_shape("config", config)
    check_choice("method", method, METHODS)
    gpu_bytes = check_gpu_bytes("gpu_bytes", gpu_bytes)
    check_int("batch_size", batch_size, low=1)
    check_int("multiple_of", multiple_of, low=1)
    check_int("max_seq_len", max_seq_len, low=multiple_of)
    return gpu_bytes


def check_largest_model_args(method, gpu_bytes, batch_size, seq_len, candidates) -> tuple[int, tuple]:
    """Guard of :func:`qlora_edu.ch04_memory.memory.largest_model`. Returns ``(gpu_bytes, candidates)``."""
    check_choice("method", method, METHODS)
    gpu_bytes = check_gpu_bytes("gpu_bytes", gpu_bytes)
    check_int("batch_size", batch_size, low=1)
    check_int("seq_len", seq_len, low=1)
    if isinstance(candidates, str) or not isinstance(candidates, Iterable):
        raise TypeError(f"candidates must be a sequence of names or configs, got {type(candidates).__name__}")
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("candidates must not be empty")
    for c in candidates:
        if isinstance(c, str):
            check_llama_config_args(c)
        else:
            check_llama_shape("candidates entry", c)
    return gpu_bytes, candidates


def check_fits_args(config, method, gpu_bytes) -> int:
    """Guard of :func:`qlora_edu.ch04_memory.memory.fits`. Returns ``gpu_bytes`` as an int."""
    check_llama_shape("config", config)
    check_choice("method", method, METHODS)
    return check_gpu_bytes("gpu_bytes", gpu_bytes)


# ----------------------------------------------------------------------------------------------
# memory_probe


def check_module(name: str, value: object) -> torch.nn.Module:
    """``value`` must be a ``torch.nn.Module``."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (a transformers/peft model), got {type(value).__name__}")
    return value


def check_batch(name: str, value: object) -> dict:
    """A training batch: a 2-D integer tensor of token ids ``(batch, seq)``, or a dict with ``input_ids``
    (and optionally ``labels``, ``attention_mask``). Returns the dict form with ``labels`` filled in."""
    if isinstance(value, torch.Tensor):
        value = {"input_ids": value}
    if not isinstance(value, Mapping) or "input_ids" not in value:
        raise TypeError(f"{name} must be a (batch, seq) tensor of token ids or a dict with 'input_ids', "
                        f"got {type(value).__name__}")
    ids = value["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}['input_ids'] must be a 2-D int64/int32 tensor (batch, seq), "
                        f"got {type(ids).__name__}{'' if not isinstance(ids, torch.Tensor) else tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name}['input_ids'] must not be empty")
    return {"labels": ids, **value}


def check_tensor_bytes_args(tensors: object) -> None:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.tensor_bytes`: a tensor, a module, or a (nested)
    collection."""
    if tensors is None:
        raise TypeError("tensors must be a tensor, a module, or a list/tuple/dict of them, got None")


def check_saved_activation_bytes_args(model, batch) -> dict:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.saved_activation_bytes`. Returns the batch as a dict."""
    check_module("model", model)
    return check_batch("batch", batch)


def check_static_bytes_args(model, optimizer) -> None:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.static_bytes`."""
    check_module("model", model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


def check_measure_training_step_args(model, optimizer, batch, steps, max_grad_norm, baseline_bytes) -> dict:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.measure_training_step`. Returns the batch as a dict."""
    check_module("model", model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    batch = check_batch("batch", batch)
    check_int("steps", steps, low=1, high=100)
    if max_grad_norm is not None and (not isinstance(max_grad_norm, int | float) or isinstance(max_grad_norm, bool)
                                      or max_grad_norm <= 0):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    check_bytes("baseline_bytes", baseline_bytes)
    return batch


def check_random_batch_args(config, batch_size, seq_len, seed, pad=0) -> None:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.random_batch`."""
    check_llama_shape("config", config)
    check_int("batch_size", batch_size, low=1)
    check_int("seq_len", seq_len, low=1)
    check_int("seed", seed, low=0)
    check_int("pad", pad, low=0, high=seq_len - 1)
    if pad and batch_size < 2:
        raise ValueError("pad needs batch_size >= 2: the first row stays unpadded (it sets the batch's length)")


def check_build_training_model_args(config, method, device, lora_r, lora_alpha, lora_dropout, lora_targets,
                                    gradient_checkpointing, prepare_kbit, weight_dtype, compute_dtype,
                                    seed) -> tuple[str, ...]:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.build_training_model`. Returns ``lora_targets`` as a tuple."""
    check_llama_shape("config", config)
    check_choice("method", method, METHODS)
    check_device("device", device)
    check_int("lora_r", lora_r, low=1)
    check_int("lora_alpha", lora_alpha, low=1)
    if not isinstance(lora_dropout, int | float) or isinstance(lora_dropout, bool) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    targets = check_lora_targets("lora_targets", lora_targets)
    check_bool("gradient_checkpointing", gradient_checkpointing)
    check_bool("prepare_kbit", prepare_kbit)
    check_float_dtype("weight_dtype", weight_dtype)
    check_float_dtype("compute_dtype", compute_dtype)
    check_int("seed", seed, low=0)
    return targets


def check_course_training_model_args(method, lora_r, lora_alpha, lora_dropout, gradient_checkpointing,
                                     prepare_kbit) -> None:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.course_training_model`."""
    check_choice("method", method, METHODS)
    check_int("lora_r", lora_r, low=1)
    check_int("lora_alpha", lora_alpha, low=1)
    if not isinstance(lora_dropout, int | float) or isinstance(lora_dropout, bool) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    check_bool("gradient_checkpointing", gradient_checkpointing)
    check_bool("prepare_kbit", prepare_kbit)


def check_cpu_peak_bytes_args(fn) -> None:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.cpu_peak_bytes`: ``fn`` must be callable with no argument."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no argument, got {type(fn).__name__}")


def check_gpu_facts_rows_args(path) -> object:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.gpu_facts_rows`: ``None`` or the path of an existing file."""
    if path is None:
        return None
    from pathlib import Path

    if not isinstance(path, str | Path):
        raise TypeError(f"path must be a str or pathlib.Path (gpu-facts.md), got {type(path).__name__}")
    if not Path(path).is_file():
        raise ValueError(f"path must name an existing file, got {str(path)!r}")
    return Path(path)


def check_gpu_facts_config_args(row) -> None:
    """Guard of :func:`qlora_edu.ch04_memory.memory_probe.gpu_facts_config`: a row of ``gpu_facts_rows``."""
    need = ("hidden", "intermediate", "layers", "vocab")
    if not isinstance(row, Mapping) or any(k not in row for k in need):
        raise TypeError(f"row must be a dict from gpu_facts_rows() with keys {list(need)}, got {type(row).__name__}")
    for k in need:
        check_int(f"row[{k!r}]", row[k], low=1)
    if row["hidden"] % 128:
        raise ValueError(f"row['hidden'] must be a multiple of 128 (LLaMA's 128-dim heads), got {row['hidden']}")
