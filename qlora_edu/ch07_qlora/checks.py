"""Battery for chapter 7: the 4-bit matmul as an autograd function (``nf4_matmul``, built on the learner's
``NF4Matmul``) and QLoRA's frozen path (``nf4_linear``).

Expected values come from outside the code under test: bitsandbytes 0.50.2's own dequantization of the same
NF4 bytes (a float64 ``x W^T + b`` and autograd through ``F.linear`` with that weight), bitsandbytes'
``Linear4bit`` in train mode, and peft 0.21.2's LoRA on that ``Linear4bit``. What autograd keeps for backward is
read with ``torch.autograd.graph.saved_tensors_hooks`` and from the backward node's own attributes.

Shapes have whole 64-blocks per row (bitsandbytes 0.50.2 dequantizes some other multi-row shapes wrongly on
AVX512 CPUs); the NF4 weight is the package's ``quantize_nf4`` (chapter 3), and every case first checks that
its bytes are bitsandbytes'.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import qlora_edu
from qlora_edu.ch07_qlora.guards import check_nf4_linear_args, check_nf4_matmul_args
from qlora_edu.checks import bnb_functional, bnb_nf4, case, expect_equal, expect_true, mistake

IN, OUT = 128, 192
#: unit roundoff (half an ulp at 1) of each dtype: one rounding moves a value by at most u * |value|
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
#: slack for the float32 accumulation of a dot product of IN terms (IN * 2**-24 < 1e-5), relative to sum |x||w|
ACCUMULATION = 1e-5


def _linear(seed: int, in_features: int = IN, out_features: int = OUT, dtype: torch.dtype = torch.float32
            ) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, dtype=dtype)


def _nf4(impl, weight: torch.Tensor):
    """``(NF4Tensor, W)``: the package's NF4 storage of ``weight`` and bitsandbytes' float32 dequantization of its
    own (checked identical) bytes."""
    t = impl.quantize_nf4(weight.detach(), 64, True)
    packed, state = bnb_nf4(weight.detach(), 64, True)
    expect_equal("quantize_nf4's bytes (chapter 3) against bitsandbytes'", t.packed.view(-1), packed.view(-1))
    w = bnb_functional().dequantize_4bit(packed, state).float().reshape(weight.shape)
    return t, w


def _expect_within(what: str, got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, hint: str = "") -> None:
    """``|got - expected| <= bound`` element-wise (``expected`` and ``bound`` float64)."""
    expect_true(isinstance(got, torch.Tensor), f"{what} should be a torch.Tensor", "Tensor", type(got).__name__)
    expect_true(tuple(got.shape) == tuple(expected.shape), f"{what} has the wrong shape", tuple(expected.shape),
                tuple(got.shape), hint)
    err = (got.double() - expected).abs()
    bad = err > bound
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        expect_true(False, f"{what} is off at {int(bad.sum())} of {bad.numel()} positions (more than one rounding "
                    f"of the output dtype); first at flat index {i}, allowed error {bound.flatten()[i].item():.3g}",
                    expected.flatten()[i].item(), got.flatten()[i].item(), hint)


def _matmul_bound(x: torch.Tensor, w: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The error one correctly rounded result in ``dtype`` may have: ``u |y| + 1e-5 sum |x| |w|`` (a float32
    accumulation over ``in`` terms, then one rounding to ``dtype``)."""
    return UNIT_ROUNDOFF[dtype] * reference.abs() + ACCUMULATION * (x.double().abs() @ w.double().abs().T) + 1e-30


# ----------------------------------------------------------------------------------------------
# nf4_matmul: the autograd function


def _matmul_under_test(impl):
    """The matmul under test: a learner's (or a known mistake's) ``nf4_matmul`` when one is laid over the package;
    otherwise ``NF4Matmul.apply`` of the overlay, so that ``check(NF4Matmul)`` tests the learner's class itself
    (the package's ``nf4_matmul`` would call the package's class)."""
    from qlora_edu.ch07_qlora.qlora import nf4_matmul

    if impl.nf4_matmul is not nf4_matmul:
        return impl.nf4_matmul
    return impl.NF4Matmul.apply



