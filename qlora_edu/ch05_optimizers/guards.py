"""Argument checks of chapter 5: the 8-bit state quantizer, the optimizers and the paging simulator.

Each public function of :mod:`qlora_edu.ch05_optimizers.blockwise8bit`, :mod:`qlora_edu.ch05_optimizers.optim` and
:mod:`qlora_edu.ch05_optimizers.paging`
starts with one call to its ``check_<function>_args`` here. They build on the primitives of
:mod:`qlora_edu.common.guards` and raise TypeError/ValueError naming the argument and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qlora_edu.ch05_optimizers.step_memory import StepMemory, StepTimeline
from qlora_edu.common.guards import (
    check_device,
    check_dtype,
    check_dtype_choice,
    check_float_tensor,
    check_instance,
    check_int,
    check_number,
    check_power_of_two,
    check_tensor,
    float_dtypes,
    n_blocks,
)
from qlora_edu.common.names import OPTIMIZERS

__all__ = [
    "check_number",
    "check_code_map",
    "check_quantize_blockwise_8bit_args",
    "check_dequantize_blockwise_8bit_args",
    "check_adamw_step_args",
    "check_optimizer_init_args",
    "check_optimizer_step_args",
    "check_state_bytes_args",
    "check_state_bytes_per_param_args",
    "check_optimizer_states_args",
    "check_first_difference_args",
    "check_lockstep_mismatch_args",
    "check_training_losses_args",
    "check_simulate_step_args",
    "check_plot_timeline_args",
    "check_qlora_7b_example_args",
    "check_paging_demo_cuda_args",
]

#: Names :func:`qlora_edu.ch05_optimizers.optim.state_bytes_per_param` knows (paging moves bytes, it does not shrink
#: them).
#: The AdamW names of the one spelling (:data:`qlora_edu.common.training_setup.OPTIMIZERS`; SGD keeps no state).
OPTIMIZER_NAMES = tuple(name for name in OPTIMIZERS if name != "sgd")


# ---------------------------------------------------------------------------------------------- primitives

def check_code_map(name: str, code: object) -> torch.Tensor:
    """``code`` must be an 8-bit map: 256 sorted float32 values in ``[-1, 1]``."""
    check_dtype(name, code, torch.float32)
    if code.dim() != 1 or code.numel() != 256:
        raise ValueError(f"{name} must be a 1-D table of 256 values (an 8-bit map), got shape {tuple(code.shape)}")
    lo, hi = (float(v) for v in torch.aminmax(code))
    if not (math.isfinite(lo) and math.isfinite(hi) and lo >= -1.0 and hi <= 1.0):
        raise ValueError(f"{name} must hold finite values in [-1, 1], got min {lo} and max {hi}")
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError(f"{name} must be sorted ascending (e.g. qlora_edu.dynamic_map(signed))")
    return code


def _check_shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be a tuple of ints, got {type(shape).__name__}")
    for i, d in enumerate(shape):
        check_int(f"{name}[{i}]", d, low=0)
    return tuple(shape)


# --------------------------------------------------------------------------------------------- blockwise8bit

def check_quantize_blockwise_8bit_args(x: object, code: object, blocksize: object, lookup: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.blockwise8bit.quantize_blockwise_8bit`."""
    check_float_tensor("x", x, finite=False)
    check_code_map("code", code)
    check_power_of_two("blocksize", blocksize, low=64, high=4096)
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))  # one pass for both checks
    if not (math.isfinite(lo) and math.isfinite(hi)):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x must be finite: it holds {n_bad} NaN or inf value(s)")
    if float(code[0]) >= 0.0 and lo < 0.0:
        raise ValueError(f"x must be >= 0 with an unsigned map (code[0] = {float(code[0])}), got min {lo}: "
                         "use dynamic_map(True) for signed values")
    if lookup is not None:
        check_dtype("lookup", lookup, torch.int32)
        if tuple(lookup.shape) != (65536,):
            raise ValueError(f"lookup must be grid_lookup_table(code) of shape (65536,), got {tuple(lookup.shape)}")


