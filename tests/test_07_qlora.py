"""Chapter 7: QLoRA from scratch against the real thing, bitsandbytes 0.50.2's Linear4bit under peft 0.21.2's LoRA.

Both sides are built from the same weight: bitsandbytes quantizes it itself (Params4bit), we with quantize_nf4,
and the first test checks that the bytes agree. Then:

* the frozen path (NF4Linear) is bit for bit ``F.linear(x, dequantize_4bit(...))`` in the compute dtype, and
  bitsandbytes' Linear4bit in train mode;
* the whole layer equals peft's LoRA on Linear4bit exactly for float32 inputs; for bf16 inputs within one bf16
  rounding of the output and of the LoRA term (peft rounds the LoRA term to bf16 before adding it, we add in
  float32 and round once, as peft's plain Linear does);
* gradients (input, A, B) and whole training runs agree;
* autograd keeps no dequantized weight for backward (saved-tensor hooks).

bitsandbytes is compared in train mode: in eval mode under no_grad on AVX512-BF16 CPUs it repacks the weight for
a bf16 kernel that approximates the constants. All shapes are whole 64-blocks per row (bitsandbytes 0.50.2
dequantizes some other multi-row shapes wrongly on AVX512 CPUs).
"""

from __future__ import annotations

import copy
import importlib
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from chapter_battery import battery_tests, control_passes
from torch import nn

from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4, quantize_nf4
from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.ch06_lora.lora import LLAMA_TARGETS, LoRALinear, count_parameters, lora_parameters
from qlora_edu.ch07_qlora.qlora import NF4Linear, QLoRALinear, apply_qlora, nf4_linear, nf4_matmul, trace_flow
from qlora_edu.ch07_qlora.tools import SavedTensorLog, compare_training, copy_adapters_to_peft, tiny_llama_config
from qlora_edu.common.training_setup import apply_bnb_4bit, make_optimizer, setup_training, to_bnb_linear4bit

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # no warning about the optional `kernels` package
bnbf = pytest.importorskip("bitsandbytes.functional")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("07_qlora")
checks = importlib.import_module("qlora_edu.ch07_qlora.checks")

# transformers 5.2x renamed gradient checkpointing to activation checkpointing; peft (and we, to run on every 5.x)
# still call the old names, which warn
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")]

IN, OUT, R, ALPHA = 128, 192, 8, 16


@pytest.mark.parametrize("name", ["nf4_matmul", "nf4_linear"])
def test_the_mistakes_pass_with_every_switch_off(name):
    """The control: the re-implementations the mistakes are built from pass the battery with no mistake on."""
    fn = {
        "nf4_matmul": lambda x, weight, bias=None: checks._nf4_matmul(x, weight, bias),
        "nf4_linear": lambda x, weight, bias=None, compute_dtype=torch.bfloat16: checks._nf4_linear(
            x, weight, bias, compute_dtype),
    }[name]
    assert control_passes(name, fn)


#: bf16 keeps 8 significant bits: rounding to bf16 moves a value by at most 2**-8 of its magnitude
BF16_HALF_ULP = 2.0**-8


class Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def linear(in_f=IN, out_f=OUT, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def random_adapters(layer: LoRALinear, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / math.sqrt(layer.in_features))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def pair(bias=True, dtype=torch.float32, compute_dtype=torch.bfloat16, dropout=0.0, seed=0):
    """Our QLoRALinear and peft's LoRA on a bitsandbytes Linear4bit, from one weight, with the same A and B."""
    base = linear(bias=bias, dtype=dtype, seed=seed)
    ours = QLoRALinear.from_linear(base, R, ALPHA, dropout, compute_dtype=compute_dtype)
    random_adapters(ours, seed + 1)
    bnb_layer = to_bnb_linear4bit(base, compute_dtype=compute_dtype)
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["layer"])
    theirs = get_peft_model(Holder(bnb_layer), config).base_model.model.layer
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    return ours.train(), theirs.train()


