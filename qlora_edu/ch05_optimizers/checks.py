"""Battery for chapter 5: ``adamw_step``, ``quantize_blockwise_8bit`` and ``dequantize_blockwise_8bit``.

Expected values come from ``torch.optim.AdamW``, bitsandbytes 0.50.2 (``AdamW8bit`` on the CPU,
``quantize_blockwise``, ``dequantize_blockwise``) and a float64 evaluation of the paper's formula written out
here; never from ``qlora_edu``. The optimizer cases run the functions under test inside the course's
``AdamW`` / ``AdamW8bit`` classes (whose ``step`` does nothing but call them on every parameter) side by side
with torch's or bitsandbytes' optimizer, the reference; ``impl.lockstep_mismatch`` only does the bookkeeping:
the first step, parameter, tensor and element where the two part ways.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from qlora_edu.ch05_optimizers.guards import (
    check_adamw_step_args,
    check_dequantize_blockwise_8bit_args,
    check_quantize_blockwise_8bit_args,
)
from qlora_edu.checks import (
    CheckFailure,
    _Hex,
    bits,
    bnb_functional,
    case,
    expect_close,
    expect_equal,
    expect_raises,
    expect_true,
    in_place,
    mistake,
    property_settings,
)
from qlora_edu.common.guards import n_blocks

FAST = property_settings(20)
in_place("adamw_step", "param", "exp_avg", "exp_avg_sq")  # the optimizer's own tensors, updated by design
BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states (since 0.44)
#: Parameter shapes of the 8-bit lockstep: every one has at least 4096 elements (8-bit states), two end in a
#: partial block (5600 = 21 x 256 + 224, 4099), one is 3-D.
SHAPES_8BIT = [(70, 80), (4099,), (16, 16, 24)]


def _bnb_optim():
    bnb_functional()  # imports bitsandbytes without its note about the optional `kernels` package
    import bitsandbytes.optim

    return bitsandbytes.optim


def _maps() -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' signed and unsigned dynamic maps (the references' own tables)."""
    bnbf = bnb_functional()
    return bnbf.create_dynamic_map(signed=True), bnbf.create_dynamic_map(signed=False)