@case("nf4_matmul", "NF4Matmul",
      hint="forward: the weight dequantized from its 4-bit storage, in x's dtype, applied as a linear layer "
      "(x W^T + bias)",
      code_hint="w = dequantize_nf4(weight).to(x.dtype); out = F.linear(x, w, bias)")
def nf4_matmul_matches_float64_reference(impl):
    """``x W^T + b`` against a float64 product with bitsandbytes' dequantization of the same bytes, cast to the
    compute dtype: within one rounding of the output dtype, returned in ``x``'s dtype and shape (..., out)."""
    g = torch.Generator().manual_seed(3)
    for x_dtype, w_dtype, shape in ((torch.float32, torch.float32, (OUT, IN)), (torch.bfloat16, torch.float32,
                                    (OUT, IN)), (torch.float16, torch.bfloat16, (IN, 3 * IN)),
                                    (torch.bfloat16, torch.bfloat16, (IN, IN))):
        layer = _linear(1, shape[1], shape[0])
        t, w = _nf4(impl, layer.weight.to(w_dtype))  # t.dtype is w_dtype: dequantize_nf4 returns that dtype
        x = torch.randn(2, 5, shape[1], generator=g).to(x_dtype)
        bias = layer.bias.detach().to(x_dtype)
        y = _matmul_under_test(impl)(x, t, bias)
        expect_true(isinstance(y, torch.Tensor) and y.dtype == x_dtype,
                    f"nf4_matmul must return x's dtype (x {x_dtype}, weight stored from {w_dtype})", x_dtype,
                    getattr(y, "dtype", type(y).__name__), "cast the dequantized weight to x.dtype")
        wc = w.to(x_dtype)  # the weight in the compute dtype, as the matmul must see it
        reference = x.double() @ wc.double().T + bias.double()
        _expect_within(f"nf4_matmul(x {x_dtype}, weight {tuple(shape)})", y, reference,
                       _matmul_bound(x, wc, reference, x_dtype),
                       "y = x W^T + b: F.linear(x, w, bias), w the dequantized (out, in) weight")


@case("nf4_matmul", "NF4Matmul", hint="backward: y = x W^T, so dL/dx = dL/dy W, with W dequantized again from "
      "the 4-bit storage; the frozen weight and the bias get no gradient",
      code_hint="grad_x = grad_out @ dequantize_nf4(ctx.weight).to(grad_out.dtype) (W is (out, in): no transpose); "
      "return grad_x, None, None")
def nf4_matmul_input_gradient(impl):
    """``dL/dx`` equals autograd's through ``F.linear`` with the dequantized weight (float32: to float32
    accuracy; bf16: within one bf16 rounding of the float64 ``dL/dy W``), shape and dtype of ``x``; square and
    non-square weights."""
    g = torch.Generator().manual_seed(4)
    for x_dtype, shape in ((torch.float32, (OUT, IN)), (torch.float32, (IN, IN)), (torch.bfloat16, (OUT, IN))):
        layer = _linear(2, shape[1], shape[0])
        t, w = _nf4(impl, layer.weight)
        x = torch.randn(3, 4, shape[1], generator=g).to(x_dtype).requires_grad_()
        grad_out = torch.randn(3, 4, shape[0], generator=g).to(x_dtype)
        y = _matmul_under_test(impl)(x, t, None)
        expect_true(y.requires_grad, "nf4_matmul's output must require grad when x does (call NF4Matmul.apply)",
                    True, y.requires_grad)
        y.backward(grad_out)
        expect_true(x.grad is not None, "x.grad is None after backward", "a tensor", None)
        expect_true(x.grad.dtype == x_dtype and tuple(x.grad.shape) == tuple(x.shape),
                    "dL/dx must have x's dtype and shape", (x_dtype, tuple(x.shape)),
                    (x.grad.dtype, tuple(x.grad.shape)))
        wc = w.to(x_dtype)
        if x_dtype == torch.float32:
            x_ref = x.detach().clone().requires_grad_()
            F.linear(x_ref, wc).backward(grad_out)  # autograd through the dequantized weight
            expected = x_ref.grad.double()
        else:
            expected = grad_out.double() @ wc.double()
        bound = UNIT_ROUNDOFF[x_dtype] * expected.abs() + ACCUMULATION * (grad_out.double().abs() @ wc.double().abs())
        _expect_within(f"dL/dx of nf4_matmul (x {x_dtype}, weight {tuple(shape)})", x.grad, expected, bound + 1e-30,
                       "dL/dx = dL/dy @ W, with W the (out, in) dequantized weight")