# ----------------------------------------------------------------------------------------------
# Same bytes, same frozen path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(192, 128), (64, 1536), (1536, 576)])
def test_same_bytes_as_bitsandbytes(dtype, shape):
    base = linear(shape[1], shape[0], dtype=dtype)
    ours = NF4Linear.from_linear(base).nf4_weight
    state = to_bnb_linear4bit(base).weight
    qs = state.quant_state
    assert torch.equal(ours.packed.view(-1), state.data.view(-1))
    assert torch.equal(ours.absmax, qs.absmax) and qs.absmax.dtype == torch.uint8  # the 8-bit constants
    assert torch.equal(ours.offset, qs.offset)
    assert torch.equal(ours.absmax2, qs.state2.absmax)
    assert ours.dtype == dtype and tuple(ours.shape) == shape


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_frozen_path_bit_identical(compute_dtype, x_dtype, bias):
    base = linear(bias=bias)
    ours = NF4Linear.from_linear(base, compute_dtype=compute_dtype)
    bnb_layer = to_bnb_linear4bit(base, compute_dtype=compute_dtype).train()
    x = torch.randn(2, 9, IN).to(x_dtype)
    qs = bnb_layer.weight.quant_state
    w = bnbf.dequantize_4bit(bnb_layer.weight.data, qs).to(compute_dtype)  # bitsandbytes' own dequantization
    b = None if base.bias is None else base.bias.detach().to(compute_dtype)
    expected = F.linear(x.to(compute_dtype), w, b).to(x_dtype)
    y = ours(x)
    assert y.dtype == x_dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(y, bnb_layer(x), rtol=0, atol=0)


def test_without_double_quantization():
    """double_quant=False: float32 absmax, no offset / absmax2; still bitsandbytes' bytes and outputs."""
    base = linear()
    ours = NF4Linear.from_linear(base, double_quant=False)
    bnb_layer = to_bnb_linear4bit(base, double_quant=False).train()
    assert ours.offset is None and ours.absmax2 is None and ours.absmax.dtype == torch.float32
    assert torch.equal(ours.packed.view(-1), bnb_layer.weight.data.view(-1))
    assert torch.equal(ours.absmax, bnb_layer.weight.quant_state.absmax)
    x = torch.randn(3, IN)
    torch.testing.assert_close(ours(x), bnb_layer(x), rtol=0, atol=0)
    ours.to(torch.float16)  # the float32 constants must not be cast (the bias is, as any parameter)
    assert ours.absmax.dtype == torch.float32 and ours.bias.dtype == torch.float16


