"""Chapter 5: AdamW, 8-bit AdamW (bit for bit against bitsandbytes on the CPU) and the paging simulator.

Expected values come from torch.optim.AdamW, bitsandbytes 0.50.2 (quantize_blockwise, AdamW8bit), a float64
evaluation of the paper's formula, and closed-form memory arithmetic written out here.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from chapter_battery import battery_tests, control_passes
from hypothesis import given
from hypothesis import strategies as st

import qlora_edu.ch05_optimizers.optim as optim_module
from qlora_edu.ch03_double_quant.double_quant import dynamic_map, grid_lookup_table
from qlora_edu.ch05_optimizers.blockwise8bit import STATE_BLOCKSIZE, dequantize_blockwise_8bit, quantize_blockwise_8bit
from qlora_edu.ch05_optimizers.optim import (
    MIN_8BIT_SIZE,
    AdamW,
    AdamW8bit,
    OptimizerMismatch,
    adamw_step,
    first_difference,
    lockstep_mismatch,
    optimizer_states,
    state_bytes,
    state_bytes_per_param,
    training_losses,
)
from qlora_edu.ch05_optimizers.paging import (
    H100_PCIE_BYTES_PER_S,
    MEMORY_KINDS,
    MiB,
    StepMemory,
    paging_demo_cuda,
    plot_timeline,
    qlora_7b_example,
    simulate_step,
)
from qlora_edu.checks import property_settings

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("05_optimizers")

SHAPES = [(4096,), (64, 96), (300, 70), (5000,), (3,), (257, 17)]


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Speed only, results are the same: on a loaded two-core machine torch's two-thread kernels for sqrt/exp
    stalled ~100x (14 ms instead of 0.08 ms for 21,000 elements), tripling this file's time. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # 8-bit, 8-bit, 8-bit, 8-bit, fp32, 8-bit


def ours_8bit(params):
    return AdamW8bit(params, lr=1e-2)


def bnb_8bit(params):
    return bnb.optim.AdamW8bit(params, lr=1e-2)


def spread(n: int, seed: int, signed: bool = True) -> torch.Tensor:
    """Values over seven decades, like Adam's states, with an all-zero first block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** (-7 * torch.rand(n, generator=g))
    x[:STATE_BLOCKSIZE] = 0.0
    return x if signed else x.abs()


def grid_boundary_values(code: torch.Tensor, absmax: float) -> torch.Tensor:
    """Values a few float32 ulps around every point where the CPU grid switches codes, times ``absmax``:
    there ``x * (1/absmax)`` and ``x / absmax`` can round to different codes."""
    lookup = grid_lookup_table(code)
    switch = torch.nonzero(lookup[1:] != lookup[:-1]).flatten() + 1
    edge = (switch.float() - 0.5) / (0.5 * 65535) - 1
    eps = torch.finfo(torch.float32).eps
    values = torch.cat([edge * absmax * (1 + k * eps) for k in range(-3, 4)])
    return values[values.abs() < absmax]


CHECKS = importlib.import_module("qlora_edu.ch05_optimizers.checks")


@pytest.mark.parametrize(("name", "fn"), [("adamw_step", CHECKS._adamw_step),
                                          ("quantize_blockwise_8bit", CHECKS._quantize),
                                          ("dequantize_blockwise_8bit", CHECKS._dequantize)])
def test_known_mistakes_are_one_switch_from_a_right_function(name, fn):
    """The battery's mistakes are re-implementations with one switch on; with every switch off the
    re-implementation passes, so each mistake fails because of its own switch."""
    assert control_passes(name, fn)


def test_a_subclass_steps_with_its_own_functions():
    """AdamW / AdamW8bit call the class attributes update / quantize / dequantize (how a check runs a
    learner's functions): a subclass with a doubled learning rate in its update moves twice as far."""
    def doubled(param, grad, exp_avg, exp_avg_sq, step, *, lr, **kw):
        adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=2 * lr, **kw)

    calls = []

    def counting_quantize(x, code, blocksize=STATE_BLOCKSIZE, *, lookup=None):
        calls.append(x.numel())
        return quantize_blockwise_8bit(x, code, blocksize, lookup=lookup)

    for base in (AdamW, AdamW8bit):
        sub = type("Sub", (base,), {"update": staticmethod(doubled), "quantize": staticmethod(counting_quantize)})
        start = torch.zeros(5000)
        ref_p, sub_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        ref_p.grad = sub_p.grad = torch.ones(5000)
        base([ref_p], lr=1e-3, weight_decay=0.0).step()
        sub([sub_p], lr=1e-3, weight_decay=0.0).step()
        torch.testing.assert_close(sub_p.detach(), 2 * ref_p.detach(), rtol=1e-3, atol=0)
    assert calls == [5000, 5000]  # AdamW8bit re-quantized m and v with the subclass's quantizer


