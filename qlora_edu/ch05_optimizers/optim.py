"""Chapter 5: AdamW from scratch, and 8-bit AdamW whose states are stored blockwise in one byte.

**AdamW** (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"). For a parameter ``p`` with
gradient ``g`` at step ``t = 1, 2, ...`` (every tensor below has ``p``'s shape)::

    p  <- p * (1 - lr * wd)                      decoupled weight decay: shrink p, not the gradient
    m  <- b1 * m + (1 - b1) * g                  first moment: running mean of g
    v  <- b2 * v + (1 - b2) * g * g              second moment: running mean of g^2
    m_hat = m / (1 - b1**t)                      bias corrections: m and v start at 0, so early
    v_hat = v / (1 - b2**t)                      averages are too small by exactly these factors
    p  <- p - lr * m_hat / (sqrt(v_hat) + eps)

Computed as ``denom = sqrt(v) / sqrt(1 - b2**t) + eps`` and ``p += (-lr / (1 - b1**t)) * m / denom``, the
arrangement of ``torch.optim.AdamW(foreach=False)`` and of bitsandbytes' 8-bit CPU kernel. torch updates
``m`` with ``lerp`` (``m + (1 - b1) * (g - m)``), which rounds differently: :class:`AdamW` equals torch's to
1e-6 over 100 steps, not bit for bit; it follows bitsandbytes' ``b1 * m + (1 - b1) * g``.

"Decoupled" is the W in AdamW: Adam with L2 regularisation adds ``wd * p`` to ``g``, where it gets divided
by ``sqrt(v_hat)``; AdamW shrinks ``p`` directly.

**State memory.** ``m`` and ``v`` are float32: 8 bytes per trainable parameter, twice the parameters
themselves. For full fine-tuning of a 7B model that is 56 GB; for QLoRA's 160 M adapter parameters
(Llama-7B, r = 64) it is 1.2 GiB.

**AdamW8bit** (Dettmers et al., "8-bit Optimizers via Block-wise Quantization") keeps ``m`` and ``v``
quantized (:mod:`qlora_edu.ch05_optimizers.blockwise8bit`): blocks of 256 elements, one uint8 code per element, one
float32
``absmax`` per block; the signed dynamic map for ``m``, the unsigned one for ``v``. Each step::

    m, v = dequantize(m_codes, m_absmax), dequantize(v_codes, v_absmax)     float32, p's shape
    adamw_step(p, g, m, v, t)                                               the update above
    m_codes, m_absmax = quantize(m);  v_codes, v_absmax = quantize(v)       new absmax, after the update

``2 + 2 * 4 / 256 = 2.03125`` bytes per parameter instead of 8. Like bitsandbytes, tensors with fewer than
``MIN_8BIT_SIZE = 4096`` elements (biases, norms) keep float32 states, their bytes being negligible. Not
always negligible with LoRA: at r = 16 on the course model the B matrices of the k and v projections
(192 x 16 = 3,072 elements) stay float32, and the adapters average 2.26 bytes per parameter, not 2.03
(``benchmarks/bench_optimizers.py``).

**Bit for bit with bitsandbytes 0.50.2 on the CPU** (``bitsandbytes.optim.AdamW8bit``): its CPU kernel
dequantizes both states, runs the update above in float32 (on a float32 copy of a bf16/fp16 parameter,
rounded back at the end) and re-quantizes with the CPU grid rounding. For its float32-state tensors (under
4096 elements) it uses a differently arranged but equal formula, ``p += (-lr * sqrt(1 - b2**t) / (1 - b1**t))
* m / (sqrt(v) + eps * sqrt(1 - b2**t))``, which rounds differently; :class:`AdamW8bit` follows it there
too, so that every parameter and every state byte matches (:func:`lockstep_mismatch` checks it).

Also here: :func:`state_bytes` (bytes an optimizer really holds) and :func:`state_bytes_per_param` (the
formula), :func:`optimizer_states` (one naming for the states of torch's, bitsandbytes' and our optimizers),
:func:`first_difference` and :func:`lockstep_mismatch` (where two optimizers first part ways), and
:func:`training_losses` (a plain training loop, to compare optimizers on a real model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qlora_edu.ch03_double_quant.double_quant import dynamic_map, grid_lookup_table
from qlora_edu.ch05_optimizers.blockwise8bit import STATE_BLOCKSIZE, dequantize_blockwise_8bit, quantize_blockwise_8bit
from qlora_edu.ch05_optimizers.guards import (
    check_adamw_step_args,
    check_first_difference_args,
    check_lockstep_mismatch_args,
    check_optimizer_init_args,
    check_optimizer_states_args,
    check_optimizer_step_args,
    check_state_bytes_args,
    check_state_bytes_per_param_args,
    check_training_losses_args,
)
from qlora_edu.common.guards import n_blocks
from qlora_edu.common.progress import progress_bar

__all__ = [
    "MIN_8BIT_SIZE",
    "adamw_step",
    "AdamW",
    "AdamW8bit",
    "state_bytes",
    "state_bytes_per_param",
    "optimizer_states",
    "first_difference",
    "OptimizerMismatch",
    "lockstep_mismatch",
    "training_losses",
]

#: Tensors with fewer elements keep float32 states in 8-bit optimizers (bitsandbytes' ``min_8bit_size``).
MIN_8BIT_SIZE = 4096


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: int, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of one parameter, in place on ``param``, ``exp_avg`` and ``exp_avg_sq``.

    Args:
        param: the parameter (any shape, float).
        grad: its gradient (``param``'s shape).
        exp_avg: first moment ``m`` (``param``'s shape), updated in place.
        exp_avg_sq: second moment ``v`` (``param``'s shape), updated in place.
        step: the step number ``t`` of this update, counted from 1 (bias corrections ``1 - beta**t``).
        lr, beta1, beta2, eps, weight_decay: AdamW's settings (``weight_decay`` is decoupled:
            ``param *= 1 - lr * weight_decay``).

    Returns:
        None: the tensors are updated in place (like ``torch.optim.AdamW``'s single-tensor loop).
    """
    check_adamw_step_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    # BEGIN SOLUTION
    # Hint: the docstring's formula in its order, each tensor updated in place (they are the optimizer's own):
    # Hint: decay param first; then m and v, the running means of g and g^2; then move param by lr times the
    # Hint: bias-corrected m over (sqrt of the bias-corrected v) + eps. Bit parity with bitsandbytes' 8-bit AdamW
    # Hint: is a stretch goal: it needs its float32 arrangement too, which check() shows after a second failure.
    param.mul_(1 - lr * weight_decay)  # decoupled weight decay, before the Adam update (as torch does)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    # END SOLUTION
    return None