def _storages(*tensors: torch.Tensor | None) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def _tensors_in(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors_in(v)]
    return []


@case("nf4_matmul", "NF4Matmul",
      hint="keep only the NF4Tensor for backward (ctx.weight = weight): no ctx.save_for_backward of "
      "the dequantized weight or of x, no dense tensor stored on ctx; dequantize again in backward")
def nf4_matmul_keeps_no_dense_tensor_for_backward(impl):
    """Between forward and backward autograd holds no dequantized weight and no copy of ``x``: every tensor saved
    with ``save_for_backward`` (seen by ``saved_tensors_hooks``) or stored on ``ctx`` is the NF4 storage itself
    (or smaller than both the weight and ``x``). The weight is frozen, so ``x`` is not needed either."""
    layer = _linear(5)
    t, _ = _nf4(impl, layer.weight)
    t = dataclasses.replace(t, dtype=torch.bfloat16)
    x = torch.randn(4, 6, IN).to(torch.bfloat16).requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = _matmul_under_test(impl)(x, t, None)
    node = y.grad_fn
    on_ctx = [v for value in (vars(node).values() if hasattr(node, "__dict__") else ()) for v in _tensors_in(value)]
    allowed = _storages(t.packed, t.absmax, t.offset, t.absmax2)
    limit = min(OUT * IN, x.numel())
    for where, tensors in (("saved with ctx.save_for_backward", saved), ("stored as an attribute of ctx", on_ctx)):
        dense = [tuple(s.shape) for s in tensors
                 if s.untyped_storage().data_ptr() not in allowed and s.numel() >= limit]
        expect_true(not dense, f"nf4_matmul keeps dense tensors for backward ({where}): the weight is (out, in) = "
                    f"{(OUT, IN)}, x is {tuple(x.shape)}", "only the NF4Tensor's own bytes", dense,
                    "the point of the custom function: backward re-dequantizes from the 4-bit storage")
    y.backward(torch.ones_like(y))  # and backward still works with only that
    expect_true(x.grad is not None, "backward must still give dL/dx", "a tensor", None)


# ----------------------------------------------------------------------------------------------
# The re-implementation the nf4_matmul mistakes switch (with every switch off it passes the battery)


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mistake):
        w = qlora_edu.dequantize_nf4(weight)
        if mistake == "computes_in_float32":
            out = F.linear(x.float(), w.float(), None if bias is None else bias.float())
        else:
            w = w if mistake == "no_cast" else w.to(x.dtype)
            out = F.linear(x, w, None if mistake == "forgets_bias" else bias)
        ctx.mistake, ctx.weight = mistake, weight
        if mistake == "saves_the_weight":
            ctx.save_for_backward(w)
        elif mistake == "keeps_the_weight_on_ctx":
            ctx.dense = w
        elif mistake in ("saves_the_input", "returns_a_weight_gradient"):
            ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.mistake == "saves_the_weight":
            w = ctx.saved_tensors[0]
        elif ctx.mistake == "keeps_the_weight_on_ctx":
            w = ctx.dense
        else:
            w = qlora_edu.dequantize_nf4(ctx.weight)
        w = w.to(grad_out.dtype)
        grad_x = grad_out @ (w.T if ctx.mistake == "forgets_the_transpose" else w)
        grad_w = None
        if ctx.mistake in ("saves_the_input", "returns_a_weight_gradient"):
            (x,) = ctx.saved_tensors
            grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w if ctx.mistake == "returns_a_weight_gradient" else None, None, None


def _nf4_matmul(x, weight, bias=None, *, mistake=None):
    """The reference ``nf4_matmul`` (with its argument checks) and one switch per mistake."""
    check_nf4_matmul_args(x, weight, bias)
    return _Matmul.apply(x, weight, bias, mistake)


@mistake("nf4_matmul", caught_by=nf4_matmul_matches_float64_reference)
def nf4_matmul_no_cast(x, weight, bias=None):
    """Multiplies by the weight in its stored dtype (float32 weight, bf16 x: a dtype error)."""
    return _nf4_matmul(x, weight, bias, mistake="no_cast")