# ------------------------------------------------------------------------------------------ blockwise 8-bit

@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [3, 256, 300, 4096, 5000, 2 * 65536 + 5])
def test_quantize_blockwise_8bit_matches_bitsandbytes(signed, n):
    code = dynamic_map(signed)
    x = spread(n, seed=n, signed=signed)
    expected_codes, state = bnb_functional.quantize_blockwise(x, code=code, blocksize=STATE_BLOCKSIZE)
    codes, absmax = quantize_blockwise_8bit(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(n / STATE_BLOCKSIZE),)
    assert first_difference(absmax, state.absmax) is None
    assert first_difference(codes.flatten(), expected_codes.flatten()) is None
    decoded = dequantize_blockwise_8bit(codes, absmax, code)
    expected = bnb_functional.dequantize_blockwise(expected_codes, absmax=state.absmax, code=code,
                                                   blocksize=STATE_BLOCKSIZE)
    assert first_difference(decoded, expected.view(decoded.shape)) is None


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("absmax", [3.7, 0.0123, 7.77e-5])
def test_quantize_blockwise_8bit_scales_by_the_reciprocal_in_every_block(signed, absmax):
    # Full blocks of boundary values (each closed by its absmax), then a partial last block of them.
    code = dynamic_map(signed)
    values = grid_boundary_values(code, absmax)
    values = values if signed else values.abs()
    n_full = values.numel() // (STATE_BLOCKSIZE - 1)
    full = torch.cat([values[: n_full * (STATE_BLOCKSIZE - 1)].view(n_full, -1), torch.full((n_full, 1), absmax)], 1)
    x = torch.cat([full.flatten(), values[:100], torch.tensor([absmax])])
    expected, _ = bnb_functional.quantize_blockwise(x, code=code, blocksize=STATE_BLOCKSIZE)
    codes, _ = quantize_blockwise_8bit(x, code)
    assert first_difference(codes, expected) is None
    # The test has teeth: dividing instead would change some of these codes.
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % STATE_BLOCKSIZE)).view(-1, STATE_BLOCKSIZE)
    divided = (blocks / blocks.abs().amax(1, keepdim=True) + 1) * 0.5 * 65535 + 0.5
    by_division = grid_lookup_table(code)[divided.long()].flatten()[: x.numel()].to(torch.uint8)
    assert first_difference(by_division, expected) is not None


def test_all_zero_block_reads_back_as_zero():
    for signed in (True, False):
        codes, absmax = quantize_blockwise_8bit(torch.zeros(300), dynamic_map(signed))
        assert absmax.tolist() == [0.0, 0.0]
        assert codes.tolist() == [0] * 300  # NaN from 0 * (1/0) lands on grid point 0, as in bitsandbytes
        assert dequantize_blockwise_8bit(codes, absmax, dynamic_map(signed)).abs().max() == 0


@given(n=st.integers(1, 3000), seed=st.integers(0, 2**16), signed=st.booleans())
@property_settings(25)
def test_blockwise_8bit_round_trip_error_is_bounded(n, seed, signed):
    code = dynamic_map(signed)
    x = spread(n, seed, signed)
    codes, absmax = quantize_blockwise_8bit(x.view(1, n), code)
    decoded = dequantize_blockwise_8bit(codes, absmax, code, shape=(n,))
    half_gap = float((code[1:] - code[:-1]).max()) / 2 + 2 / 65535  # half a step of the map + one grid cell
    bound = half_gap * absmax.repeat_interleave(STATE_BLOCKSIZE)[:n]
    assert bool(((decoded - x).abs() <= bound * (1 + 1e-6) + 1e-30).all())