def check_dequantize_blockwise_8bit_args(codes: object, absmax: object, code: object, blocksize: object,
                                         shape: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.blockwise8bit.dequantize_blockwise_8bit`."""
    check_dtype("codes", codes, torch.uint8)
    if codes.numel() == 0:
        raise ValueError("codes must not be empty")
    check_float_tensor("absmax", absmax)
    check_dtype("absmax", absmax, torch.float32)
    check_code_map("code", code)
    check_power_of_two("blocksize", blocksize, low=64, high=4096)
    n = codes.numel()
    expected = (n_blocks(n, blocksize),)
    if tuple(absmax.shape) != expected:
        raise ValueError(f"absmax must have shape {expected} for {n} codes at blocksize {blocksize}, "
                         f"got {tuple(absmax.shape)}")
    if absmax.device != codes.device:
        raise ValueError(f"absmax must be on the device of codes ({codes.device}), got {absmax.device}")
    if shape is not None:
        dims = _check_shape("shape", shape)
        if math.prod(dims) != n:
            raise ValueError(f"shape {dims} must hold the {n} elements of codes")


# ------------------------------------------------------------------------------------------------- optim

def _check_hyper(lr: object, beta1: object, beta2: object, eps: object, weight_decay: object) -> None:
    check_number("lr", lr, low=0.0)
    check_number("beta1", beta1, low=0.0, high=1.0, high_open=True)
    check_number("beta2", beta2, low=0.0, high=1.0, high_open=True)
    check_number("eps", eps, low=0.0)
    check_number("weight_decay", weight_decay, low=0.0)


def check_adamw_step_args(param: object, grad: object, exp_avg: object, exp_avg_sq: object, step: object,
                          lr: object, beta1: object, beta2: object, eps: object, weight_decay: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.optim.adamw_step` (no finiteness scan: NaN gradients propagate, as in
    torch)."""
    tensors = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in tensors.items():
        check_float_tensor(name, t, finite=False)
    for name, t in tensors.items():
        if t.shape != param.shape:
            raise ValueError(f"{name} must have the shape of param {tuple(param.shape)}, got {tuple(t.shape)}")
        if t.device != param.device:
            raise ValueError(f"{name} must be on the device of param ({param.device}), got {t.device}")
        if t.is_sparse:
            raise ValueError(f"{name} must be dense, got a sparse tensor")
    check_int("step", step, low=1)
    _check_hyper(lr, beta1, beta2, eps, weight_decay)


def check_optimizer_init_args(lr: object, betas: object, eps: object, weight_decay: object) -> None:
    """Guard of the constructors of :class:`qlora_edu.ch05_optimizers.optim.AdamW` and
    :class:`qlora_edu.ch05_optimizers.optim.AdamW8bit`."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_hyper(lr, betas[0], betas[1], eps, weight_decay)


def check_optimizer_step_args(optimizer: torch.optim.Optimizer, closure: object) -> None:
    """Guard of ``step``: a callable or None as closure; every param group's settings valid; dense grads."""
    if closure is not None and not callable(closure):
        raise TypeError(f"closure must be callable or None, got {type(closure).__name__}")
    for i, group in enumerate(optimizer.param_groups):
        try:
            check_optimizer_init_args(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        except (TypeError, ValueError) as err:
            raise type(err)(f"param group {i}: {err}") from None
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"param group {i}: sparse gradients are not supported")
            if p.grad is not None and p.dtype not in float_dtypes():
                raise TypeError(f"param group {i}: parameters must be floating point, got {p.dtype}")


def check_state_bytes_args(optimizer: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.optim.state_bytes`."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


def check_state_bytes_per_param_args(name: object, numel: object) -> str:
    """Guard of :func:`qlora_edu.ch05_optimizers.optim.state_bytes_per_param`; returns the lower-cased name."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name.lower() not in OPTIMIZER_NAMES:
        raise ValueError(f"name must be one of {OPTIMIZER_NAMES}, got {name!r}")
    if numel is not None:
        check_int("numel", numel, low=1)
    return name.lower()


def check_optimizer_states_args(optimizer: object, param: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.optim.optimizer_states`."""
    check_state_bytes_args(optimizer)
    check_tensor("param", param)
    if not any(param is p for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("param must be one of the optimizer's parameters")


def check_first_difference_args(got: object, expected: object, atol: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.optim.first_difference`."""
    check_tensor("got", got)
    check_tensor("expected", expected)
    if got.shape != expected.shape:
        raise ValueError(f"got and expected must have the same shape, got {tuple(got.shape)} and "
                         f"{tuple(expected.shape)}")
    if got.dtype != expected.dtype:
        raise TypeError(f"got and expected must have the same dtype, got {got.dtype} and {expected.dtype}")
    if got.is_complex():
        raise TypeError(f"got and expected must be real tensors, got {got.dtype}")
    check_number("atol", atol, low=0.0)
    if atol > 0 and not got.is_floating_point():
        raise ValueError(f"atol > 0 needs floating-point tensors, got {got.dtype}")


def check_lockstep_mismatch_args(make_optimizer: object, make_reference: object, shapes: object, steps: object,
                                 seed: object, dtype: object, atol: object) -> list[tuple[int, ...]]:
    """Guard of :func:`qlora_edu.ch05_optimizers.optim.lockstep_mismatch`; returns the shapes as tuples."""
    for name, fn in (("make_optimizer", make_optimizer), ("make_reference", make_reference)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable (params -> optimizer), got {type(fn).__name__}")
    if not isinstance(shapes, Sequence) or isinstance(shapes, str) or len(shapes) == 0:
        raise TypeError(f"shapes must be a non-empty list of shapes, got {shapes!r}")
    out = []
    for i, shape in enumerate(shapes):
        dims = _check_shape(f"shapes[{i}]", shape)
        if math.prod(dims) == 0:
            raise ValueError(f"shapes[{i}] must have at least one element, got {dims}")
        out.append(dims)
    check_int("steps", steps, low=1)
    check_int("seed", seed, low=0)
    check_dtype_choice("dtype", dtype, float_dtypes())
    check_number("atol", atol, low=0.0)
    return out


def check_training_losses_args(model: object, batches: object, optimizer: object, steps: object, progress: object,
                               desc: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.optim.training_losses`."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a causal language model), got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise ValueError("model must have parameters")
    check_dtype("batches", batches, torch.int64)
    if batches.dim() != 3 or batches.numel() == 0:
        raise ValueError("batches must be token ids of shape (n_batches, batch_size, seq_len), got shape "
                         f"{tuple(batches.shape)}")
    if batches.shape[2] < 2:
        raise ValueError(f"batches must hold at least 2 tokens per row (one to predict the next), got "
                         f"seq_len {batches.shape[2]}")
    check_state_bytes_args(optimizer)
    check_int("steps", steps, low=1)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if not isinstance(desc, str):
        raise TypeError(f"desc must be a str, got {type(desc).__name__}")


# ------------------------------------------------------------------------------------------------- paging

def check_simulate_step_args(memory: object, gpu_bytes: object, paged: object, bandwidth: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.paging.simulate_step`."""
    check_instance("memory", memory, StepMemory, "e.g. qlora_7b_example()")
    check_number("gpu_bytes", gpu_bytes, low=0.0, low_open=True)
    if not isinstance(paged, bool):
        raise TypeError(f"paged must be a bool, got {type(paged).__name__}")
    check_number("bandwidth", bandwidth, low=0.0, low_open=True)


def check_plot_timeline_args(timeline: object, ax: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.paging.plot_timeline`."""
    check_instance("timeline", timeline, StepTimeline, "from simulate_step()")
    if ax is not None and not (hasattr(ax, "plot") and hasattr(ax, "set_xlabel")):
        raise TypeError(f"ax must be a matplotlib Axes or None, got {type(ax).__name__}")


def check_qlora_7b_example_args(spike_bytes: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.paging.qlora_7b_example`."""
    check_number("spike_bytes", spike_bytes, low=0.0)


def check_paging_demo_cuda_args(n_params: object, max_managed_fraction: object, steps: object,
                                device: object) -> None:
    """Guard of :func:`qlora_edu.ch05_optimizers.paging.paging_demo_cuda`: needs CUDA and a modest share of free
    memory."""
    check_int("n_params", n_params, low=100_000)
    check_number("max_managed_fraction", max_managed_fraction, low=0.0, high=0.25, low_open=True)
    check_int("steps", steps, low=1, high=100)
    check_device("device", device, types=("cuda",))
