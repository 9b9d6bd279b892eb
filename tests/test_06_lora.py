"""Chapter 6: the chapter's battery (qlora_edu/ch06_lora/checks.py) on the package and on the solution notebook, its
known mistakes caught; then LoRALinear and apply_lora against peft 0.21.2 (its LoRA ``Linear`` layer and
``get_peft_model``).

Every expected value comes from peft (or torch): peft's layer given the same A and B, peft's initializer,
peft's parameter counts. Tiny shapes and random-weight models only; parameter counts of the real shapes are
taken on the ``meta`` device (no memory, no weights).
"""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from chapter_battery import battery_tests, control_passes
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from qlora_edu.ch03_double_quant.storage import total_params
from qlora_edu.ch06_lora.lora import (
    LLAMA_TARGETS,
    LoRALinear,
    apply_lora,
    base_param_count,
    count_parameters,
    find_target_linears,
    lora_param_count,
    lora_parameters,
    trainable_percent,
)
from qlora_edu.checks import mistakes, property_settings

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# peft calls transformers' deprecated is_gradient_checkpointing alias; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

checks = importlib.import_module("qlora_edu.ch06_lora.checks")

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("06_lora")


def test_the_mistakes_pass_with_every_switch_off():
    """The control: the LoRA layer the mistakes are built from passes the battery with no mistake on."""

    class Control(checks._Lora):
        pass

    assert control_passes("LoRALinear", Control)


def test_every_lora_mistake_turns_exactly_one_switch():
    switches = {k for k, v in vars(checks._Lora).items() if not k.startswith("_") and not callable(v)}
    layer_mistakes = [m.fn for m in mistakes("06_lora") if m.function == "LoRALinear"]
    assert len(layer_mistakes) >= 10
    for m in layer_mistakes:
        assert issubclass(m, checks._Lora)
        changed = {k for k in switches if getattr(m, k) != getattr(checks._Lora, k)}
        assert len(changed) == 1, (m.__name__, changed)

#: the course model's shape (SmolLM2-135M-Instruct): 30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536
COURSE_CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
#: LLaMA-1 7B and 65B: every head has its own key and value, untied embeddings
LLAMA1 = {"7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
          "65B": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000, tie_word_embeddings=False)}
TARGET_SETS = {"qv": ("q_proj", "v_proj"), "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "all": LLAMA_TARGETS}


class Holder(nn.Module):
    """A one-layer model, so peft's get_peft_model builds its LoRA layer the way it does for real models."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def peft_lora(base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """peft's LoRA layer on (a copy of) ``base``, built by get_peft_model (adapters float32, as its default)."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["layer"])
    return get_peft_model(Holder(copy.deepcopy(base)), config).base_model.model.layer


def random_adapters(layer: LoRALinear, seed: int) -> None:
    """Non-zero A and B (B starts at zero, which would hide every mistake in the adapter path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / math.sqrt(layer.in_features))
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def pair(in_f=96, out_f=80, r=8, alpha=16, dropout=0.0, bias=True, dtype=torch.float32, seed=0):
    """Our layer and peft's, on the same base weights, with the same (random, non-zero) A and B."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    theirs = peft_lora(base, r, alpha, dropout)
    ours = LoRALinear(copy.deepcopy(base), r, alpha, dropout)
    random_adapters(ours, seed + 1)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    return ours, theirs


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_equals_peft(dtype, bias):
    ours, theirs = pair(bias=bias, dtype=dtype)
    assert theirs.lora_A["default"].weight.dtype == ours.lora_A.dtype == torch.float32  # peft's autocast default
    x = torch.randn(3, 7, 96).to(dtype)
    y = ours(x)
    assert y.dtype == dtype and y.shape == (3, 7, 80)
    torch.testing.assert_close(y, theirs(x), rtol=0, atol=0)  # same operations in the same order: same bits


@given(in_f=st.integers(1, 70), out_f=st.integers(1, 70), r=st.integers(1, 9), alpha=st.floats(0.5, 64),
       lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), seed=st.integers(0, 2**16))