def test_blockwise_8bit_guards():
    code = dynamic_map(True)
    with pytest.raises(ValueError, match="finite"):
        quantize_blockwise_8bit(torch.tensor([1.0, float("nan")]), code)
    with pytest.raises(ValueError, match="unsigned"):
        quantize_blockwise_8bit(torch.tensor([1.0, -1.0]), dynamic_map(False))
    with pytest.raises(ValueError, match="256"):
        quantize_blockwise_8bit(torch.ones(4), code[:16])
    with pytest.raises(ValueError, match="power of two"):
        quantize_blockwise_8bit(torch.ones(4), code, blocksize=100)
    with pytest.raises(TypeError, match="float"):
        quantize_blockwise_8bit(torch.ones(4, dtype=torch.int32), code)
    codes, absmax = quantize_blockwise_8bit(torch.ones(300), code)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blockwise_8bit(codes.int(), absmax, code)
    with pytest.raises(ValueError, match="absmax must have shape"):
        dequantize_blockwise_8bit(codes, absmax[:1], code)
    with pytest.raises(ValueError, match="shape"):
        dequantize_blockwise_8bit(codes, absmax, code, shape=(3, 99))


# ------------------------------------------------------------------------------------------------- AdamW

def test_adamw_step_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    p, grad, m, v = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    v = v.abs()
    lr, b1, b2, eps, wd, t = 3e-3, 0.8, 0.95, 1e-6, 0.1, 7
    # Expected, written out independently: decoupled decay, moments, bias-corrected update.
    m1 = b1 * m + (1 - b1) * grad
    v1 = b2 * v + (1 - b2) * grad**2
    expected = p * (1 - lr * wd) - lr * (m1 / (1 - b1**t)) / (torch.sqrt(v1 / (1 - b2**t)) + eps)
    adamw_step(p, grad, m, v, t, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
    torch.testing.assert_close(m, m1, rtol=0, atol=1e-15)
    torch.testing.assert_close(v, v1, rtol=0, atol=1e-15)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_adamw_matches_torch_over_100_steps(dtype, atol):
    mismatch = lockstep_mismatch(lambda ps: AdamW(ps, lr=1e-2),
                                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
                                 SHAPES, steps=100, dtype=dtype, atol=atol)
    assert mismatch is None, str(mismatch)


def test_adamw_matches_torch_with_param_groups():
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g) for s in [(10, 7), (33,), (4, 4, 4)]]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]

    def groups(ps):
        return [{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.1, "betas": (0.8, 0.99)},
                {"params": ps[2:], "eps": 1e-6}]

    opt, torch_opt = AdamW(groups(ours), lr=1e-2), torch.optim.AdamW(groups(ref), lr=1e-2, foreach=False)
    for _ in range(100):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, r, gr in zip(ours, ref, grads, strict=True):
            p.grad, r.grad = gr.clone(), gr.clone()
        opt.step()
        torch_opt.step()
    for p, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=0, atol=1e-6)


def test_adamw_bf16_is_as_accurate_as_torchs():
    # bf16 (8-bit mantissa) cannot be compared at 1e-6; torch's bf16 AdamW also rounds its own way (lerp).
    # Both runs are compared with a float64 run of the same optimizer instead: ours must be as close.
    def run(make, dtype):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
        opt = make(params)
        for _ in range(100):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        return torch.cat([p.detach().double().flatten() for p in params])

    exact = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), torch.float64)
    ours = run(lambda ps: AdamW(ps, lr=1e-2), torch.bfloat16)
    theirs = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), torch.bfloat16)
    ours_err, their_err = (ours - exact).abs().mean(), (theirs - exact).abs().mean()
    assert ours_err <= 1.25 * their_err, (float(ours_err), float(their_err))


def test_step_returns_closure_loss_and_skips_params_without_grad():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(5000))
    for cls in (AdamW, AdamW8bit):
        opt = cls([a, b])
        a.grad, b.grad = torch.ones(3), None
        assert opt.step(lambda: torch.tensor(2.5)) == 2.5
        assert optimizer_states(opt, b) == {} and "exp_avg" in optimizer_states(opt, a)


def test_optimizer_guards():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="lr"):
        AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="beta1"):
        AdamW8bit([p], betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="betas"):
        AdamW([p], betas=0.9)
    with pytest.raises(TypeError, match="closure"):
        AdamW([p]).step(closure=3)
    with pytest.raises(ValueError, match="shape"):
        adamw_step(torch.ones(3), torch.ones(4), torch.ones(3), torch.ones(3), 1, lr=1e-3, beta1=0.9, beta2=0.99,
                   eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="step"):
        adamw_step(torch.ones(3), torch.ones(3), torch.ones(3), torch.ones(3), 0, lr=1e-3, beta1=0.9, beta2=0.99,
                   eps=1e-8, weight_decay=0.0)