def _adamw_step_bnb_fp32(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                         exp_avg_sq: torch.Tensor, step: int, *, lr: float, beta1: float, beta2: float,
                         eps: float, weight_decay: float) -> None:
    """The same update in the arrangement of bitsandbytes' float32-state CPU kernel (its tensors under
    ``MIN_8BIT_SIZE``): the bias correction of ``v`` is moved onto ``eps`` and the step size. Equal in
    exact arithmetic, different in float32 rounding; needed only for bit parity."""
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    if weight_decay > 0.0:
        param.mul_(1 - lr * weight_decay)
    update = exp_avg / (exp_avg_sq.sqrt() + eps * bias_correction2_sqrt)
    param.add_(update, alpha=-lr * bias_correction2_sqrt / bias_correction1)


class AdamW(torch.optim.Optimizer):
    """AdamW from scratch: :func:`adamw_step` on every parameter with a gradient.

    Equal to ``torch.optim.AdamW(params, lr, betas, eps, weight_decay, foreach=False)`` to float rounding.
    States ``exp_avg`` and ``exp_avg_sq`` take the parameter's dtype and shape (as in torch), plus an int
    ``step``. Param groups, ``zero_grad``, ``state_dict``/``load_state_dict`` come from
    ``torch.optim.Optimizer``. The update is the class attribute ``update`` (:func:`adamw_step`): a subclass
    can run the same optimizer with another version of it (the exercise checks run a learner's that way).
    """

    update = staticmethod(adamw_step)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        check_optimizer_init_args(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given."""
        check_optimizer_step_args(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # lazily, at the first step: parameters without gradients cost nothing
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                self.update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr=group["lr"],
                            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return loss


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit states, bit for bit like ``bitsandbytes.optim.AdamW8bit`` on the CPU.

    Per parameter of at least ``MIN_8BIT_SIZE`` elements the state holds ``exp_avg_codes`` /
    ``exp_avg_sq_codes`` (uint8, the parameter's shape) and ``exp_avg_absmax`` / ``exp_avg_sq_absmax``
    (float32, ``(ceil(n / 256),)``); smaller parameters hold float32 ``exp_avg`` / ``exp_avg_sq``. The
    update runs in float32 whatever the parameter's dtype; a bf16/fp16 parameter is rounded once at the end.

    A step is made of three functions, class attributes so that a subclass can swap in other versions (the
    exercise checks run a learner's this way): ``update`` (:func:`adamw_step`), ``quantize``
    (:func:`~qlora_edu.ch05_optimizers.blockwise8bit.quantize_blockwise_8bit`) and ``dequantize``
    (:func:`~qlora_edu.ch05_optimizers.blockwise8bit.dequantize_blockwise_8bit`).
    """

    update = staticmethod(adamw_step)
    quantize = staticmethod(quantize_blockwise_8bit)
    dequantize = staticmethod(dequantize_blockwise_8bit)

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        check_optimizer_init_args(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._maps: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _maps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The signed and unsigned dynamic maps and their grid lookup tables on ``device``, built once."""
        if device not in self._maps:
            signed, unsigned = dynamic_map(True).to(device), dynamic_map(False).to(device)
            self._maps[device] = (signed, unsigned, grid_lookup_table(signed), grid_lookup_table(unsigned))
        return self._maps[device]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given."""
        check_optimizer_step_args(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            settings = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                            weight_decay=group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                grad = p.grad.float()
                p32 = p.float()  # p itself when p is float32: updated in place
                if "exp_avg" in state:  # small tensor: float32 states, bitsandbytes' 32-bit arrangement
                    _adamw_step_bnb_fp32(p32, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                         **settings)
                else:
                    signed, unsigned, signed_lookup, unsigned_lookup = self._maps_on(p.device)
                    m = self.dequantize(state["exp_avg_codes"], state["exp_avg_absmax"], signed)
                    v = self.dequantize(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], unsigned)
                    self.update(p32, grad, m, v, state["step"], **settings)
                    # new codes and new absmax from the updated states (absmax is taken after the update)
                    state["exp_avg_codes"], state["exp_avg_absmax"] = self.quantize(m, signed, lookup=signed_lookup)
                    state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = self.quantize(
                        v, unsigned, lookup=unsigned_lookup)
                if p32 is not p:
                    p.copy_(p32)  # one round-to-nearest-even back to bf16/fp16
        return loss

    @staticmethod
    def _init_state(p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        if p.numel() < MIN_8BIT_SIZE:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            return
        # All-zero codes with absmax 0 read back as 0 (code * 0), as bitsandbytes starts its states.
        blocks = n_blocks(p.numel(), STATE_BLOCKSIZE)
        for name in ("exp_avg", "exp_avg_sq"):
            state[f"{name}_codes"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
            state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping the states' own dtypes.

        torch casts floating-point states to the parameter's dtype when loading: right for AdamW, lossy here
        (float32 ``absmax`` of a bf16 parameter would become bf16). The saved tensors are put back as saved.
        """
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor held in ``optimizer.state`` (the real allocation, nothing estimated).

    Counts what each optimizer keeps: our :class:`AdamW` two states per parameter; torch's AdamW also a
    4-byte float32 ``step`` tensor per parameter; bitsandbytes' 8-bit optimizers also the two 256-entry maps
    (2 KiB, shared by all parameters and counted once). Parameters that have not stepped yet hold nothing.
    """
    check_state_bytes_args(optimizer)
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
                if key not in seen:  # shared tensors (bitsandbytes' maps) count once
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total


def state_bytes_per_param(name: str, numel: int | None = None) -> float:
    """Optimizer state bytes per trainable parameter, from the formula.

    Args:
        name: ``"adamw"`` (two float32 states: 8), ``"adamw8bit"`` (two uint8 codes and two float32 absmax
            per 256: ``2 + 8/256 = 2.03125``), or their ``"paged_"`` versions (paging moves the same bytes
            between GPU and host memory; it does not shrink them).
        numel: the number of elements of one tensor, for its exact figure: 8-bit optimizers keep float32
            states (8) for tensors under ``MIN_8BIT_SIZE`` elements, and a partial last block still has its
            absmax. None: the large-tensor limit.

    Returns:
        Bytes per parameter (float32 AdamW states assumed: torch's AdamW keeps states in the parameter's
        dtype, so bf16 parameters would halve the first figure).
    """
    name = check_state_bytes_per_param_args(name, numel)
    if name.endswith("adamw"):
        return 8.0
    if numel is None:
        return 2 + 2 * 4 / STATE_BLOCKSIZE
    if numel < MIN_8BIT_SIZE:
        return 8.0
    return (2 * numel + 2 * 4 * n_blocks(numel, STATE_BLOCKSIZE)) / numel


def optimizer_states(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state tensors of ``param`` under one naming, for torch's, bitsandbytes' and our optimizers.

    Keys: ``exp_avg`` and ``exp_avg_sq`` for float32 (or parameter-dtype) states; ``exp_avg_codes``,
    ``exp_avg_absmax``, ``exp_avg_sq_codes``, ``exp_avg_sq_absmax`` for 8-bit states (bitsandbytes calls them
    ``state1``, ``absmax1``, ``state2``, ``absmax2``). The step counter and shared maps are left out.
    Empty before the parameter's first step.
    """
    check_optimizer_states_args(optimizer, param)
    state = optimizer.state.get(param, {})
    if "state1" in state:  # bitsandbytes
        if state["state1"].dtype == torch.uint8:
            return {"exp_avg_codes": state["state1"], "exp_avg_absmax": state["absmax1"],
                    "exp_avg_sq_codes": state["state2"], "exp_avg_sq_absmax": state["absmax2"]}
        return {"exp_avg": state["state1"], "exp_avg_sq": state["state2"]}
    names = ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
    return {k: state[k] for k in names if k in state}


def first_difference(got: torch.Tensor, expected: torch.Tensor, atol: float = 0.0) -> tuple[int, ...] | None:
    """Index of the first element (row-major) where ``got`` and ``expected`` differ, or None.

    Args:
        got, expected: tensors of the same shape and dtype.
        atol: 0 compares bit patterns (0.0 and -0.0 differ, a NaN equals a NaN with the same bits);
            above 0, float elements differ when ``|got - expected| > atol`` or exactly one is NaN.

    Returns:
        The multi-dimensional index as a tuple of ints (``()`` for a 0-d tensor), None when all agree.
    """
    check_first_difference_args(got, expected, atol)
    a, b = got.detach().flatten(), expected.detach().to(got.device).flatten()
    if atol > 0:
        differs = ((a.double() - b.double()).abs() > atol) | (a.isnan() != b.isnan())
    elif a.is_floating_point():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        differs = a.view(bits) != b.view(bits)
    else:
        differs = a != b
    where = torch.nonzero(differs)
    if where.numel() == 0:
        return None
    flat_index = int(where[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), got.shape)) if got.dim() else ()


@dataclass(frozen=True)
class OptimizerMismatch:
    """Where two optimizers run side by side first disagree (see :func:`lockstep_mismatch`)."""

    step: int
    param_index: int
    shape: tuple[int, ...]
    tensor: str
    index: tuple[int, ...] | None
    got: object
    expected: object

    def __str__(self) -> str:
        where = f"{self.tensor}[{', '.join(map(str, self.index))}]" if self.index is not None else self.tensor
        return (f"step {self.step}, parameter {self.param_index} of shape {self.shape}: {where}: "
                f"got {self.got!r}, expected {self.expected!r}")


def _lockstep_grad(shape: tuple[int, ...], step: int, generator: torch.Generator) -> torch.Tensor:
    """A float32 test gradient whose elements span four decades (what the dynamic map is for). At step 1
    the first 256 elements are 0: an all-zero block, the NaN path of the quantizer."""
    g = torch.randn(shape, generator=generator) * 10.0 ** (-4.0 * torch.rand(shape, generator=generator))
    if step == 1:
        g.view(-1)[:STATE_BLOCKSIZE] = 0.0
    return g


def lockstep_mismatch(make_optimizer: Callable, make_reference: Callable, shapes: Sequence[Sequence[int]], *,
                      steps: int = 20, seed: int = 0, dtype: torch.dtype = torch.float32,
                      atol: float = 0.0) -> OptimizerMismatch | None:
    """Run two optimizers on identical parameters and gradients; report the first step where they part.

    Args:
        make_optimizer: ``params -> optimizer`` (the one under test), e.g. ``lambda ps: AdamW8bit(ps)``.
        make_reference: ``params -> optimizer`` (the reference), e.g.
            ``lambda ps: bitsandbytes.optim.AdamW8bit(ps)``.
        shapes: one shape per parameter (all in one param group, stepped together).
        steps: number of optimizer steps.
        seed: seeds the initial parameters (normal, std 1) and the gradients (see ``_lockstep_grad``).
        dtype: dtype of the parameters and gradients (CPU).
        atol: 0: bit for bit; above 0: float tolerance (see :func:`first_difference`).

    Returns:
        None when every parameter and every state (compared under :func:`optimizer_states`' naming) agreed
        after every step, else the first :class:`OptimizerMismatch` (step, parameter, tensor, element, values).
    """
    shapes = check_lockstep_mismatch_args(make_optimizer, make_reference, shapes, steps, seed, dtype, atol)
    generator = torch.Generator().manual_seed(seed)
    init = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    refs = [torch.nn.Parameter(t.clone()) for t in init]
    opt, ref = make_optimizer(ours), make_reference(refs)
    for step in range(1, steps + 1):
        for i, shape in enumerate(shapes):
            g = _lockstep_grad(shape, step, generator).to(dtype)
            ours[i].grad, refs[i].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for i, (p, r) in enumerate(zip(ours, refs, strict=True)):
            tensors = {"param": (p.detach(), r.detach())}
            s_ours, s_ref = optimizer_states(opt, p), optimizer_states(ref, r)
            if sorted(s_ours) != sorted(s_ref):
                return OptimizerMismatch(step, i, tuple(p.shape), "state names", None, sorted(s_ours), sorted(s_ref))
            tensors.update({k: (s_ours[k], s_ref[k]) for k in sorted(s_ref)})
            for name, (a, b) in tensors.items():
                if a.shape != b.shape or a.dtype != b.dtype:
                    return OptimizerMismatch(step, i, tuple(p.shape), f"{name} (shape, dtype)", None,
                                    (tuple(a.shape), a.dtype), (tuple(b.shape), b.dtype))
                index = first_difference(a, b, atol)
                if index is not None:
                    return OptimizerMismatch(step, i, tuple(p.shape), name, index, a[index].item(), b[index].item())
    return None


def training_losses(model: torch.nn.Module, batches: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int,
                    *, progress: bool = True, desc: str = "training") -> list[float]:
    """Train a causal language model on fixed batches of token ids and return the loss of every step.

    Step ``i`` feeds ``batches[i % len(batches)]`` as inputs and labels (the model shifts the labels: each
    token predicts the next), then ``zero_grad``, ``backward``, ``optimizer.step()``. Nothing random
    happens here, so two optimizers started from the same weights see exactly the same batches.

    Args:
        model: a ``transformers`` causal LM (or anything whose ``model(input_ids=, labels=)`` returns an
            object with a scalar ``.loss``); put in train mode. Batches go to its parameters' device.
        batches: int64 token ids of shape ``(n_batches, batch_size, seq_len)``.
        optimizer: built on the parameters to train.
        steps: optimizer steps (batches are reused in order when ``steps > n_batches``).
        progress: show a progress bar (:func:`qlora_edu.common.progress.progress_bar`; it ends as one summary line).
        desc: the bar's label.

    Returns:
        ``steps`` floats: the loss computed in each step, before that step's update.
    """
    check_training_losses_args(model, batches, optimizer, steps, progress, desc)
    device = next(model.parameters()).device
    model.train()
    losses = []
    # kept beside chapter 8's train: the lesson's bare loop, the optimizer step in plain sight (chapter 7's
    # compare_training and the QLoRA benchmark reuse it)
    for i in progress_bar(range(steps), desc=desc, unit="steps", enabled=progress):
        tokens = batches[i % batches.shape[0]].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