def test_dequantize_straight_to_compute_dtype_is_the_same():
    """NF4Linear dequantizes into the compute dtype directly; casting the float32 weight gives the same bits."""
    t = quantize_nf4(linear().weight.detach())
    direct = dequantize_nf4(NF4Tensor(t.packed, t.absmax, t.shape, torch.bfloat16, t.blocksize, t.double_quant,
                                      t.offset, t.absmax2, t.blocksize2))
    assert torch.equal(direct, dequantize_nf4(t).to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# The whole layer against peft + bitsandbytes


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_equals_peft_bnb_fp32_input(bias):
    """float32 input: peft adds an float32 LoRA term to the float32 base output, as we do: the same bits."""
    ours, theirs = pair(bias=bias)
    x = torch.randn(3, 11, IN)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_layer_equals_peft_bnb_bf16_input_within_one_rounding():
    """bf16 input: the base output is bf16 either way (bit-identical), u = s B A x is float32. peft rounds u to bf16
    and then rounds the sum, round(r + round(u)); we round once, round(r + u). Each rounding moves a value by at
    most 2**-8 of its magnitude, so |ours - peft| <= 2**-8 (|ours| + |u| + |peft|) (plus a float32 hair)."""
    ours, theirs = pair(dtype=torch.bfloat16)
    x = torch.randn(4, 16, IN).to(torch.bfloat16)
    y_ours, y_theirs = ours(x).float(), theirs(x).float()
    u = F.linear(F.linear(x.float(), ours.lora_A), ours.lora_B) * ours.scaling
    bound = BF16_HALF_ULP * (y_ours.abs() + u.abs() + y_theirs.abs()) + 1e-6
    assert bool(((y_ours - y_theirs).abs() <= bound).all())
    same = (y_ours == y_theirs).float().mean().item()
    assert same > 0.5, f"only {same:.0%} of outputs identical: more than the double rounding"
    assert not torch.equal(y_ours, theirs.base_layer(x).float()), "the LoRA term must matter in this test"


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_gradients_reach_input_and_adapters_only(x_dtype):
    ours, theirs = pair(dtype=x_dtype)
    x = torch.randn(5, IN).to(x_dtype).requires_grad_()
    x_theirs = x.detach().clone().requires_grad_()
    g = torch.randn(5, OUT).to(x_dtype)
    (ours(x).float() * g).sum().backward()
    (theirs(x_theirs).float() * g).sum().backward()
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert ours.base.bias.grad is None
    assert all(not t.requires_grad for t in ours.base.buffers())
    if x_dtype == torch.float32:  # the same operations: the same bits
        for a, b in ((x.grad, x_theirs.grad), (ours.lora_A.grad, theirs.lora_A["default"].weight.grad),
                     (ours.lora_B.grad, theirs.lora_B["default"].weight.grad)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:  # peft's bf16 rounding of the LoRA term changes the upstream gradient of nothing but its dtype path
        torch.testing.assert_close(x.grad.float(), x_theirs.grad.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, rtol=2e-2, atol=1e-3)


def test_input_gradient_is_through_the_dequantized_weight():
    """dL/dx of the 4-bit matmul equals autograd's through F.linear with the dequantized weight (float32 compute)."""
    base = linear()
    t = quantize_nf4(base.weight.detach())
    x = torch.randn(7, IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(7, OUT)
    (nf4_matmul(x, t) * g).sum().backward()
    (F.linear(x_ref, dequantize_nf4(t)) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_dropout_same_mask_as_peft():
    ours, theirs = pair(dropout=0.25)
    x = torch.randn(6, IN)
    torch.manual_seed(7)
    y = ours(x)
    torch.manual_seed(7)
    torch.testing.assert_close(y, theirs(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Memory: no dequantized weight kept for backward


def test_no_weight_sized_tensor_saved_for_backward():
    ours, theirs = pair()
    x = torch.randn(3, 5, IN, requires_grad=True)
    with SavedTensorLog(exclude=ours) as log:
        y = ours(x)
    assert log.records, "the adapters' inputs must be saved (A x and x), or the hooks saw nothing"
    assert all(math.prod(shape) != OUT * IN for shape, _, _ in log.records), log.records
    with SavedTensorLog(exclude=theirs) as log_theirs:
        theirs(x)
    assert log.peak_bytes <= log_theirs.peak_bytes
    y.sum().backward()  # the saved tensors are released after backward
    assert log.live_bytes == 0

    # the log does see a dequantized weight when a naive layer keeps one: the check above can fail
    weight = dequantize_nf4(ours.base.nf4_weight).to(torch.bfloat16)
    with SavedTensorLog() as naive:
        F.linear(x.to(torch.bfloat16), weight)
    assert any(math.prod(shape) == OUT * IN for shape, _, _ in naive.records)  # W^T, (IN, OUT), for dL/dx


# ----------------------------------------------------------------------------------------------
# Whole models


def tiny_pair(targets=LLAMA_TARGETS, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    ours = apply_qlora(copy.deepcopy(model), targets, R, ALPHA)
    theirs = apply_bnb_4bit(copy.deepcopy(model), targets)
    theirs = get_peft_model(theirs, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets)))
    for i, layer in enumerate(m for m in ours.modules() if isinstance(m, QLoRALinear)):
        random_adapters(layer, i)
    assert copy_adapters_to_peft(ours, theirs) == 2 * len(targets)
    return model, ours.train(), theirs.train()


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), LLAMA_TARGETS], ids=["qv", "all"])
def test_apply_qlora_equals_peft_bnb(targets):
    model, ours, theirs = tiny_pair(targets)
    assert sum(isinstance(m, QLoRALinear) for m in ours.modules()) == 2 * len(targets)
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(tokens).logits
        torch.testing.assert_close(logits, theirs(tokens).logits, rtol=0, atol=0)
    # counts as peft prints them (peft counts bitsandbytes' 4-bit weights at two a byte, we count ours likewise)
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert {p for p in ours.parameters() if p.requires_grad} == set(lora_parameters(ours))
    assert all(p.dtype == torch.float32 for p in lora_parameters(ours))


def test_apply_qlora_frees_the_dense_weights():
    """Each replaced linear's full-precision weight is freed at once (nothing keeps the old layer alive)."""
    import gc
    import weakref

    model = LlamaForCausalLM(tiny_llama_config())
    dense = [weakref.ref(m.weight) for name, m in model.named_modules() if name.endswith(("q_proj", "up_proj"))]
    apply_qlora(model, ["q_proj", "up_proj"], R, ALPHA)
    gc.collect()
    assert len(dense) == 4 and all(ref() is None for ref in dense)


def test_training_curves_agree():
    """30 AdamW steps, same weights, same adapters, same batch (2 x 16 tokens): the loss curves are the same.

    Every operation is the same on both sides in the same order (float32 residual stream: peft adds the float32
    LoRA term without rounding), so the curves are expected bit-identical; the test allows 1e-5 relative (a
    different but equally correct summation order in a CPU kernel would show up as ~1e-7).
    """
    result = compare_training(30, batch=2, seq=16)
    assert len(result.ours) == len(result.peft) == 30
    assert result.trainable[0] == result.trainable[1]
    for a, b in zip(result.ours, result.peft, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert result.ours[-1] < result.ours[0] - 0.5, "the adapters must learn the batch"


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "qlora_scratch"])
def test_one_model_set_up_gives_each_recipe(method):
    """qlora_edu.common.training_setup.setup_training, the course's one set-up, on a dense random Llama: what trains,
    what is stored in 4 bits, and adapters that are a pure function of the seed (the caller's generator untouched)."""
    import bitsandbytes as bnb
    from transformers import LlamaForCausalLM

    def build(seed):
        torch.manual_seed(123)  # the random model's weights
        model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
        state = torch.get_rng_state()
        model = setup_training(model, method, r=4, alpha=8, dropout=0.0, seed=seed, gradient_checkpointing=False)
        assert torch.equal(torch.get_rng_state(), state)  # seeded on a fork of the generator
        return model, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model, adapters = build(seed=0)
    n_linears = 7 * tiny_llama_config().num_hidden_layers
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    n_ours = sum(isinstance(m, QLoRALinear) for m in model.modules())
    assert (n_4bit, n_ours) == {"qlora": (n_linears, 0), "qlora_scratch": (0, n_linears)}.get(method, (0, 0))
    if method == "full":
        assert len(adapters) == len(list(model.parameters()))
        return
    assert len(adapters) == 2 * n_linears and all("lora_" in n for n in adapters)
    if method != "lora":  # prepare_model_for_kbit_training (or the scratch path's copy of it): no 16-bit weight left
        assert not any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    same, other = build(seed=0)[1], build(seed=1)[1]
    assert all(torch.equal(adapters[n], same[n]) for n in adapters)
    assert any(not torch.equal(adapters[n], other[n]) for n in adapters if "lora_A" in n)


def test_one_model_set_up_rejects_bad_arguments():
    """The set-up's guards name the argument (TypeError for a wrong type, ValueError for a wrong value)."""
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="method"):
        setup_training(model, "qlora4")
    with pytest.raises(ValueError, match="targets"):
        setup_training(model, "lora", targets=("q_proj", "w_proj"))
    with pytest.raises(TypeError, match="targets"):
        setup_training(model, "lora", targets="q_proj")
    with pytest.raises(ValueError, match="dropout"):
        setup_training(model, "lora", dropout=1.0)
    with pytest.raises(TypeError, match="model"):
        setup_training("model", "full")
    with pytest.raises(ValueError, match="name"):
        make_optimizer([nn.Parameter(torch.zeros(2))], "adam")
    with pytest.raises(ValueError, match="lr"):
        make_optimizer([nn.Parameter(torch.zeros(2))], "adamw", lr=0.0)
    with pytest.raises(TypeError, match="params"):
        make_optimizer(torch.zeros(2), "adamw")
    with pytest.raises(TypeError, match="base"):
        to_bnb_linear4bit(model)