# ------------------------------------------------------------------------------------------ AdamW8bit parity

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adamw8bit_bit_identical_to_bitsandbytes(dtype):
    mismatch = lockstep_mismatch(ours_8bit, bnb_8bit, SHAPES, steps=25, dtype=dtype)
    assert mismatch is None, f"first difference: {mismatch}"


SHAPE = st.one_of(st.tuples(st.integers(1, 12_000)),  # up to ~27k elements: small and 8-bit tensors, odd sizes
                  st.tuples(st.integers(1, 150), st.integers(1, 150)),
                  st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(1, 30)))


@given(shapes=st.lists(SHAPE, min_size=1, max_size=3), seed=st.integers(0, 2**16), bf16=st.booleans())
@property_settings(15)
def test_adamw8bit_bit_identical_property(shapes, seed, bf16):
    mismatch = lockstep_mismatch(ours_8bit, bnb_8bit, shapes, steps=20, seed=seed,
                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    assert mismatch is None, f"first difference: {mismatch}"


def test_adamw8bit_settings_other_than_the_defaults():
    def make(cls):
        return lambda ps: cls(ps, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)

    mismatch = lockstep_mismatch(make(AdamW8bit), make(bnb.optim.AdamW8bit), [(70, 80), (100,)], steps=20)
    assert mismatch is None, f"first difference: {mismatch}"


def test_parity_needs_the_cpu_grid_rounding_and_the_fp32_arrangement(monkeypatch):
    # Teeth: the lockstep check catches each of the two details that bit parity depends on.
    def nearest(x, code, blocksize=STATE_BLOCKSIZE, *, lookup=None):
        flat = x.flatten().float()
        blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
        absmax = blocks.abs().amax(1)
        scaled = (blocks * (1 / absmax)[:, None]).nan_to_num(0.0)
        codes = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2).flatten()[: flat.numel()]
        return codes.to(torch.uint8).view(x.shape), absmax

    with monkeypatch.context() as patch:
        patch.setattr(AdamW8bit, "quantize", staticmethod(nearest))
        mismatch = lockstep_mismatch(ours_8bit, bnb_8bit, [(4096,)], steps=5)
    assert isinstance(mismatch, OptimizerMismatch) and mismatch.tensor.endswith("codes")
    with monkeypatch.context() as patch:
        patch.setattr(optim_module, "_adamw_step_bnb_fp32", adamw_step)
        mismatch = lockstep_mismatch(ours_8bit, bnb_8bit, [(64, 60)], steps=5)
    assert isinstance(mismatch, OptimizerMismatch) and mismatch.tensor == "param" and "step 1" in str(mismatch)