@mistake("nf4_matmul", caught_by=nf4_matmul_matches_float64_reference)
def nf4_matmul_computes_in_float32(x, weight, bias=None):
    """Computes in float32 and returns float32 whatever x's dtype."""
    return _nf4_matmul(x, weight, bias, mistake="computes_in_float32")


@mistake("nf4_matmul", caught_by=nf4_matmul_matches_float64_reference)
def nf4_matmul_forgets_bias(x, weight, bias=None):
    return _nf4_matmul(x, weight, bias, mistake="forgets_bias")


@mistake("nf4_matmul", caught_by=nf4_matmul_input_gradient)
def nf4_matmul_forgets_the_transpose(x, weight, bias=None):
    """Backward computes dL/dy W^T (the forward's weight orientation) instead of dL/dy W."""
    return _nf4_matmul(x, weight, bias, mistake="forgets_the_transpose")


@mistake("nf4_matmul", caught_by=nf4_matmul_input_gradient)
def nf4_matmul_returns_a_weight_gradient(x, weight, bias=None):
    """Backward returns dL/dW for the frozen NF4 weight (autograd refuses a gradient for a non-tensor input)."""
    return _nf4_matmul(x, weight, bias, mistake="returns_a_weight_gradient")


@mistake("nf4_matmul", caught_by=nf4_matmul_keeps_no_dense_tensor_for_backward)
def nf4_matmul_saves_the_weight(x, weight, bias=None):
    """ctx.save_for_backward(w): the dequantized weight stays alive until backward."""
    return _nf4_matmul(x, weight, bias, mistake="saves_the_weight")


@mistake("nf4_matmul", caught_by=nf4_matmul_keeps_no_dense_tensor_for_backward)
def nf4_matmul_keeps_the_weight_on_ctx(x, weight, bias=None):
    """ctx.dense = w: invisible to saved_tensors_hooks, but the same memory."""
    return _nf4_matmul(x, weight, bias, mistake="keeps_the_weight_on_ctx")


@mistake("nf4_matmul", caught_by=nf4_matmul_keeps_no_dense_tensor_for_backward)
def nf4_matmul_saves_the_input(x, weight, bias=None):
    """Saves x to compute a weight gradient that nobody uses (the weight is frozen)."""
    return _nf4_matmul(x, weight, bias, mistake="saves_the_input")


# ----------------------------------------------------------------------------------------------
# nf4_linear: the frozen path, and the whole QLoRA layer against peft + bitsandbytes