@property_settings(15)
def test_forward_equals_peft_any_shape(in_f, out_f, r, alpha, lead, seed):
    ours, theirs = pair(in_f, out_f, r, alpha, seed=seed)
    x = torch.randn(*lead, in_f)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_same_mask_as_peft(dtype):
    """peft drops out the float32-cast input with nn.Dropout; under the same RNG state we draw the same mask."""
    ours, theirs = pair(dropout=0.3, dtype=dtype)
    ours.train(), theirs.train()
    x = torch.randn(5, 96).to(dtype)
    torch.manual_seed(123)
    y_ours = ours(x)
    torch.manual_seed(123)
    y_theirs = theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0)
    torch.manual_seed(124)
    assert not torch.equal(ours(x), y_ours), "dropout with p=0.3 should change the output for another seed"
    ours.eval(), theirs.eval()  # eval: no dropout, both
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_init_like_peft():
    """B = 0 and A ~ U(-1/sqrt(in), 1/sqrt(in)), the distribution of peft's default init (two-sample KS test)."""
    from scipy.stats import ks_2samp

    in_f, r = 512, 64
    torch.manual_seed(0)
    base = nn.Linear(in_f, 256)
    ours = LoRALinear(copy.deepcopy(base), r, 16)
    theirs = peft_lora(base, r, 16)
    a_theirs = theirs.lora_A["default"].weight.detach()
    assert torch.count_nonzero(ours.lora_B) == 0 and torch.count_nonzero(theirs.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(in_f)
    for a in (ours.lora_A.detach(), a_theirs):
        assert a.abs().max() <= bound
        assert a.abs().max() > 0.99 * bound  # 32,768 uniform draws reach the edge
    assert ks_2samp(ours.lora_A.detach().flatten().numpy(), a_theirs.flatten().numpy()).pvalue > 1e-3
    x = torch.randn(4, in_f)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=0)  # training starts exactly at the base model


def test_gradients_reach_only_adapters_and_match_peft():
    ours, theirs = pair()
    x = torch.randn(6, 96, requires_grad=True)
    x_theirs = x.detach().clone().requires_grad_()
    (ours(x) ** 2).sum().backward()
    (theirs(x_theirs) ** 2).sum().backward()
    assert not ours.base.weight.requires_grad and ours.base.weight.grad is None and ours.base.bias.grad is None
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad)
    torch.testing.assert_close(x.grad, x_theirs.grad)


def test_first_step_moves_only_b():
    """With B = 0, dL/dA = scaling * B^T g x^T = 0 and dL/dB = scaling * g (A x)^T != 0."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), 4, 8)
    layer(torch.randn(5, 32)).square().sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge(dtype):
    ours, theirs = pair(dtype=dtype)
    weight_before = ours.base.weight.detach().clone()
    merged = ours.merge()
    assert isinstance(merged, nn.Linear) and merged is not ours.base and merged.weight.dtype == dtype
    assert torch.equal(ours.base.weight, weight_before), "merge must not change the base weight in place"
    x = torch.randn(4, 96).to(dtype)
    # the same function: W x + s B (A x) vs (W + s B A) x differ only by rounding (bf16: 8-bit mantissa)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(merged(x).float(), ours(x).float(), **tol)
    peft_merged = get_peft_model_merged(theirs)
    if dtype == torch.float32:  # peft: W + (B @ A) * s, as we do
        torch.testing.assert_close(merged.weight, peft_merged.weight, rtol=0, atol=0)
    else:  # peft rounds the delta to bf16 before adding; we add in float32 and round once
        torch.testing.assert_close(merged.weight, peft_merged.weight, rtol=2**-7, atol=2**-7 * 1e-2)


def get_peft_model_merged(theirs) -> nn.Linear:
    layer = copy.deepcopy(theirs)
    layer.merge()
    return layer.base_layer


# ----------------------------------------------------------------------------------------------
# A whole model


@pytest.mark.parametrize("targets", ["qv", "all"])
def test_apply_lora_equals_get_peft_model(targets):
    names = TARGET_SETS[targets]
    model = tiny_llama()
    ours = apply_lora(copy.deepcopy(model), names, r=4, alpha=8)
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=list(names)))
    layers = [m for m in ours.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * len(names)
    with torch.no_grad():
        for i, (name, layer) in enumerate((n, m) for n, m in ours.named_modules() if isinstance(m, LoRALinear)):
            random_adapters(layer, i)
            twin = theirs.get_submodule(f"base_model.model.{name}")
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
    tokens = torch.randint(128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(tokens).logits
        torch.testing.assert_close(logits, theirs(tokens).logits, rtol=0, atol=0)
        assert not torch.allclose(logits, model(tokens).logits), "random adapters must change the logits"
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    trainable = {p for p in ours.parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(ours))


def test_apply_lora_selects_like_peft():
    model = tiny_llama()
    found = [name for name, _ in find_target_linears(model, ["q_proj", "layers.1.mlp.down_proj"])]
    assert found == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, ["qproj"], 4, 8)  # a typo must not train nothing
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, ["proj"], 4, 8)  # a suffix after a dot, not a substring: "proj" is no module's name
    with pytest.raises(TypeError, match="only torch.nn.Linear"):
        apply_lora(model, ["mlp"], 4, 8)
    apply_lora(model, ["q_proj"], 4, 8)
    with pytest.raises(TypeError, match="already adapted"):
        apply_lora(model, ["q_proj"], 4, 8)


# ----------------------------------------------------------------------------------------------
# Counting


def meta_peft_counts(fields: dict, r: int, names) -> tuple[int, int]:
    """peft's (trainable, all) counts (what print_trainable_parameters prints) for a model of this shape."""
    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        model = LlamaForCausalLM(LlamaConfig(**fields))
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(names))) \
        .get_nb_trainable_parameters()