def _spread(n: int, seed: int, signed: bool = True, zero_block: bool = True) -> torch.Tensor:
    """Values over seven decades, as Adam's states are, with an all-zero first block unless told not to."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** (-7 * torch.rand(n, generator=g))
    if zero_block:
        x[:BLOCK] = 0.0
    return x if signed else x.abs()


def _grid_codes(code: torch.Tensor) -> torch.Tensor:
    """The code bitsandbytes' CPU kernel gives each of its 65,536 grid points, read from bitsandbytes itself:
    grid value ``g * 2 / 65535 - 1`` snaps back to point ``g``; blocks of a 1.0 (absmax 1) and 255 of them.
    (With the unsigned map only the upper half, the values >= 0, is meaningful.)"""
    probes = (torch.arange(65536, dtype=torch.float64) * 2 / 65535 - 1).float()
    rows = -(-65536 // (BLOCK - 1))
    body = F.pad(probes, (0, rows * (BLOCK - 1) - 65536)).view(rows, BLOCK - 1)
    blocks = torch.cat([torch.ones(rows, 1), body], dim=1)
    codes, _ = bnb_functional().quantize_blockwise(blocks.flatten(), code=code, blocksize=BLOCK)
    return codes.view(rows, BLOCK)[:, 1:].flatten()[:65536].long()


def _grid_edges(code: torch.Tensor, absmax: float) -> torch.Tensor:
    """Values a few float32 steps around every point where bitsandbytes' CPU grid switches codes, times
    ``absmax``, in blocks that end with ``absmax`` itself (so each block's absmax is known): there
    ``x * (1 / absmax)`` and ``x / absmax`` can round to different codes."""
    signed = bool(code[0] < 0)
    grid_codes = _grid_codes(code)
    switch = (torch.nonzero(grid_codes[1:] != grid_codes[:-1]).flatten() + 1).double()
    edge = ((switch - 0.5) / (0.5 * 65535) - 1).float()  # halfway between grid points g - 1 and g
    eps = torch.finfo(torch.float32).eps
    values = torch.cat([edge * absmax * (1 + k * eps) for k in range(-3, 4)])
    values = values[(values.abs() < absmax) & ((values >= 0) | signed)]
    rows = values.numel() // (BLOCK - 1)
    body = values[: rows * (BLOCK - 1)].view(rows, BLOCK - 1)
    return torch.cat([body, torch.full((rows, 1), absmax)], dim=1).flatten()


def _expect_same_codes(what: str, got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, blocksize: int,
                       hint: str = "") -> None:
    """uint8 codes equal; on failure, name the first differing element, its block, its value and both codes."""
    expect_true(isinstance(got, torch.Tensor), f"{what} should be a torch.Tensor", "Tensor", type(got).__name__)
    expect_true(got.dtype == torch.uint8, f"{what} must be uint8 (one byte per element)", torch.uint8, got.dtype,
                hint)
    expect_true(tuple(got.shape) == tuple(x.shape), f"{what} must have x's shape", tuple(x.shape),
                tuple(got.shape), hint)
    diff = (got.flatten() != expected.flatten()).nonzero().flatten()
    if diff.numel():
        i = int(diff[0])
        raise CheckFailure(f"{what}: {diff.numel()} of {got.numel()} codes differ; the first is element {i} "
                           f"(block {i // blocksize}), x = {x.flatten()[i].item():.9g}",
                           int(expected.flatten()[i]), int(got.flatten()[i]), hint)


def _with(impl, base: str):
    """The course's optimizer class ``base`` with the step made of ``impl``'s functions."""
    parts = {"update": staticmethod(impl.adamw_step)}
    if base == "AdamW8bit":
        parts.update(quantize=staticmethod(impl.quantize_blockwise_8bit),
                     dequantize=staticmethod(impl.dequantize_blockwise_8bit))
    return type(f"{base}UnderTest", (getattr(impl, base),), parts)


def _expect_lockstep(what: str, mismatch, hint: str = "") -> None:
    """No mismatch, or a failure naming the first step, parameter, tensor and element where they part."""
    if mismatch is not None:
        where = mismatch.tensor + (f"[{', '.join(map(str, mismatch.index))}]" if mismatch.index is not None else "")
        raise CheckFailure(f"{what}: they part ways at step {mismatch.step}, in parameter {mismatch.param_index} "
                           f"of shape {mismatch.shape}, first at {where} (got: yours, expected: the reference's)",
                           mismatch.expected, mismatch.got, hint)


# ---------------------------------------------------------------------------------------------- adamw_step

def _adamw_step(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay,
                l2=False, bias_correction=True, eps_inside=False, decay_after=False, rebind=False,
                step_offset=0, lerp=False, v_hat_first=False):
    """A re-implementation of the update with one switch per known mistake (all off: the right update)."""
    check_adamw_step_args(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
    t = step + step_offset
    if l2:
        grad = grad + weight_decay * param
    elif not decay_after:
        param.mul_(1 - lr * weight_decay)
    if rebind:
        exp_avg = exp_avg * beta1 + (1 - beta1) * grad
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    elif lerp:
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1 = 1 - beta1**t if bias_correction else 1.0
    bc2 = 1 - beta2**t if bias_correction else 1.0
    if eps_inside:
        denom = (exp_avg_sq / bc2 + eps).sqrt()
    elif v_hat_first:
        denom = (exp_avg_sq / bc2).sqrt().add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bc1)
    if decay_after and not l2:
        param.mul_(1 - lr * weight_decay)
    return None


#: The hint for Adam with an L2 penalty in place of AdamW's decoupled weight decay.
DECOUPLED = ("AdamW's weight decay is decoupled from the gradient: it shrinks param by (1 - lr * weight_decay) "
             "before the update and never enters m or v. Adding weight_decay * param to the gradient is Adam with "
             "L2 regularisation, whose decay gets divided by sqrt(v_hat) with the rest")


@case("adamw_step", hint="the formula above, every step in place (param, exp_avg and exp_avg_sq are the "
      "optimizer's own tensors): decay first, then m and v, then the bias-corrected update with eps outside the "
      "square root",
      code_hint="param.mul_(1 - lr * weight_decay); exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1); "
      "exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2); then param -= lr * m_hat / (sqrt(v_hat) + "
      "eps) with m_hat = m / (1 - beta1**step), v_hat = v / (1 - beta2**step)")
def adamw_step_is_the_formula(impl):
    """One update at step 7 in float64 against the paper's formula evaluated here (decoupled decay first, bias
    corrections, eps outside the square root); param, m and v must change in place."""
    g = torch.Generator().manual_seed(0)
    p, grad, m, v = (torch.randn(3, 50, generator=g, dtype=torch.float64) for _ in range(4))
    v = v.abs()
    lr, b1, b2, eps, wd, t = 3e-3, 0.8, 0.95, 1e-6, 0.1, 7
    m1 = b1 * m + (1 - b1) * grad
    v1 = b2 * v + (1 - b2) * grad**2
    expected = p * (1 - lr * wd) - lr * (m1 / (1 - b1**t)) / (torch.sqrt(v1 / (1 - b2**t)) + eps)
    param, exp_avg, exp_avg_sq = p.clone(), m.clone(), v.clone()
    impl.adamw_step(param, grad.clone(), exp_avg, exp_avg_sq, t, lr=lr, beta1=b1, beta2=b2, eps=eps,
                    weight_decay=wd)
    m_l2 = b1 * m + (1 - b1) * (grad + wd * p)  # what Adam with an L2 penalty puts in m
    if bool(torch.allclose(exp_avg, m_l2, rtol=0, atol=1e-14)):
        raise CheckFailure("exp_avg (m) after the step holds the gradient plus weight_decay * param",
                           _Hex("beta1 * m + (1 - beta1) * grad"),
                           _Hex("beta1 * m + (1 - beta1) * (grad + weight_decay * param)"),
                           DECOUPLED)
    expect_close("exp_avg (m) after the step, updated in place", exp_avg, m1, atol=1e-14,
                 hint="m = beta1 * m + (1 - beta1) * grad, written into exp_avg (mul_ / add_), not a new tensor")
    expect_close("exp_avg_sq (v) after the step, updated in place", exp_avg_sq, v1, atol=1e-14,
                 hint="v = beta2 * v + (1 - beta2) * grad * grad, written into exp_avg_sq (addcmul_)")
    expect_close("param after the step, updated in place", param, expected, atol=1e-13)


@mistake("adamw_step", caught_by=adamw_step_is_the_formula, shows=DECOUPLED)
def adamw_step_l2_penalty(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """Adam with L2 regularisation: weight_decay * param added to the gradient (the decay gets divided by
    sqrt(v_hat) with it) instead of AdamW's decoupled shrink of param."""
    return _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, l2=True)