def _bnb_linear4bit(base: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    return qlora_edu.to_bnb_linear4bit(base, 64, True, compute_dtype).train()


@case("nf4_linear", hint="the matmul runs in compute_dtype whatever x's dtype (x, weight and bias all in it), "
      "and the result comes back in x's dtype",
      code_hint="nf4_matmul(x.to(compute_dtype), dataclasses.replace(weight, dtype=compute_dtype), "
      "bias.to(compute_dtype) if any).to(x.dtype)")
def nf4_linear_equals_bitsandbytes_linear4bit(impl):
    """Bit for bit bitsandbytes' ``Linear4bit`` (train mode) on the same bytes: x float32 or bf16, compute dtype
    bf16 / fp16 / fp32, with and without bias; the output in ``x``'s dtype."""
    g = torch.Generator().manual_seed(6)
    base = _linear(7)
    t, _ = _nf4(impl, base.weight)
    for compute_dtype, x_dtype, with_bias in ((torch.bfloat16, torch.float32, True),
                                              (torch.bfloat16, torch.bfloat16, False),
                                              (torch.float16, torch.float32, False),
                                              (torch.float32, torch.bfloat16, True)):
        layer = _bnb_linear4bit(base if with_bias else _without_bias(base), compute_dtype)
        x = torch.randn(2, 7, IN, generator=g).to(x_dtype)
        bias = base.bias.detach() if with_bias else None
        expect_equal(f"nf4_linear(x {x_dtype}, compute_dtype={compute_dtype}, bias={with_bias}) against "
                     "bitsandbytes' Linear4bit", impl.nf4_linear(x, t, bias, compute_dtype), layer(x))


def _without_bias(base: nn.Linear) -> nn.Linear:
    copy = nn.Linear(base.in_features, base.out_features, bias=False)
    with torch.no_grad():
        copy.weight.copy_(base.weight)
    return copy


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@case("nf4_linear", hint="QLoRA = your frozen path + chapter 6's adapter term: with float32 x both sides do the "
      "same operations, so output and every gradient must be the same bits")
def qlora_layer_equals_peft_on_bitsandbytes(impl):
    """``nf4_linear(x, W) + (alpha/r) B A x`` (the adapters float32, as peft keeps them) against peft's LoRA on a
    bitsandbytes ``Linear4bit`` with the same bytes and the same ``A``, ``B`` (train mode): output, ``dL/dx``,
    ``dL/dA``, ``dL/dB`` identical for float32 ``x``. (Nothing else can get a gradient: the NF4 storage is uint8
    and the bias frozen; what matters is that ``dL/dx`` is right, the layers below learn through it.)"""
    from peft import LoraConfig, get_peft_model

    r, alpha = 8, 16
    base = _linear(8)
    t, _ = _nf4(impl, base.weight)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["layer"])
    theirs = get_peft_model(_Holder(_bnb_linear4bit(base, torch.bfloat16)), config).base_model.model.layer.train()
    g = torch.Generator().manual_seed(9)
    a = (torch.randn(r, IN, generator=g) / IN**0.5).requires_grad_()
    b = (torch.randn(OUT, r, generator=g) * 0.1).requires_grad_()
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(a)
        theirs.lora_B["default"].weight.copy_(b)
    bias = base.bias.detach()

    x = torch.randn(3, 5, IN, generator=g).requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    grad_out = torch.randn(3, 5, OUT, generator=g)
    y = impl.nf4_linear(x, t, bias, torch.bfloat16)
    y = (y + F.linear(F.linear(x, a), b) * (alpha / r)).to(x.dtype)
    y_theirs = theirs(x_theirs)
    expect_equal("QLoRA output (your nf4_linear + the adapters) against peft + bitsandbytes", y, y_theirs)
    y.backward(grad_out)
    y_theirs.backward(grad_out)
    expect_true(x.grad is not None, "dL/dx must reach the input (the layers below need it)", "a tensor", None)
    expect_equal("dL/dx against peft + bitsandbytes", x.grad, x_theirs.grad)
    expect_equal("dL/dA against peft's", a.grad, theirs.lora_A["default"].weight.grad)
    expect_equal("dL/dB against peft's", b.grad, theirs.lora_B["default"].weight.grad)


def _nf4_linear(x, weight, bias=None, compute_dtype=torch.bfloat16, *, cast_back=True, cast_input=True,
                use_bias=True):
    """The reference ``nf4_linear`` (with its argument checks) and one switch per mistake."""
    check_nf4_linear_args(x, weight, bias, compute_dtype)
    cd = compute_dtype if cast_input else x.dtype
    b = None if bias is None or not use_bias else bias.to(cd)
    out = qlora_edu.nf4_matmul(x.to(cd), dataclasses.replace(weight, dtype=cd), b)
    return out.to(x.dtype) if cast_back else out


@mistake("nf4_linear", caught_by=nf4_linear_equals_bitsandbytes_linear4bit)
def nf4_linear_returns_compute_dtype(x, weight, bias=None, compute_dtype=torch.bfloat16):
    """Returns the bf16 result for a float32 x (the next layer gets another dtype than it sent)."""
    return _nf4_linear(x, weight, bias, compute_dtype, cast_back=False)


@mistake("nf4_linear", caught_by=nf4_linear_equals_bitsandbytes_linear4bit)
def nf4_linear_computes_in_input_dtype(x, weight, bias=None, compute_dtype=torch.bfloat16):
    """Ignores compute_dtype: a float32 x gets a float32 matmul (not what QLoRA / bitsandbytes compute)."""
    return _nf4_linear(x, weight, bias, compute_dtype, cast_input=False)


@mistake("nf4_linear", caught_by=nf4_linear_equals_bitsandbytes_linear4bit)
def nf4_linear_forgets_bias(x, weight, bias=None, compute_dtype=torch.bfloat16):
    return _nf4_linear(x, weight, bias, compute_dtype, use_bias=False)

