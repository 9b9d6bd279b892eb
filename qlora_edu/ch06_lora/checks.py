"""Battery for chapter 6: ``LoRALinear`` (the learner writes it), and the package's ``apply_lora`` and counts.

Expected values come from peft 0.21.2's own LoRA layer (``get_peft_model`` on a one-layer model, given the same
frozen weight and the same ``A`` and ``B``), from float64 arithmetic written out here (the merged weight
``W + (alpha / r) B A``), and from the calculus of ``y = W x + s B A x`` (at ``B = 0`` the gradient of ``A`` is
exactly zero); never from ``qlora_edu.ch06_lora.lora``.

The known mistakes are one independent LoRA layer, :class:`_Lora`, written here with switches; each mistake is
a subclass that turns one switch on (``tests/test_06_lora.py`` proves that with every switch off it passes).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.ch06_lora.guards import check_lora_forward_args, check_lora_linear_args
from qlora_edu.checks import (
    CheckFailure,
    bits,
    bnb_functional,
    case,
    expect_close,
    expect_equal,
    expect_raises,
    expect_true,
    mistake,
)

# Shapes with in != out (a transposed matrix cannot hide) and a scaling alpha / r = 2 that differs from
# alpha (16), r / alpha (0.5), 1 and alpha / sqrt(r) (5.66): each wrong scaling gives another output.
IN, OUT, R, ALPHA = 48, 40, 8, 16


# ----------------------------------------------------------------------------------------------
# peft's layer, the reference


class _Holder(nn.Module):
    """A one-layer model: peft's get_peft_model builds its LoRA layer here as it does in a real model."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _peft():
    """peft's ``LoraConfig`` and ``get_peft_model``; bitsandbytes (which peft imports) first, without its note
    about the optional ``kernels`` package."""
    bnb_functional()
    from peft import LoraConfig, get_peft_model

    return LoraConfig, get_peft_model