@pytest.mark.parametrize("r", [8, 64])
@pytest.mark.parametrize("targets", ["qv", "all"])
def test_counts_equal_peft_course_model(r, targets):
    names = TARGET_SETS[targets]
    config = LlamaConfig(**COURSE_CONFIG)
    trainable, total = meta_peft_counts(COURSE_CONFIG, r, names)
    assert lora_param_count(config, r, names) == trainable
    assert base_param_count(config) + trainable == total
    assert trainable_percent(config, r, names) == pytest.approx(100 * trainable / total, rel=1e-12)
    with torch.device("meta"):
        ours = apply_lora(LlamaForCausalLM(config), names, r, 2 * r)
    assert count_parameters(ours) == (trainable, total)


def test_course_model_numbers():
    """The figures the lesson quotes: 134,515,008 parameters; r=16 on all seven projections: 4,884,480 (3.5%)."""
    config = LlamaConfig(**COURSE_CONFIG)
    assert base_param_count(config) == 134_515_008
    assert lora_param_count(config, 16, LLAMA_TARGETS) == 4_884_480
    assert trainable_percent(config, 16, LLAMA_TARGETS) == pytest.approx(3.504, abs=1e-3)


@pytest.mark.parametrize("model", ["7B", "65B"])
def test_counts_llama1_shapes(model):
    """LLaMA-1 as a name ('7B') and as a LlamaConfig give the same counts; 7B also against peft (meta device)."""
    names = TARGET_SETS["all"]
    config = LlamaConfig(**LLAMA1[model])
    assert base_param_count(model) == base_param_count(config) == total_params(model)
    for r in (8, 16, 32, 64, 128):
        assert lora_param_count(model, r, names) == lora_param_count(config, r, names)
    if model == "7B":
        trainable, total = meta_peft_counts(LLAMA1[model], 64, names)
        assert lora_param_count(model, 64, names) == trainable == 159_907_840
        assert base_param_count(model) + trainable == total


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_arguments():
    lin = nn.Linear(8, 4)
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(8, 4, 1), 2, 4)
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear(lin, 0, 4)
    with pytest.raises(TypeError, match="r must be an int"):
        LoRALinear(lin, 2.0, 4)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(lin, 2, -1)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(lin, 2, 4, dropout=1.0)
    with pytest.raises(ValueError, match="adapter_dtype"):  # a dtype, the wrong one: a value error
        LoRALinear(lin, 2, 4, adapter_dtype=torch.int8)
    with pytest.raises(TypeError, match="adapter_dtype"):
        LoRALinear(lin, 2, 4, adapter_dtype="bf16")
    layer = LoRALinear(lin, 2, 4)
    with pytest.raises(ValueError, match="in_features = 8"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="list of module names"):
        apply_lora(tiny_llama(), "q_proj", 4, 8)  # peft would read a string as a regular expression
    with pytest.raises(ValueError, match="at least one"):
        apply_lora(tiny_llama(), [], 4, 8)
    with pytest.raises(TypeError, match="model"):
        count_parameters("model")
    with pytest.raises(ValueError, match="among"):
        lora_param_count("7B", 8, ["lm_head"])
    with pytest.raises(ValueError, match="7B"):
        lora_param_count("8B", 8, ["q_proj"])
    with pytest.raises(TypeError, match="config_or_shape"):
        base_param_count([4096, 11008, 32])