def test_adamw8bit_state_dict_round_trip_keeps_float32_states():
    def fresh():
        g = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in [(80, 70), (10,)]]

    def train(opt, params, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            opt.step()

    straight = fresh()
    opt = AdamW8bit(straight)
    train(opt, straight, 5, seed=10)
    train(opt, straight, 5, seed=11)
    resumed = fresh()
    first = AdamW8bit(resumed)
    train(first, resumed, 5, seed=10)
    saved = first.state_dict()
    second = AdamW8bit(resumed)
    second.load_state_dict(saved)
    assert second.state[resumed[0]]["exp_avg_absmax"].dtype == torch.float32
    assert second.state[resumed[1]]["exp_avg"].dtype == torch.float32
    train(second, resumed, 5, seed=11)
    for a, b in zip(straight, resumed, strict=True):
        assert first_difference(a.detach(), b.detach()) is None


# ------------------------------------------------------------------------------------------- state bytes

def _stepped(make, shapes=SHAPES):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: "Paged optimizers are not supported on CPU"
        opt.step()
    return opt, params


def test_state_bytes_of_real_optimizers_match_the_formula():
    numels = [math.prod(s) for s in SHAPES]
    n_total = sum(numels)
    small = sum(n for n in numels if n < MIN_8BIT_SIZE)
    blocks = sum(math.ceil(n / 256) for n in numels if n >= MIN_8BIT_SIZE)
    eight_bit = 2 * (n_total - small) + 8 * blocks + 8 * small  # codes + float32 absmax + fp32 small states
    assert state_bytes(_stepped(lambda ps: AdamW(ps))[0]) == 8 * n_total
    assert state_bytes(_stepped(lambda ps: torch.optim.AdamW(ps))[0]) == 8 * n_total + 4 * len(SHAPES)  # step
    assert state_bytes(_stepped(lambda ps: bnb.optim.AdamW(ps))[0]) == 8 * n_total
    assert state_bytes(_stepped(ours_8bit)[0]) == eight_bit
    two_maps = 2 * 256 * 4  # bitsandbytes also holds its two dynamic maps, shared by all parameters
    assert state_bytes(_stepped(bnb_8bit)[0]) == eight_bit + two_maps
    assert state_bytes(_stepped(lambda ps: bnb.optim.PagedAdamW8bit(ps))[0]) == eight_bit + two_maps
    for name, expected in (("adamw", 8 * n_total), ("adamw8bit", eight_bit), ("paged_adamw8bit", eight_bit)):
        formula = sum(state_bytes_per_param(name, n) * n for n in numels)
        assert formula == pytest.approx(expected, rel=1e-12)


def test_state_bytes_per_param_figures():
    assert state_bytes_per_param("adamw") == 8.0
    assert state_bytes_per_param("AdamW8bit") == 2 + 8 / 256
    assert state_bytes_per_param("adamw8bit", 4095) == 8.0
    assert state_bytes_per_param("adamw8bit", 4097) == (2 * 4097 + 8 * 17) / 4097
    with pytest.raises(ValueError, match="name"):
        state_bytes_per_param("sgd")
    with pytest.raises(TypeError, match="optimizer"):
        state_bytes([1, 2])


def test_first_difference():
    a = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert first_difference(a, a.clone()) is None
    b = a.clone()
    b[2, 1] += 1e-3
    assert first_difference(a, b) == (2, 1)
    assert first_difference(a, b, atol=1e-2) is None
    assert first_difference(torch.tensor([0.0]), torch.tensor([-0.0])) == (0,)  # bits, not values
    assert first_difference(torch.tensor([float("nan")]), torch.tensor([float("nan")])) is None
    assert first_difference(torch.tensor(1.0), torch.tensor(2.0)) == ()
    with pytest.raises(ValueError, match="same shape"):
        first_difference(a, a.flatten())


# ------------------------------------------------------------------------------------------ training loop

def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def test_training_losses_is_the_plain_loop():
    batches = torch.randint(64, (3, 2, 9), generator=torch.Generator().manual_seed(0))
    model = _tiny_llama()
    reference = _tiny_llama()
    losses = training_losses(model, batches, torch.optim.AdamW(model.parameters(), lr=1e-2), 5, progress=False)
    # The same loop written out, on an identical copy: next-token cross-entropy, batches reused in order.
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    expected = []
    for i in range(5):
        tokens = batches[i % 3]
        logits = reference(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-5)
    assert losses[-1] < losses[0]  # it learns the three batches
    assert model.training


def test_training_losses_guards():
    model = _tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    ok = torch.zeros(2, 2, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match="model"):
        training_losses("model", ok, opt, 1)
    with pytest.raises(TypeError, match="batches"):
        training_losses(model, ok.float(), opt, 1)
    with pytest.raises(ValueError, match="batches"):
        training_losses(model, ok[0], opt, 1)
    with pytest.raises(TypeError, match="optimizer"):
        training_losses(model, ok, [opt], 1)
    with pytest.raises(ValueError, match="steps"):
        training_losses(model, ok, opt, 0)


# ----------------------------------------------------------------------------------------------- paging

def uniform_step(n_layers=8, act=100, grads=80, spike=50, transient=30, weights=1000, states=400, small=0):
    return StepMemory(weights_bytes=weights, state_bytes=states, grad_bytes=grads,
                      layer_activation_bytes=(act,) * n_layers, spike_bytes=spike,
                      backward_transient_bytes=transient, unpageable_state_bytes=small,
                      forward_ms=90.0, backward_ms=180.0, optimizer_ms=5.0)


def expected_peaks(n_layers=8, act=100, grads=80, spike=50, transient=30, weights=1000, states=400, small=0):
    """Closed-form peaks of the model's allocation order, independent of the simulator's code."""
    per_layer_grad = grads / n_layers
    forward_top = weights + states + n_layers * act + spike
    backward = max(weights + states + i * act + (n_layers - i + 1) * per_layer_grad + transient
                   for i in range(1, n_layers + 1))
    allocated = max(forward_top, backward)
    return allocated, allocated - (states - small)  # paged: everything but the pageable states must fit


@pytest.mark.parametrize("params", [{}, {"spike": 700}, {"small": 150, "transient": 300}, {"grads": 2000}])
def test_oom_exactly_when_the_peak_does_not_fit(params):
    memory = uniform_step(**params)
    unpaged_need, paged_need = expected_peaks(**params)
    for capacity in (unpaged_need - 1, unpaged_need, paged_need - 1, paged_need):
        assert simulate_step(memory, capacity, paged=False).oom == (capacity < unpaged_need)
        assert simulate_step(memory, capacity, paged=True).oom == (capacity < paged_need)


@pytest.mark.parametrize("capacity", [1200, 1500, 1700, 1900, 2200])
@pytest.mark.parametrize("paged", [False, True])
def test_bytes_are_conserved(capacity, paged):
    memory = uniform_step(spike=300, small=100)
    tl = simulate_step(memory, capacity, paged=paged)
    for i in range(len(tl.t_ms)):
        assert tl.gpu_bytes[i] + tl.host_bytes[i] == tl.allocated_bytes[i]
        assert sum(tl.resident[k][i] for k in MEMORY_KINDS) == tl.gpu_bytes[i]
        assert tl.host_bytes[i] >= 0 and tl.gpu_bytes[i] <= capacity or (tl.oom and i == len(tl.t_ms) - 1)
    assert list(tl.t_ms) == sorted(tl.t_ms)
    if not tl.oom:  # everything allocated was freed; what left the GPU came back or is on the host
        assert tl.allocated_bytes[-1] == tl.allocated_bytes[0] == memory.weights_bytes + memory.state_bytes
        assert tl.host_bytes[-1] == tl.evicted_bytes - tl.paged_in_bytes == tl.streamed_bytes
        assert tl.resident["states"][-1] + tl.host_bytes[-1] == memory.state_bytes


def test_transfer_time_is_evicted_bytes_over_bandwidth():
    memory = uniform_step(spike=300)
    allocated_peak, paged_need = expected_peaks(spike=300)
    capacity = paged_need + 10
    for bandwidth in (1e3, 5e4):
        tl = simulate_step(memory, capacity, paged=True, bandwidth=bandwidth)
        assert not tl.oom
        assert tl.evicted_bytes == allocated_peak - capacity  # lazily: just what the peak needs
        assert tl.page_in_ms == pytest.approx(tl.evicted_bytes / bandwidth * 1e3)
        assert tl.page_out_ms == pytest.approx(tl.evicted_bytes / bandwidth * 1e3)
        assert tl.step_ms == pytest.approx(90 + 180 + 5 + tl.transfer_ms)
    roomy = simulate_step(memory, allocated_peak, paged=True)
    assert roomy.evicted_bytes == 0 and roomy.transfer_ms == 0 and roomy.step_ms == pytest.approx(275)


def test_states_that_do_not_fit_back_stream_through_the_update():
    # Big gradients: at the update weights + gradients leave room for only part of the states.
    memory = uniform_step(grads=800, states=600)
    _, paged_need = expected_peaks(grads=800, states=600)
    tl = simulate_step(memory, paged_need, paged=True, bandwidth=1e4)
    assert not tl.oom
    room = paged_need - (1000 + 800)  # capacity - weights - gradients at the update
    evicted_before_update = tl.evicted_bytes - tl.streamed_bytes
    assert tl.streamed_bytes == evicted_before_update - room > 0
    assert tl.paged_in_bytes == evicted_before_update  # every evicted byte was read back for the update
    assert tl.page_in_ms == pytest.approx(tl.paged_in_bytes / 1e4 * 1e3)
    assert tl.page_out_ms == pytest.approx(tl.evicted_bytes / 1e4 * 1e3)
    assert tl.host_bytes[-1] == tl.streamed_bytes


def test_qlora_7b_example_against_the_h100_measurements():
    memory = qlora_7b_example()
    tl = simulate_step(memory, 80 * 1024 * MiB, paged=True)
    assert tl.peak_allocated_bytes == (5776 + 1220) * MiB  # measured torch peak + paged states
    # Fully evicted states: the model's page-in against the measured 29.4-31.1 ms step minus 3.5 ms resident.
    squeezed = simulate_step(memory, tl.peak_allocated_bytes - memory.state_bytes, paged=True)
    assert not squeezed.oom and squeezed.paged_in_bytes == memory.state_bytes
    assert simulate_step(memory, tl.peak_allocated_bytes - memory.state_bytes - 1, paged=True).oom
    assert 29.4 - 3.5 >= squeezed.page_in_ms >= 0.85 * (29.4 - 3.5)
    assert H100_PCIE_BYTES_PER_S == 52.8e9
    # The chapter's scenario: a spike that the states can absorb, on a GPU that is too small without paging.
    spiky = qlora_7b_example(spike_bytes=1063 * MiB)
    assert simulate_step(spiky, 7000 * MiB, paged=False).oom
    assert not simulate_step(spiky, 7000 * MiB, paged=True).oom
    assert simulate_step(qlora_7b_example(spike_bytes=3000 * MiB), 7000 * MiB, paged=True).oom


def test_plot_timeline_makes_labelled_figures_without_a_display():
    from matplotlib.figure import Figure

    memory = uniform_step(spike=300)
    for capacity, paged in ((2200, True), (2200, False), (5000, True)):
        fig = Figure()
        ax = fig.add_subplot()
        assert plot_timeline(simulate_step(memory, capacity, paged=paged), ax) is ax
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
        assert ("OOM" in ax.get_title()) == (not paged)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = plot_timeline(simulate_step(memory, 2200, paged=True))
    assert "paging" in ax.get_title()
    plt.close(ax.figure)


def test_paging_guards():
    with pytest.raises(ValueError, match="state_bytes"):
        uniform_step(small=500)
    with pytest.raises(ValueError, match="weights_bytes"):
        uniform_step(weights=-1)
    with pytest.raises(ValueError, match="at least one layer"):
        StepMemory(1, 1, 1, ())
    with pytest.raises(TypeError, match="memory"):
        simulate_step({"weights": 1}, 100, paged=True)
    with pytest.raises(ValueError, match="gpu_bytes"):
        simulate_step(uniform_step(), 0, paged=True)
    with pytest.raises(TypeError, match="paged"):
        simulate_step(uniform_step(), 100, paged="yes")
    with pytest.raises(TypeError, match="ax"):
        plot_timeline(simulate_step(uniform_step(), 5000, paged=True), ax="axes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the guard on a machine without CUDA")
def test_paging_demo_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        paging_demo_cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_paged_adamw_survives_a_pool_cap_that_stops_torch_adamw():
    before = torch.cuda.get_per_process_memory_fraction() if hasattr(torch.cuda, "get_per_process_memory_fraction") \
        else None
    result = paging_demo_cuda(n_params=8_000_000, steps=3)
    assert result["state_bytes"] <= 0.25 * result["free_bytes_before"]
    assert result["adamw_oom"], result
    assert result["paged_ok"] and result["states_paged"] == [True, True], result
    assert len(result["paged_step_ms"]) == 3
    if before is not None:
        assert torch.cuda.get_per_process_memory_fraction() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw8bit_runs_on_cuda_like_on_the_cpu():
    # Not bit for bit (CUDA may fuse multiply-adds): each of 10 steps moves a parameter by at most lr, so a
    # gap under 5% of that total movement means the same update on the GPU, states on the GPU.
    lr, steps = 1e-3, 10
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    cpu = [torch.nn.Parameter(t.clone()) for t in init]
    gpu = [torch.nn.Parameter(t.cuda()) for t in init]
    opt_cpu, opt_gpu = AdamW8bit(cpu, lr=lr), AdamW8bit(gpu, lr=lr)
    for step_grads in grads:
        for p, q, gr in zip(cpu, gpu, step_grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.cuda()
        opt_cpu.step()
        opt_gpu.step()
    for p, q in zip(cpu, gpu, strict=True):
        assert all(t.is_cuda for t in optimizer_states(opt_gpu, q).values())
        assert (p.detach() - q.detach().cpu()).abs().max() <= 0.05 * lr * steps