def _peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """peft's LoRA layer on a copy of ``base`` (adapters float32, its default); A and B as peft initializes."""
    LoraConfig, get_peft_model = _peft()

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["layer"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers/peft deprecation notes, not the learner's business
        return get_peft_model(_Holder(copy.deepcopy(base)), config).base_model.model.layer


def _peft_ab(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _base(in_f: int = IN, out_f: int = OUT, bias: bool = True, dtype: torch.dtype = torch.float32,
          seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def _adapters(impl, in_f: int = IN, out_f: int = OUT, r: int = R, alpha: float = ALPHA, dropout: float = 0.0,
              bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(yours, peft's): the same frozen layer, the same random non-zero A and B (B = 0 would hide every
    mistake on the adapter path)."""
    base = _base(in_f, out_f, bias, dtype, seed)
    theirs = _peft_layer(base, r, alpha, dropout)
    yours = impl.LoRALinear(copy.deepcopy(base), r, alpha, dropout)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
    b = torch.randn(out_f, r, generator=g) * 0.2
    _expect_adapter_shapes(yours, in_f, out_f, r)
    with torch.no_grad():
        for got, value in zip((yours.lora_A, yours.lora_B), (a, b), strict=True):
            got.copy_(value)
        for ref, value in zip(_peft_ab(theirs), (a, b), strict=True):
            ref.copy_(value)
    return yours, theirs


def _expect_adapter_shapes(layer, in_f: int, out_f: int, r: int) -> None:
    for name, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
        p = getattr(layer, name, None)
        expect_true(isinstance(p, nn.Parameter), f"layer.{name} should be an nn.Parameter (so that the optimizer "
                    "finds it in layer.parameters())", "nn.Parameter", type(p).__name__)
        expect_true(tuple(p.shape) == shape, f"layer.{name} has the wrong shape (in_features={in_f}, "
                    f"out_features={out_f}, r={r})", shape, tuple(p.shape),
                    "A maps the input down to r numbers: (r, in_features); B maps them up: (out_features, r)")


# ----------------------------------------------------------------------------------------------
# An independent LoRA layer with switches: the known mistakes


class _Lora(nn.Module):
    """LoRA written a second way (float64 merge, F.dropout, x @ A^T @ B^T); every switch off = correct."""

    init = "peft"  # "normal" | "kaiming_a0" | "b_random" | "both_zero"
    scale = "alpha/r"  # "alpha" | "none" | "alpha/sqrt(r)"
    dropout_at = "input"  # "both_paths" | "after_A" | "always" | "nowhere"
    cast_back = True
    add_in_float32 = True  # False: the update cast to the result's dtype before the sum
    a_transposed = False
    freeze_base = True
    freeze_all = False
    merge_how = "new"  # "in_place" | "no_scale" | "no_bias"
    guards = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        if self.guards:
            check_lora_linear_args(base, r, alpha, dropout, torch.float32)
        super().__init__()
        self.base = base.requires_grad_(False) if self.freeze_base else base
        self.in_features, self.out_features, self.r, self.p = base.in_features, base.out_features, r, dropout
        self.s = {"alpha/r": alpha / r, "alpha": alpha, "none": 1.0, "alpha/sqrt(r)": alpha / math.sqrt(r)}[self.scale]
        a_shape, b_shape = (r, self.in_features), (self.out_features, r)
        if self.a_transposed:
            a_shape, b_shape = b_shape[::-1], a_shape[::-1]
        self.lora_A = nn.Parameter(torch.zeros(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            if self.init in ("peft", "b_random"):
                self.lora_A.uniform_(-bound, bound)
            elif self.init == "normal":
                self.lora_A.normal_()
            elif self.init == "kaiming_a0":
                nn.init.kaiming_uniform_(self.lora_A)
            if self.init == "b_random":
                self.lora_B.uniform_(-bound, bound)
        if self.freeze_all:
            self.requires_grad_(False)

    def _a_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (r, in) and B as (out, r), whatever the storage."""
        if self.a_transposed:
            return self.lora_A.T, self.lora_B.T
        return self.lora_A, self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.guards:
            check_lora_forward_args(x, self.in_features)
        a, b = self._a_b()
        h = x.float()
        if self.dropout_at in ("input", "both_paths", "always"):
            h = F.dropout(h, self.p, self.training or self.dropout_at == "always")
        result = self.base(h.to(x.dtype) if self.dropout_at == "both_paths" else x)
        down = h @ a.T
        if self.dropout_at == "after_A":
            down = F.dropout(down, self.p, self.training)
        update = (down @ b.T) * self.s
        out = result + (update if self.add_in_float32 else update.to(result.dtype))
        return out.to(result.dtype) if self.cast_back else out

    def merge(self) -> nn.Linear:
        a, b = self._a_b()
        w = self.base.weight
        s = 1.0 if self.merge_how == "no_scale" else self.s
        delta = (b.detach().double() @ a.detach().double()) * s
        if self.merge_how == "in_place":
            with torch.no_grad():
                w.copy_(w.double() + delta)
            return self.base
        has_bias = self.base.bias is not None and self.merge_how != "no_bias"
        merged = nn.Linear(self.in_features, self.out_features, bias=has_bias, dtype=w.dtype)
        with torch.no_grad():
            merged.weight.copy_(w.double() + delta)
            if has_bias:
                merged.bias.copy_(self.base.bias)
        return merged


# ----------------------------------------------------------------------------------------------
# The layer's parts


@case("LoRALinear", hint="two trainable parameters: A maps in_features down to r, B maps r up to out_features "
      "(so B A has the base weight's shape), float32 on the base's device; the base frozen",
      code_hint="self.lora_A = nn.Parameter(torch.empty(r, in_features, ...)), self.lora_B = "
      "nn.Parameter(torch.empty(out_features, r, ...)); base.requires_grad_(False)")
def lora_linear_shapes_and_frozen_base(impl):
    base = _base()
    layer = impl.LoRALinear(base, R, ALPHA)
    _expect_adapter_shapes(layer, IN, OUT, R)
    expect_true(layer.base is base, "layer.base should be the nn.Linear you passed in (frozen, not copied)",
                "the same object", type(getattr(layer, "base", None)).__name__)
    for name in ("lora_A", "lora_B"):
        p = getattr(layer, name)
        expect_true(p.dtype == torch.float32, f"layer.{name} should be float32 (peft's default for the adapters)",
                    torch.float32, p.dtype)
        expect_true(p.requires_grad, f"layer.{name} should be trainable (requires_grad=True)", True, False)
    frozen = {n: p.requires_grad for n, p in base.named_parameters()}
    expect_true(not any(frozen.values()), "the base layer's weight and bias should be frozen (requires_grad=False)",
                "all False", frozen)
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    expect_true(trainable == ["lora_A", "lora_B"], "only the adapters should be trainable",
                ["lora_A", "lora_B"], trainable)


@mistake("LoRALinear", caught_by=lora_linear_shapes_and_frozen_base)
class ATransposed(_Lora):
    """A stored as (in, r) and B as (r, out), used as x @ A @ B: the same function, the wrong layout (peft's,
    and every saved adapter's, is A (r, in), B (out, r), as nn.Linear stores weights)."""

    a_transposed = True


@mistake("LoRALinear", caught_by=lora_linear_shapes_and_frozen_base)
class BaseNotFrozen(_Lora):
    """The base layer left trainable: the optimizer would update (and keep Adam states for) every weight."""

    freeze_base = False


@case("LoRALinear", hint="initialize as peft does: A random (uniform in +-1/sqrt(in_features)), B zero, so the "
      "layer starts as exactly the base layer and the gradients can still move both",
      code_hint="nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5)) and nn.init.zeros_(self.lora_B)")
def lora_linear_init_like_peft(impl):
    in_f, out_f, r = 512, 96, 64  # 32,768 draws of A: its range and spread are measured to well under 1%
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f)
    a_peft, b_peft = (t.detach() for t in _peft_ab(_peft_layer(base, r, 16)))
    torch.manual_seed(1)
    layer = impl.LoRALinear(copy.deepcopy(base), r, 16)
    _expect_adapter_shapes(layer, in_f, out_f, r)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    expect_equal("lora_B at initialization", b, b_peft,
                 "B starts at zero (peft: nn.init.zeros_), so that B A = 0 and training starts at the base model")
    expect_true(bool(a.abs().max() > 0), "lora_A at initialization should not be all zero: with A = 0 and B = 0 "
                "neither ever gets a gradient", "random values", "zeros")
    for what, got, expected in (("largest |A|", a.abs().max(), a_peft.abs().max()),
                                ("standard deviation of A", a.std(), a_peft.std())):
        expect_true(abs(got / expected - 1) < 0.03, f"lora_A at initialization: its {what} should match peft's "
                    "(kaiming_uniform_ with a = sqrt(5): uniform in +-1/sqrt(in_features))",
                    round(expected.item(), 5), round(got.item(), 5))
    expect_true(abs(a.mean().item()) < 0.05 * a_peft.std().item(), "lora_A at initialization should be centred "
                "on 0", 0.0, round(a.mean().item(), 5))
    x = torch.randn(4, in_f)
    with torch.no_grad():
        expect_equal("the output at initialization (it should be exactly the base layer's)", layer(x), base(x))


@mistake("LoRALinear", caught_by=lora_linear_init_like_peft)
class InitNormal(_Lora):
    """A drawn from N(0, 1): far too large (peft's option init_lora_weights='gaussian' uses std 1/r)."""

    init = "normal"


@mistake("LoRALinear", caught_by=lora_linear_init_like_peft)
class InitKaimingDefault(_Lora):
    """kaiming_uniform_ with its default a = 0: bound sqrt(6 / in), 2.45 times peft's 1 / sqrt(in)."""

    init = "kaiming_a0"


@mistake("LoRALinear", caught_by=lora_linear_init_like_peft)
class InitBRandom(_Lora):
    """B initialized like A: B A != 0, so the untrained layer no longer computes the base layer."""

    init = "b_random"


@mistake("LoRALinear", caught_by=lora_linear_init_like_peft)
class InitBothZero(_Lora):
    """A = 0 and B = 0: the output is right, but dL/dA = s B^T g x^T = 0 and dL/dB = s g (A x)^T = 0 forever."""

    init = "both_zero"


# ----------------------------------------------------------------------------------------------
# The forward


@case("LoRALinear", hint="forward = the frozen base layer + (alpha / r) B A x, the adapter path in the adapters' "
      "dtype (dropout on its input), the sum cast back to the base result's dtype once",
      code_hint="result = self.base(x); h = self.dropout(x.to(self.lora_A.dtype)); "
      "out = (result + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(result.dtype), "
      "with scaling = alpha / r")
def lora_linear_forward_matches_peft(impl):
    for bias in (True, False):
        yours, theirs = _adapters(impl, bias=bias)
        for shape in ((5, IN), (2, 3, IN), (IN,)):
            x = torch.randn(shape)
            with torch.no_grad():
                got, expected = yours(x), theirs(x)
            expect_true(got.dtype == torch.float32, "the output of a float32 layer should be float32",
                        torch.float32, got.dtype)
            expect_close(f"the output for x of shape {shape} (bias={bias}), against peft's LoRA layer with the same "
                         "W, A and B", got, expected, atol=1e-5, rtol=1e-5)
    # bf16 layer and input: the adapter path in float32 (the adapters' dtype), the sum in float32 too, rounded
    # back to bf16 once: peft's bits, exactly
    yours, theirs = _adapters(impl, dtype=torch.bfloat16)
    x = torch.randn(128, IN).bfloat16()
    with torch.no_grad():
        got, expected = yours(x), theirs(x)
    expect_true(got.dtype == torch.bfloat16, "the output for a bfloat16 x should be bfloat16 (the input's dtype, as "
                "peft returns it)", torch.bfloat16, got.dtype,
                "cast x to the adapters' dtype for the adapter path, and the sum back to result.dtype")
    expect_equal("the output of a bfloat16 layer against peft's, bit for bit", bits(got), bits(expected),
                 hint="add the float32 update to the bfloat16 result in float32 (result + update promotes), then "
                 "cast the sum to result.dtype once, as peft does; casting the update to bfloat16 first rounds "
                 "twice")


@mistake("LoRALinear", caught_by=lora_linear_forward_matches_peft)
class ScalesByAlpha(_Lora):
    """The update multiplied by alpha instead of alpha / r."""

    scale = "alpha"


@mistake("LoRALinear", caught_by=lora_linear_forward_matches_peft)
class NoScaling(_Lora):
    """The update not scaled at all (as the seed note's formula W x + B A x reads)."""

    scale = "none"


@mistake("LoRALinear", caught_by=lora_linear_forward_matches_peft)
class ScalesBySqrtR(_Lora):
    """rsLoRA's alpha / sqrt(r): a real option in peft (use_rslora=True), not its default."""

    scale = "alpha/sqrt(r)"


@mistake("LoRALinear", caught_by=lora_linear_forward_matches_peft, shows="rounds twice")
class AddsInBfloat16(_Lora):
    """``out = result + update.to(result.dtype)``: the update rounded to bf16, then the sum rounded again
    (peft adds in float32 and rounds once); within bf16 rounding, but not peft's bits."""

    add_in_float32 = False


@mistake("LoRALinear", caught_by=lora_linear_forward_matches_peft)
class ReturnsFloat32(_Lora):
    """The float32 sum returned as is: a bf16 model would get float32 activations from every adapted layer."""

    cast_back = False


@case("LoRALinear", hint="dropout applies to the adapter path's input only: self.base(x) + s * B A dropout(x); "
      "use the nn.Dropout module (self.dropout), which is off in eval mode")
def lora_linear_dropout_on_adapter_input(impl):
    p = 0.5
    # at initialization (B = 0) the output is the base layer's, in train mode too: the base path is never dropped
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    fresh = impl.LoRALinear(copy.deepcopy(base), R, ALPHA, p).train()
    x = torch.randn(7, IN)
    with torch.no_grad():
        expect_close("the output in train mode at initialization (B = 0), against the base layer: dropout must not "
                     "touch the base path", fresh(x), base(x), atol=1e-6, rtol=1e-6)
    yours, theirs = _adapters(impl, dropout=p)
    yours.train(), theirs.train()
    with torch.no_grad():
        torch.manual_seed(123)
        got = yours(x)
        torch.manual_seed(123)
        expected = theirs(x)
        torch.manual_seed(124)
        other = yours(x)
    expect_close("the output in train mode with dropout p = 0.5, against peft's under the same random seed (the same "
                 "mask on the adapter path's input)", got, expected, atol=1e-5, rtol=1e-5)
    expect_true(not torch.equal(got, other), "in train mode, dropout p = 0.5 should change the output from one seed "
                "to the next", "different outputs", "the same output")
    yours.eval(), theirs.eval()
    with torch.no_grad():
        expect_close("the output in eval mode (no dropout), against peft's", yours(x), theirs(x), atol=1e-5,
                     rtol=1e-5)


@mistake("LoRALinear", caught_by=lora_linear_dropout_on_adapter_input)
class DropoutOnBothPaths(_Lora):
    """dropout(x) fed to the base layer too: the frozen model itself would be dropped out."""

    dropout_at = "both_paths"


@mistake("LoRALinear", caught_by=lora_linear_dropout_on_adapter_input)
class DropoutAfterA(_Lora):
    """Dropout on A x (r numbers) instead of on x."""

    dropout_at = "after_A"


@mistake("LoRALinear", caught_by=lora_linear_dropout_on_adapter_input)
class DropoutInEvalToo(_Lora):
    """F.dropout(x, p, training=True): dropout stays on at evaluation and generation."""

    dropout_at = "always"


@mistake("LoRALinear", caught_by=lora_linear_dropout_on_adapter_input)
class DropoutIgnored(_Lora):
    """The dropout argument stored but never applied."""

    dropout_at = "nowhere"


# ----------------------------------------------------------------------------------------------
# Training


@case("LoRALinear", hint="the gradients reach A, B and x only: keep the base frozen and the adapters "
      "nn.Parameters with requires_grad=True")
def lora_linear_gradients_match_peft(impl):
    yours, theirs = _adapters(impl)
    x = torch.randn(6, IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    yours(x).square().sum().backward()
    theirs(x_ref).square().sum().backward()
    expect_true(yours.lora_A.grad is not None and yours.lora_B.grad is not None,
                "after backward, lora_A.grad and lora_B.grad should hold gradients", "tensors",
                (type(yours.lora_A.grad).__name__, type(yours.lora_B.grad).__name__))
    a_ref, b_ref = _peft_ab(theirs)
    expect_close("dL/dA against peft's", yours.lora_A.grad, a_ref.grad, atol=1e-4, rtol=1e-5)
    expect_close("dL/dB against peft's", yours.lora_B.grad, b_ref.grad, atol=1e-4, rtol=1e-5)
    expect_close("dL/dx against peft's", x.grad, x_ref.grad, atol=1e-4, rtol=1e-5)
    expect_true(yours.base.weight.grad is None, "the frozen base weight should get no gradient", None,
                "a gradient")
    # at initialization B = 0: dL/dA = s B^T g x^T is exactly zero, dL/dB = s g (A x)^T is not
    torch.manual_seed(0)
    fresh = impl.LoRALinear(nn.Linear(IN, OUT), R, ALPHA)
    fresh(torch.randn(5, IN)).square().sum().backward()
    expect_true(fresh.lora_A.grad is not None and not bool(fresh.lora_A.grad.any()),
                "at initialization (B = 0) the gradient of A should be exactly zero", "all zeros",
                fresh.lora_A.grad)
    expect_true(fresh.lora_B.grad is not None and bool(fresh.lora_B.grad.any()),
                "at initialization the gradient of B should not be zero (it is s g (A x)^T)", "non-zero",
                fresh.lora_B.grad)


@mistake("LoRALinear", caught_by=lora_linear_gradients_match_peft)
class FreezesTheAdaptersToo(_Lora):
    """self.requires_grad_(False) at the end of __init__: the whole layer frozen, adapters included."""

    freeze_all = True


# ----------------------------------------------------------------------------------------------
# Merging


@case("LoRALinear", hint="merge returns a NEW layer whose weight is W + (alpha / r) B A, summed in float32 and "
      "rounded once to W's dtype, with the base's bias; self.base stays as it was",
      code_hint="merged = torch.nn.utils.skip_init(nn.Linear, in, out, bias=..., dtype=W.dtype); under "
      "torch.no_grad(): merged.weight.copy_(W.float() + (B.float() @ A.float()) * self.scaling)")
def lora_linear_merge_is_a_new_exact_layer(impl):
    for bias, dtype in ((True, torch.float32), (False, torch.float32), (True, torch.bfloat16)):
        yours, _ = _adapters(impl, bias=bias, dtype=dtype)
        yours.eval()
        w_before = yours.base.weight.detach().clone()
        x = torch.randn(5, IN).to(dtype)
        with torch.no_grad():
            y_before = yours(x)
            merged = yours.merge()
        expect_true(isinstance(merged, nn.Linear), "merge() should return an nn.Linear", "nn.Linear",
                    type(merged).__name__)
        expect_true(merged is not yours.base and merged.weight.data_ptr() != yours.base.weight.data_ptr(),
                    "merge() should return a new layer with its own weight, not the base layer",
                    "a new nn.Linear", "the base layer (or its weight)")
        expect_equal("the base weight after merge() (it must not change)", yours.base.weight.detach(), w_before,
                     "build a new layer; do not add B A into self.base.weight")
        # the reference: W + (alpha / r) B A in float64, rounded once to W's dtype
        a, b = yours.lora_A.detach().double(), yours.lora_B.detach().double()
        reference = w_before.double() + (b @ a) * (ALPHA / R)
        expect_true(merged.weight.dtype == dtype, "the merged weight should keep the base weight's dtype", dtype,
                    merged.weight.dtype)
        tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-6, rtol=2**-8)
        expect_close(f"the merged weight ({dtype}) against W + (alpha / r) B A in float64", merged.weight.detach(),
                     reference, **tol)
        if bias:
            expect_true(merged.bias is not None, "the merged layer should keep the base layer's bias", "a bias",
                        None)
            expect_equal("the merged bias", merged.bias.detach(), yours.base.bias.detach())
        else:
            expect_true(merged.bias is None, "a base without bias should merge into a layer without bias", None,
                        "a bias")
        with torch.no_grad():
            expect_equal("the LoRA layer's output after merge() (merging must not change it)", yours(x), y_before)
            if dtype == torch.float32:
                expect_close("the merged layer's output against the LoRA layer's", merged(x), y_before, atol=1e-5,
                             rtol=1e-5)


@mistake("LoRALinear", caught_by=lora_linear_merge_is_a_new_exact_layer)
class MergesInPlace(_Lora):
    """B A added into self.base.weight, which is returned: the adapters now count twice in the LoRA layer."""

    merge_how = "in_place"


@mistake("LoRALinear", caught_by=lora_linear_merge_is_a_new_exact_layer)
class MergesWithoutScaling(_Lora):
    """W + B A: the forward scales the update by alpha / r, the merge forgets it."""

    merge_how = "no_scale"


@mistake("LoRALinear", caught_by=lora_linear_merge_is_a_new_exact_layer)
class MergeDropsBias(_Lora):
    """nn.Linear(in, out, bias=False) whatever the base had."""

    merge_how = "no_bias"


# ----------------------------------------------------------------------------------------------
# Bad input


@case("LoRALinear", hint="keep the given first lines: check_lora_linear_args(...) in __init__, "
      "check_lora_forward_args(x, self.in_features) in forward")
def lora_linear_rejects_bad_arguments(impl):
    lin = nn.Linear(8, 4)
    expect_raises("LoRALinear(a Conv1d, ...)", TypeError, lambda: impl.LoRALinear(nn.Conv1d(8, 4, 1), 2, 4), "base")
    expect_raises("LoRALinear(..., r=0, ...)", ValueError, lambda: impl.LoRALinear(lin, 0, 4), "r must be")
    expect_raises("LoRALinear(..., alpha=-1)", ValueError, lambda: impl.LoRALinear(lin, 2, -1), "alpha")
    expect_raises("LoRALinear(..., dropout=1.0)", ValueError, lambda: impl.LoRALinear(lin, 2, 4, 1.0), "dropout")
    layer = impl.LoRALinear(nn.Linear(8, 4), 2, 4)
    expect_raises("a LoRALinear(in_features=8) called on x of shape (3, 5)", ValueError,
                  lambda: layer(torch.randn(3, 5)), "in_features")


@mistake("LoRALinear", caught_by=lora_linear_rejects_bad_arguments)
class NoArgumentChecks(_Lora):
    """The guard lines deleted: r = 0 fails later with a ZeroDivisionError that names nothing."""

    guards = False


# ----------------------------------------------------------------------------------------------
# The package's whole-model functions (not exercises)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@case("apply_lora", "lora_parameters", "count_parameters", hint="every selected nn.Linear becomes a LoRALinear, "
      "everything else frozen; counts as peft's get_nb_trainable_parameters")
def apply_lora_matches_get_peft_model(impl):
    LoraConfig, get_peft_model = _peft()

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = _tiny_llama()
    ours = impl.apply_lora(copy.deepcopy(model), names, 4, 8, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=names))
    g = torch.Generator().manual_seed(0)
    adapted = 0
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
                adapted += 1
                a_ref, b_ref = _peft_ab(module)
                a_ref.copy_(torch.randn(a_ref.shape, generator=g) * 0.1)
                b_ref.copy_(torch.randn(b_ref.shape, generator=g) * 0.1)
                mine = ours.get_submodule(name)
                mine.lora_A.copy_(a_ref)
                mine.lora_B.copy_(b_ref)
    expect_true(adapted == 14, "peft adapts 7 projections in each of 2 layers", 14, adapted)
    tokens = torch.randint(128, (2, 10), generator=g)
    with torch.no_grad():
        expect_close("the logits of apply_lora's model against get_peft_model's, same adapters",
                     ours(tokens).logits, theirs(tokens).logits, atol=1e-5, rtol=1e-5)
    expected = theirs.get_nb_trainable_parameters()
    expect_true(tuple(impl.count_parameters(ours)) == tuple(expected),
                "count_parameters (trainable, total) against peft's get_nb_trainable_parameters", expected,
                impl.count_parameters(ours))
    trainable = {id(p) for p in ours.parameters() if p.requires_grad}
    expect_true(trainable == {id(p) for p in impl.lora_parameters(ours)},
                "only the adapters (lora_parameters) should be trainable after apply_lora",
                len(impl.lora_parameters(ours)), len(trainable))


@mistake("apply_lora", caught_by=apply_lora_matches_get_peft_model)
def apply_lora_keeps_the_rest_trainable(model, target_modules, r, alpha, dropout=0.0):
    """The projections swapped, but the embeddings, norms and everything else left trainable."""
    import qlora_edu

    for name, linear in qlora_edu.find_target_linears(model, target_modules):
        model.set_submodule(name, qlora_edu.LoRALinear(linear, r, alpha, dropout))
    return model


@case("lora_param_count", "base_param_count", "trainable_percent", hint="per adapted (in, out) projection "
      "r * (in + out), times the number of layers; the total adds the model's own parameters")
def lora_param_count_matches_peft(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    # the course model's shape (SmolLM2-135M): grouped-query attention, k and v are 576 -> 192
    LoraConfig, get_peft_model = _peft()
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
    for r, names in ((8, ["q_proj", "v_proj"]), (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])):
        with torch.device("meta"), warnings.catch_warnings():  # shapes only
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, target_modules=names))
        trainable, total = peft_model.get_nb_trainable_parameters()
        expect_true(impl.lora_param_count(config, r, names) == trainable,
                    f"lora_param_count(course model, r={r}, {names}) against peft", trainable,
                    impl.lora_param_count(config, r, names))
        expect_true(impl.base_param_count(config) + trainable == total,
                    "base_param_count + lora_param_count against peft's total", total,
                    impl.base_param_count(config) + trainable)
        percent = impl.trainable_percent(config, r, names)
        if not math.isclose(percent, 100 * trainable / total, rel_tol=1e-9):
            raise CheckFailure(f"trainable_percent(course model, r={r}) against peft's trainable%",
                               100 * trainable / total, percent)


@mistake("lora_param_count", caught_by=lora_param_count_matches_peft)
def lora_param_count_square_projections(config_or_shape, r, target_modules=("q_proj", "v_proj")):
    """Every projection taken as hidden x hidden: wrong for the MLP and for grouped-query k and v."""
    import qlora_edu

    n_layers, _, _ = qlora_edu.llama_linear_shapes(config_or_shape)
    return n_layers * len(set(target_modules)) * r * 2 * config_or_shape.hidden_size