@mistake("adamw_step", caught_by=adamw_step_is_the_formula)
def adamw_step_no_bias_correction(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """m and v used as they are, without dividing by 1 - beta**step."""
    return _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, bias_correction=False)


@mistake("adamw_step", caught_by=adamw_step_is_the_formula)
def adamw_step_eps_inside_sqrt(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """sqrt(v_hat + eps) instead of sqrt(v_hat) + eps."""
    return _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, eps_inside=True)


@mistake("adamw_step", caught_by=adamw_step_is_the_formula)
def adamw_step_decay_after_update(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps,
                                  weight_decay):
    """The decoupled decay applied after the Adam update instead of before it."""
    return _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, decay_after=True)


@mistake("adamw_step", caught_by=adamw_step_is_the_formula)
def adamw_step_states_not_in_place(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps,
                                   weight_decay):
    """exp_avg = beta1 * exp_avg + ...: new tensors bound to the local names; the optimizer's states never
    change (the step itself is right, the next one starts from stale states)."""
    return _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, rebind=True)


@case("adamw_step", hint="step counts from 1: the bias corrections at step t are 1 - beta**t")
def adamw_step_matches_torch_adamw(impl):
    """30 steps of qlora_edu.AdamW running your adamw_step next to torch.optim.AdamW(foreach=False) on six
    parameters (1-D to 3-D, float32), with non-default settings: parameters and both states within 1e-6."""
    def ours(params):
        return _with(impl, "AdamW")(params, lr=1e-2, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)

    def torchs(params):
        return torch.optim.AdamW(params, lr=1e-2, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05, foreach=False)

    mismatch = impl.lockstep_mismatch(ours, torchs, [(64, 96), (300,), (3,), (5, 7, 9), (257, 17), (1,)],
                                      steps=30, seed=1, atol=1e-6)
    _expect_lockstep("your adamw_step in AdamW vs torch.optim.AdamW (tolerance 1e-6)", mismatch)


