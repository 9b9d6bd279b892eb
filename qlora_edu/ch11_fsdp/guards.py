"""Argument checks for chapter 11 (:mod:`qlora_edu.ch11_fsdp.sharding`, :mod:`qlora_edu.ch11_fsdp.fsdp_run`).

Each public function starts with one call to its guard here; a guard raises a ``TypeError`` or ``ValueError``
naming the argument and returns the values the function goes on with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qlora_edu.common.guards import check_bool, check_choice, check_int

STATIC_PARTS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")
LAYERS = ("bnb", "course")
STORAGE_DTYPES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)

#: The ``what`` labels of chapter 4's ``static_tensors`` frozen tensors that are ``nn.Parameter`` s, so that FSDP
#: shards them: the weights kept whole ("weight") and bitsandbytes' packed codes; the rest of a QuantState (its
#: constants) is a plain attribute, held whole on every GPU. (Here, below the module the learner writes.)
PARAMETER_WHATS = ("weight", "packed NF4 codes")


def _check_tensors(tensors) -> list:
    if isinstance(tensors, str) or not isinstance(tensors, Iterable):
        raise TypeError(f"tensors must be a list of StaticTensor (from static_tensors), got {type(tensors).__name__}")
    tensors = list(tensors)
    for t in tensors:
        if not all(hasattr(t, a) for a in ("part", "what", "nbytes", "layer")):
            raise TypeError(f"tensors must hold StaticTensor entries (part, layer, what, nbytes), got "
                            f"{type(t).__name__}")
        if t.part not in STATIC_PARTS:
            raise ValueError(f"tensors: part must be one of {list(STATIC_PARTS)}, got {t.part!r}")
    return tensors


def check_per_gpu_static_args(tensors, world_size, cpu_offload) -> tuple[list, int]:
    """Guard of :func:`qlora_edu.ch11_fsdp.sharding.per_gpu_static`. Returns ``(tensors as a list, world_size)``."""
    tensors = _check_tensors(tensors)
    check_int("world_size", world_size, low=1)
    check_bool("cpu_offload", cpu_offload)
    return tensors, world_size


def check_sharded_units_args(tensors) -> list:
    """Guard of :func:`qlora_edu.ch11_fsdp.sharding.sharded_units`."""
    return _check_tensors(tensors)


def check_link_seconds_args(nbytes, world_size) -> tuple[int, int]:
    """Guard of :func:`~qlora_edu.ch11_fsdp.sharding.link_seconds` and ``step_traffic``'s ``world_size``."""
    check_int("nbytes", nbytes, low=0)
    check_int("world_size", world_size, low=1)
    return nbytes, world_size


def check_storage_dtype(name: str, value: object) -> torch.dtype:
    """``value`` must be a dtype FSDP can hold packed 4-bit bytes in: uint8, bfloat16, float16 or float32."""
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, one of {list(STORAGE_DTYPES)}, got {type(value).__name__}")
    if value not in STORAGE_DTYPES:
        raise ValueError(f"{name} must be one of {list(STORAGE_DTYPES)}, got {value}")
    return value


def check_shardable_nf4_args(layer, storage) -> None:
    """Guard of :meth:`qlora_edu.ch11_fsdp.fsdp_run.ShardableNF4Linear.from_nf4_linear`."""
    from qlora_edu.ch07_qlora.qlora import NF4Linear

    if not isinstance(layer, NF4Linear):
        raise TypeError(f"layer must be an NF4Linear (chapter 7), got {type(layer).__name__}")
    check_storage_dtype("storage", storage)


def check_build_sharded_model_args(layer, storage, seed) -> None:
    """Guard of :func:`qlora_edu.ch11_fsdp.fsdp_run.build_model`."""
    check_choice("layer", layer, LAYERS)
    check_storage_dtype("storage", storage)
    check_int("seed", seed, low=0)


def check_run_args(world_size, layer, storage, steps, batch_size, seq_len, out_dir) -> None:
    """Guard of :func:`qlora_edu.ch11_fsdp.fsdp_run.run_sharded` and ``run_single``."""
    check_int("world_size", world_size, low=1, high=64)
    check_choice("layer", layer, LAYERS)
    check_storage_dtype("storage", storage)
    check_int("steps", steps, low=1)
    check_int("batch_size", batch_size, low=1)
    check_int("seq_len", seq_len, low=2)
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of world_size ({world_size}): each rank "
                         "takes an equal slice of the batch")
    if out_dir is not None and not isinstance(out_dir, str | bytes) and not hasattr(out_dir, "__fspath__"):
        raise TypeError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