def test_trace_flow_rows_are_the_real_tensors():
    ours, _ = pair()
    x = torch.randn(2, 4, IN)
    rows = trace_flow(ours, x)
    steps = {row.step: row for row in rows}
    stored = [row for row in rows if row.step.startswith("stored")]
    assert sum(row.bytes for row in stored) == ours.base.nf4_weight.nbytes
    assert all(row.dtype in (torch.uint8, torch.float32) for row in stored)
    dequantized = next(row for row in rows if row.step.startswith("dequantized W"))
    assert (dequantized.dtype, dequantized.shape, dequantized.bytes) == (torch.bfloat16, (OUT, IN), OUT * IN * 2)
    trainable = [row for row in rows if "trainable" in row.step]
    assert [(r.dtype, r.shape) for r in trainable] == [(torch.float32, (R, IN)), (torch.float32, (OUT, R))]
    assert rows[-1].shape == (2, 4, OUT) and rows[-1].dtype == torch.float32
    assert steps["x cast to the compute dtype"].dtype == torch.bfloat16
    assert ours.training  # trace_flow restores the mode


def test_module_moves_keep_the_storage_dtypes():
    ours, _ = pair()
    dtypes = {name: t.dtype for name, t in ours.base.named_buffers()}
    ours.to(torch.float16)
    assert {name: t.dtype for name, t in ours.base.named_buffers()} == dtypes
    assert ours.lora_A.dtype == torch.float16  # the adapters follow, as any parameter does
    state = ours.state_dict()
    assert {"base.packed", "base.absmax", "base.offset", "base.absmax2"} <= set(state)