@mistake("adamw_step", caught_by=adamw_step_matches_torch_adamw)
def adamw_step_counts_from_zero(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """Bias corrections with step - 1: at the first step 1 - beta**0 = 0, a division by zero."""
    return _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, step_offset=-1)


@case("adamw_step", hint="the validation line at the top of adamw_step is given: keep it")
def adamw_step_bad_inputs_are_named(impl):
    """Bad arguments raise an error naming the argument."""
    def call(param=None, grad=None, step=1, lr=1e-3):
        t = torch.ones(3)
        impl.adamw_step(t.clone() if param is None else param, t.clone() if grad is None else grad, t.clone(),
                        t.clone(), step, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)

    expect_raises("a gradient of another shape", ValueError, lambda: call(grad=torch.ones(4)), "grad")
    expect_raises("step 0 (steps count from 1)", ValueError, lambda: call(step=0), "step")
    expect_raises("a negative lr", ValueError, lambda: call(lr=-1.0), "lr")
    expect_raises("an integer param", TypeError, lambda: call(param=torch.ones(3, dtype=torch.int64)), "param")


# ------------------------------------------------------------------------------------- quantize_blockwise_8bit

def _quantize(x, code, blocksize=BLOCK, *, lookup=None, nearest=False, divide=False, one_absmax=False,
              linear=False, per_row=False, safe_absmax=False, flat=False):
    """A re-implementation of the quantizer with one switch per known mistake (all off: the right one)."""
    check_quantize_blockwise_8bit_args(x, code, blocksize, lookup)
    from qlora_edu.ch03_double_quant.double_quant import GRID_POINTS, grid_lookup_table

    if per_row and x.dim() > 1:
        rows = [_quantize(r, code, blocksize, lookup=lookup) for r in x.reshape(-1, x.shape[-1])]
        return torch.cat([c for c, _ in rows]).view(x.shape), torch.cat([a for _, a in rows])
    values = x.detach().flatten().float()
    n = values.numel()
    blocks = F.pad(values, (0, n_blocks(n, blocksize) * blocksize - n)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if one_absmax:
        absmax = absmax.amax().expand(absmax.shape).clone()
    if safe_absmax:
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    scaled = blocks / absmax[:, None] if divide else blocks * (1 / absmax)[:, None]
    if nearest:  # the exactly nearest code, as bitsandbytes' CUDA kernel rounds
        codes = torch.bucketize(scaled.nan_to_num(0.0), (code[1:] + code[:-1]) / 2)
    elif linear:  # 256 evenly spaced levels over [-1, 1]: the code table ignored
        codes = ((scaled + 1) * 0.5 * 255).round().nan_to_num(0.0)
    else:
        table = grid_lookup_table(code) if lookup is None else lookup
        grid = ((scaled + 1) * 0.5 * (GRID_POINTS - 1) + 0.5).nan_to_num_(0.0).clamp_(0, GRID_POINTS - 1)
        codes = table[grid.to(torch.int64)]
    codes = codes.flatten()[:n].to(torch.uint8)
    return (codes if flat else codes.view(x.shape)), absmax


@case("quantize_blockwise_8bit", hint="per block of 256 consecutive elements: its absmax; each value scaled "
      "into [-1, 1] by it; the code bitsandbytes' CPU kernel picks is chapter 3's: snap to the 65,536-point grid "
      "in float32, then look the grid point up",
      code_hint="scaled = blocks * (1 / absmax)[:, None]; g = int((scaled + 1) * 0.5 * 65535 + 0.5) in float32 "
      "(NaN -> 0, clamped); codes = lookup[g]")
def quantize_matches_bitsandbytes(impl):
    """Codes and absmax bit for bit equal to bitsandbytes.functional.quantize_blockwise (CPU) for values over
    seven decades (a partial last block), with the signed map (Adam's m) and the unsigned one (v)."""
    bnbf = bnb_functional()
    for signed, code in zip((True, False), _maps(), strict=True):
        for n in (5000, 300):
            x = _spread(n, seed=n + signed, signed=signed, zero_block=False)
            expected, state = bnbf.quantize_blockwise(x, code=code, blocksize=BLOCK)
            codes, absmax = impl.quantize_blockwise_8bit(x, code)
            label = f"{'signed' if signed else 'unsigned'} map, {n} values"
            expect_equal(f"absmax ({label}) bits", bits(absmax), bits(state.absmax),
                         hint="one float32 max |x| per block of 256 consecutive elements, the last block partial")
            _expect_same_codes(f"codes ({label})", codes, expected, x, BLOCK)


@mistake("quantize_blockwise_8bit", caught_by=quantize_matches_bitsandbytes)
def quantize_blockwise_8bit_nearest(x, code, blocksize=256, *, lookup=None):
    """The exactly nearest code (what bitsandbytes' CUDA kernel does), not the CPU grid snap."""
    return _quantize(x, code, blocksize, lookup=lookup, nearest=True)


@mistake("quantize_blockwise_8bit", caught_by=quantize_matches_bitsandbytes)
def quantize_blockwise_8bit_one_absmax(x, code, blocksize=256, *, lookup=None):
    """One absmax for the whole tensor (repeated per block): small blocks lose their precision."""
    return _quantize(x, code, blocksize, lookup=lookup, one_absmax=True)


@mistake("quantize_blockwise_8bit", caught_by=quantize_matches_bitsandbytes)
def quantize_blockwise_8bit_linear_levels(x, code, blocksize=256, *, lookup=None):
    """256 evenly spaced levels instead of the dynamic map given as ``code``."""
    return _quantize(x, code, blocksize, lookup=lookup, linear=True)


@case("quantize_blockwise_8bit", hint="multiply by the float32 reciprocal 1 / absmax (computed once per block), "
      "do not divide: a value within a float32 step of a grid cell's edge can land on the other side")
def quantize_scales_by_the_reciprocal(impl):
    """Values a few float32 steps around every edge of bitsandbytes' grid, at three absmax: the codes must be
    bitsandbytes' (they depend on x * (1 / absmax) versus x / absmax)."""
    bnbf = bnb_functional()
    for signed, code in zip((True, False), _maps(), strict=True):
        for absmax in (3.7, 0.0123, 7.77e-5):
            x = _grid_edges(code, absmax)
            x = torch.cat([x, x[:100]])  # and a partial last block
            expected, _ = bnbf.quantize_blockwise(x, code=code, blocksize=BLOCK)
            codes, _ = impl.quantize_blockwise_8bit(x, code)
            _expect_same_codes(f"codes of grid-edge values ({'signed' if signed else 'unsigned'} map, absmax "
                               f"{absmax})", codes, expected, x, BLOCK)


@mistake("quantize_blockwise_8bit", caught_by=quantize_scales_by_the_reciprocal)
def quantize_blockwise_8bit_divides(x, code, blocksize=256, *, lookup=None):
    """x / absmax instead of x * (1 / absmax)."""
    return _quantize(x, code, blocksize, lookup=lookup, divide=True)


@case("quantize_blockwise_8bit", hint="an all-zero block: absmax 0 (stored as is), 0 * (1 / 0) = NaN, which "
      "the grid snap sends to grid point 0 (nan_to_num before the clamp): code 0, as bitsandbytes stores it")
def quantize_all_zero_blocks(impl):
    """300 zeros (a full and a partial all-zero block) with both maps: absmax 0 and the codes bitsandbytes
    stores (0: the NaN of 0 * (1/0) lands on grid point 0)."""
    bnbf = bnb_functional()
    for signed, code in zip((True, False), _maps(), strict=True):
        x = torch.zeros(300)
        expected, state = bnbf.quantize_blockwise(x, code=code, blocksize=BLOCK)
        codes, absmax = impl.quantize_blockwise_8bit(x, code)
        expect_equal(f"absmax of all-zero blocks ({'signed' if signed else 'unsigned'} map)", absmax, state.absmax)
        _expect_same_codes(f"codes of all-zero blocks ({'signed' if signed else 'unsigned'} map)", codes,
                           expected, x, BLOCK)


@mistake("quantize_blockwise_8bit", caught_by=quantize_all_zero_blocks)
def quantize_blockwise_8bit_safe_absmax(x, code, blocksize=256, *, lookup=None):
    """absmax 0 replaced by 1 to avoid 0 * (1/0): reads back the same, stores other bytes than bitsandbytes."""
    return _quantize(x, code, blocksize, lookup=lookup, safe_absmax=True)


@case("quantize_blockwise_8bit", hint="blocks run over x.flatten() (across row ends); codes uint8 in x's "
      "shape; absmax float32 of shape (ceil(n / blocksize),); any float dtype in")
def quantize_shapes_dtypes_and_blocksizes(impl):
    """2-D and 3-D inputs, a bfloat16 input and block sizes 64 and 4096, against bitsandbytes."""
    bnbf = bnb_functional()
    signed_map, _ = _maps()
    for shape, dtype, blocksize in (((70, 80), torch.float32, 256), ((3, 5, 77), torch.float32, 64),
                                    ((33, 300), torch.bfloat16, 4096), ((9, 31), torch.float32, 256)):
        x = _spread(math.prod(shape), seed=sum(shape)).view(shape).to(dtype)
        expected, state = bnbf.quantize_blockwise(x.float(), code=signed_map, blocksize=blocksize)
        codes, absmax = impl.quantize_blockwise_8bit(x, signed_map, blocksize)
        label = f"shape {shape}, {dtype}, blocksize {blocksize}"
        expect_true(isinstance(absmax, torch.Tensor) and absmax.dtype == torch.float32
                    and tuple(absmax.shape) == (n_blocks(x.numel(), blocksize),),
                    f"absmax must be float32 with one entry per block ({label})",
                    (torch.float32, (n_blocks(x.numel(), blocksize),)),
                    (getattr(absmax, "dtype", None), tuple(getattr(absmax, "shape", ()))))
        expect_equal(f"absmax ({label}) bits", bits(absmax), bits(state.absmax))
        _expect_same_codes(f"codes ({label})", codes, expected.view(shape), x, blocksize)


@mistake("quantize_blockwise_8bit", caught_by=quantize_shapes_dtypes_and_blocksizes)
def quantize_blockwise_8bit_blocks_per_row(x, code, blocksize=256, *, lookup=None):
    """Blocks restart at every row instead of running over the flattened tensor."""
    return _quantize(x, code, blocksize, lookup=lookup, per_row=True)


@mistake("quantize_blockwise_8bit", caught_by=quantize_shapes_dtypes_and_blocksizes)
def quantize_blockwise_8bit_flat_codes(x, code, blocksize=256, *, lookup=None):
    """Codes returned flat (n,) instead of in x's shape."""
    return _quantize(x, code, blocksize, lookup=lookup, flat=True)


@case("quantize_blockwise_8bit", hint="the validation line at the top of quantize_blockwise_8bit is given: keep it")
def quantize_bad_inputs_are_named(impl):
    """Bad arguments raise an error naming the argument."""
    signed_map, unsigned_map = _maps()
    expect_raises("a negative value with the unsigned map", ValueError,
                  lambda: impl.quantize_blockwise_8bit(torch.tensor([1.0, -1.0]), unsigned_map), "x")
    expect_raises("x with NaN", ValueError,
                  lambda: impl.quantize_blockwise_8bit(torch.tensor([1.0, float("nan")]), signed_map), "x")
    expect_raises("blocksize 100", ValueError,
                  lambda: impl.quantize_blockwise_8bit(torch.ones(4), signed_map, 100), "blocksize")
    expect_raises("a 16-entry code", ValueError,
                  lambda: impl.quantize_blockwise_8bit(torch.ones(4), signed_map[:16]), "code")


# ----------------------------------------------------------------------------------- dequantize_blockwise_8bit

def _dequantize(codes, absmax, code, blocksize=BLOCK, shape=None, *, tile=False, divide=False, flat=False):
    """A re-implementation of the dequantizer with one switch per known mistake (all off: the right one)."""
    check_dequantize_blockwise_8bit_args(codes, absmax, code, blocksize, shape)
    shape = codes.shape if shape is None else torch.Size(shape)
    n = codes.numel()
    values = code[codes.flatten().long()]
    scale = absmax.repeat(blocksize) if tile else absmax.repeat_interleave(blocksize)
    scale = scale[:n]
    x = values / scale if divide else values * scale
    return x if flat else x.view(shape)


@case("dequantize_blockwise_8bit", hint="each code reads its value from the map `code`, times the absmax of "
      "its block, in float32", code_hint="x = code[codes] * absmax[i // blocksize], i the flat index "
      "(absmax.repeat_interleave(blocksize)[:n])")
def dequantize_matches_bitsandbytes(impl):
    """bitsandbytes' codes and absmax of 5,000 values over seven decades (signed and unsigned map, partial last
    block) read back bit for bit as bitsandbytes.functional.dequantize_blockwise reads them."""
    bnbf = bnb_functional()
    for signed, code in zip((True, False), _maps(), strict=True):
        x = _spread(5000, seed=7 + signed, signed=signed).view(50, 100)
        codes, state = bnbf.quantize_blockwise(x, code=code, blocksize=BLOCK)
        expected = bnbf.dequantize_blockwise(codes, quant_state=state)
        got = impl.dequantize_blockwise_8bit(codes, state.absmax, code)
        expect_true(isinstance(got, torch.Tensor) and got.dtype == torch.float32,
                    "the dequantized values must be a float32 tensor", torch.float32, getattr(got, "dtype", None))
        expect_true(tuple(got.shape) == (50, 100), "the result must have the codes' shape (shape=None)",
                    (50, 100), tuple(got.shape))
        expect_equal(f"dequantized values ({'signed' if signed else 'unsigned'} map) bits", bits(got),
                     bits(expected.view(50, 100)))


@mistake("dequantize_blockwise_8bit", caught_by=dequantize_matches_bitsandbytes)
def dequantize_blockwise_8bit_tiles_absmax(codes, absmax, code, blocksize=256, shape=None):
    """absmax.repeat(blocksize) (the whole list tiled) where each absmax must repeat blocksize times."""
    return _dequantize(codes, absmax, code, blocksize, shape, tile=True)


@mistake("dequantize_blockwise_8bit", caught_by=dequantize_matches_bitsandbytes)
def dequantize_blockwise_8bit_divides(codes, absmax, code, blocksize=256, shape=None):
    """code[codes] / absmax instead of times absmax."""
    return _dequantize(codes, absmax, code, blocksize, shape, divide=True)


@case("dequantize_blockwise_8bit", hint="return the values viewed as `shape` when it is given, else as codes.shape")
def dequantize_shape_argument(impl):
    """Flat codes read back into the shape asked for, at block size 64."""
    signed_map, _ = _maps()
    codes = torch.arange(130, dtype=torch.int64).remainder(256).to(torch.uint8)
    absmax = torch.tensor([0.5, 2.0, 10.0])
    expected = (signed_map[codes.long()] * absmax.repeat_interleave(64)[:130]).view(10, 13)
    got = impl.dequantize_blockwise_8bit(codes, absmax, signed_map, 64, shape=(10, 13))
    expect_true(isinstance(got, torch.Tensor) and tuple(got.shape) == (10, 13), "shape=(10, 13) must be honoured",
                (10, 13), tuple(getattr(got, "shape", ())))
    expect_equal("values read back at blocksize 64", bits(got), bits(expected))


@mistake("dequantize_blockwise_8bit", caught_by=dequantize_shape_argument)
def dequantize_blockwise_8bit_ignores_shape(codes, absmax, code, blocksize=256, shape=None):
    """The values returned flat, whatever shape says."""
    return _dequantize(codes, absmax, code, blocksize, shape, flat=True)


@case("quantize_blockwise_8bit", "dequantize_blockwise_8bit",
      hint="read back, each value is within half a gap of the map (times its block's absmax) of the original")
def round_trip_error_is_bounded(impl):
    """dequantize(quantize(x)) is within half the largest gap of the map, plus one grid cell (2/65535), times
    the block's absmax, for random sizes, both maps and values over seven decades."""
    maps = _maps()

    @FAST
    @given(n=st.integers(1, 3000), seed=st.integers(0, 2**16), signed=st.booleans())
    def prop(n, seed, signed):
        code = maps[0] if signed else maps[1]
        x = _spread(n, seed, signed)
        codes, absmax = impl.quantize_blockwise_8bit(x, code)
        back = impl.dequantize_blockwise_8bit(codes, absmax, code)
        half_gap = float((code[1:] - code[:-1]).max()) / 2 + 2 / 65535
        bound = half_gap * bnb_functional().quantize_blockwise(x, code=code, blocksize=BLOCK)[1].absmax
        bound = bound.repeat_interleave(BLOCK)[:n]
        err = (back - x).abs()
        bad = err > bound * (1 + 1e-6) + 1e-30
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise CheckFailure(f"round-trip error too large at element {i} of {n} ({'signed' if signed else 'unsigned'}"
                               f" map), x = {x[i].item():.6g}", f"<= {bound[i].item():.6g}", f"{err[i].item():.6g}")

    prop()


# ------------------------------------------------------------------------ all three inside an 8-bit AdamW

@case("adamw_step", "quantize_blockwise_8bit", "dequantize_blockwise_8bit", stretch=True,
      hint="a stretch goal: the maths is graded by the cases above; bit parity also needs bitsandbytes' "
           "arrangement of every float32 operation (equal in exact arithmetic, another rounding otherwise)",
      code_hint="m.mul_(beta1).add_(grad, alpha=1 - beta1) (not lerp_); denom = sqrt(v) / sqrt(1 - beta2**step) "
           "+ eps (not sqrt(v / (1 - beta2**step)) + eps); param.addcdiv_(m, denom, value=-lr / (1 - beta1**step)); "
           "and the quantizer's grid snap")
def adamw8bit_bit_for_bit_with_bitsandbytes(impl):
    """Stretch goal: 10 steps of qlora_edu.AdamW8bit made of your functions next to bitsandbytes.optim.AdamW8bit
    (CPU) on three parameters of 4,099 to 6,144 elements (8-bit states, partial last blocks, an all-zero first
    block at step 1): every parameter bit, every state code and every absmax must be equal. The textbook
    formula passes the maths (float64 at 1e-14, torch's AdamW at 1e-6) and may miss this one."""
    bnb_optim = _bnb_optim()
    mismatch = impl.lockstep_mismatch(lambda ps: _with(impl, "AdamW8bit")(ps, lr=1e-2),
                                      lambda ps: bnb_optim.AdamW8bit(ps, lr=1e-2), SHAPES_8BIT, steps=10, seed=2)
    _expect_lockstep("qlora_edu.AdamW8bit with your functions vs bitsandbytes.optim.AdamW8bit (bit for bit)",
                     mismatch)


@mistake("adamw_step", caught_by=adamw8bit_bit_for_bit_with_bitsandbytes)
def adamw_step_torch_lerp(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """m updated as torch does, exp_avg.lerp_(grad, 1 - beta1): equal in exact arithmetic, another rounding
    (fine next to torch at 1e-6, not bit for bit next to bitsandbytes)."""
    return _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, lerp=True)


@mistake("adamw_step", caught_by=adamw8bit_bit_for_bit_with_bitsandbytes)
def adamw_step_v_hat_first(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay):
    """denom = sqrt(v / (1 - beta2**step)) + eps: the textbook order, another float32 rounding."""
    return _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, v_hat_first=True)