def test_merge_equals_forward_in_float32_compute():
    base = linear()
    layer = QLoRALinear.from_linear(base, R, ALPHA, compute_dtype=torch.float32)
    random_adapters(layer, 3)
    merged = layer.merge()
    x = torch.randn(4, IN)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    base = linear()
    with pytest.raises(ValueError, match="compute_dtype"):  # a dtype, the wrong one: a value error
        QLoRALinear.from_linear(base, R, ALPHA, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="blocksize"):
        QLoRALinear.from_linear(base, R, ALPHA, blocksize=48)
    with pytest.raises(TypeError, match="double_quant"):
        QLoRALinear.from_linear(base, R, ALPHA, double_quant=1)
    with pytest.raises(ValueError, match="r must be"):
        QLoRALinear.from_linear(base, 0, ALPHA)
    with pytest.raises(TypeError, match="NF4Linear"):
        QLoRALinear(base, R, ALPHA)  # a QLoRALinear wraps a 4-bit base, not a dense one
    with pytest.raises(ValueError, match="finite"):
        nan = linear()
        with torch.no_grad():
            nan.weight[0, 0] = float("nan")
        QLoRALinear.from_linear(nan, R, ALPHA)
    t = quantize_nf4(base.weight.detach())
    with pytest.raises(TypeError, match="compute dtype"):
        nf4_matmul(torch.randn(2, IN, dtype=torch.float64), t)
    with pytest.raises(ValueError, match="in_features = 128"):
        nf4_matmul(torch.randn(2, 64), t)
    with pytest.raises(TypeError, match="NF4Tensor"):
        nf4_matmul(torch.randn(2, IN), base.weight)
    with pytest.raises(ValueError, match="frozen"):
        nf4_matmul(torch.randn(2, IN), t, torch.zeros(OUT, requires_grad=True))
    with pytest.raises(ValueError, match="compute_dtype"):
        nf4_linear(torch.randn(2, IN), t, None, torch.float64)
    with pytest.raises(ValueError, match="bias"):
        nf4_linear(torch.randn(2, IN), t, torch.zeros(OUT - 1))
    with pytest.raises(ValueError, match="in_features = 128"):
        nf4_linear(torch.randn(2, 3, 64), t)
    with pytest.raises(TypeError, match="QLoRALinear"):
        trace_flow(LoRALinear(base, R, ALPHA), torch.randn(2, IN))
    with pytest.raises(ValueError, match="steps"):
        compare_training(0)


# ----------------------------------------------------------------------------------------------
# The real model and the GPU


@pytest.mark.slow
def test_course_model_qlora_step():
    """The course model with r=16 on all seven projections: 4,884,480 trainable parameters, as peft counts them,
    and a backward pass (gradient checkpointing on) that reaches the adapters only."""
    from qlora_edu.ch06_lora.lora import lora_param_count
    from qlora_edu.common.base_model import load_base_model

    model, tok = load_base_model(progress=False)
    model = apply_qlora(model, LLAMA_TARGETS, 16, 32)
    assert count_parameters(model)[0] == lora_param_count(model.config, 16, LLAMA_TARGETS) == 4_884_480
    model.train()
    model.gradient_checkpointing_enable()
    tokens = tok(["The capital of France is Paris."] * 2, return_tensors="pt").input_ids
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() < 6, "the pretrained model knows this sentence"
    params = lora_parameters(model)
    assert all(torch.count_nonzero(a.grad) == 0 for a in params[0::2])  # dL/dA = s B^T g x^T = 0 while B = 0
    assert all(torch.count_nonzero(b.grad) > 0 for b in params[1::2])
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.gpu
def test_cuda_training_steps_both_paths():
    """A few training steps of a tiny random Llama on CUDA, ours vs peft + bitsandbytes. On CUDA bitsandbytes
    rounds the double-quantized constants to the nearest code (we keep the CPU grid), so ~0.2% of the
    constants differ by one code: the curves agree to 1e-3, not bit for bit."""
    result = compare_training(5, device="cuda")
    for a, b in zip(result.ours, result.peft, strict=True):
        assert a == pytest.approx(b, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_llama7b_benchmark_targets():
    """benchmarks/bench_qlora.py --gpu with 3 timed steps: a Llama-7B-shaped step within 1.2x of peft +
    bitsandbytes' time, peak memory no higher (minutes on an H100)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_qlora.py"
    spec = importlib.util.spec_from_file_location("bench_qlora", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.argparse.Namespace(repeats=3, gpu_rank=64, gpu_seq=512)
    t_ours, t_theirs, m_ours, m_theirs = bench.bench_gpu(args)
    assert t_ours <= bench.GPU_TARGETS["time_ratio"] * t_theirs
    assert m_ours <= m_theirs


def test_nf4_weight_is_built_once_per_stored_tensors():
    """The NF4Tensor view of an NF4Linear is checked and built once, not on every forward pass, and rebuilt when its
    storage is replaced (a move to another device or dtype of the module puts new tensors in the buffers)."""
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 64))
    first = layer.nf4_weight
    assert layer.nf4_weight is first
    layer.load_state_dict(layer.state_dict())  # copies into the same tensors: still valid
    assert layer.nf4_weight is first
    layer.packed = layer.packed.clone()  # a new tensor in the buffer: rebuilt from it
    assert layer.nf4_weight is not first and layer.nf4_weight.packed is layer.packed
    assert torch.equal(dequantize_nf4(layer.nf4_weight), dequantize_nf4(first))
