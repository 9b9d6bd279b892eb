"""Chapter 4: qlora_edu.ch04_memory.memory predicts the peak memory of a training step.

Checked three ways, never against itself:

* the H100 rows of qlora_edu/reference/gpu-facts.md (measured with gpu_probe.py): totals within 5% with
  gradient checkpointing, 10% without;
* on CPU, real set-ups built as gpu_probe.py builds them (a small random Llama here, the course model in the
  ``slow`` tests): weights, quantization constants, adapters, gradients and optimizer states within 1% of the
  real tensors' bytes; activations within 10% of what ``saved_tensors_hooks`` sees autograd save; the peak
  within 5% of torch's CPU allocations over real steps (its profiler);
* on CUDA (``gpu``), a QLoRA step measured with ``torch.cuda.max_memory_allocated`` as gpu_probe.py did.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from chapter_battery import battery_tests, control_passes
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig

from qlora_edu.ch04_memory.memory import (
    COURSE_MODEL_SHAPE,
    MemoryBreakdown,
    fits,
    largest_batch_size,
    largest_model,
    largest_seq_len,
    llama_config,
    training_memory,
)
from qlora_edu.ch04_memory.memory_probe import (
    GPU_FACTS_PATH,
    H100_ROWS,
    LiveTensorBytes,
    build_training_model,
    gpu_facts_config,
    gpu_facts_rows,
    measure_training_step,
    random_batch,
    saved_activation_bytes,
    static_bytes,
    tensor_bytes,
)
from qlora_edu.checks import property_settings
from qlora_edu.common.training_setup import make_optimizer

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("04_memory")


def test_mistakes_reimplementation_passes_with_every_switch_off():
    """The known mistakes are one switch of a re-implementation; with none on it passes the battery."""
    import importlib

    checks = importlib.import_module("qlora_edu.ch04_memory.checks")
    assert control_passes("static_tensors", lambda config, method, **kw: checks._static_tensors(config, method, **kw))

# peft's prepare_model_for_kbit_training leaves use_reentrant to torch's default, which torch warns about
pytestmark = pytest.mark.filterwarnings("ignore:torch.utils.checkpoint. the use_reentrant:UserWarning")

MiB = 2**20
GiB = 2**30
STATIC = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")


def tiny_config(**kw) -> LlamaConfig:
    """A 2-layer random Llama with grouped-query attention; widths are multiples of 64 (NF4 blocks)."""
    base = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaConfig(**{**base, **kw})


def close(pred: int, meas: int, tol: float) -> bool:
    return abs(pred / meas - 1) <= tol


def predicted_static(pred: MemoryBreakdown) -> dict[str, int]:
    return {"frozen_weights": pred.frozen_weights, "trainable_weights": pred.trainable_weights,
            "gradients": pred.all_gradients, "optimizer_states": pred.optimizer_states}


# ----------------------------------------------------------------------------------------------
# 1. The measured H100 rows


@pytest.mark.parametrize("row", gpu_facts_rows(), ids=lambda r: f"{r['model']}-{r['method']}-{r['batch']}x{r['seq']}"
                         f"-ckpt{int(r['ckpt'])}-prep{int(r['prepare'])}")
def test_gpu_facts_rows(row):
    """One test per measured row of gpu-facts.md (read from the file when it is beside the repository)."""
    kw = {"prepare_kbit": row["prepare"]} if row["method"] == "qlora" else {}
    pred = training_memory(gpu_facts_config(row), row["method"], batch_size=row["batch"], seq_len=row["seq"],
                           lora_r=row["lora_r"], gradient_checkpointing=row["ckpt"], optimizer="paged_adamw", **kw)
    tol = 0.05 if row["ckpt"] else 0.10
    assert close(pred.total / MiB, row["total_mib"], tol), (pred.total / MiB, row)
    assert close(pred.torch_peak / MiB, row["torch_peak_mib"], tol), (pred.torch_peak / MiB, row)
    # the set-up (weights after prepare + adapters) and the paged states, measured before any step. The
    # set-up is what the allocator handed out: a block carved from a freed one is not split when less than
    # 1 MiB would remain, which costs 13B's 560 adapter tensors ~1% (not modeled), hence 2%.
    assert close((pred.frozen_weights + pred.trainable_weights) / MiB, row["setup_mib"], 0.02)
    assert close(pred.optimizer_states / MiB, row["states_mib"], 0.01)
    assert pred.paged_states == pred.optimizer_states  # every 7B/13B adapter has >= 1e5 elements


def test_gpu_facts_copy_matches_the_file():
    """The rows committed with the module are a faithful transcription of the in-repository gpu-facts.md, which is
    what gpu_facts_rows() reads by default."""
    assert GPU_FACTS_PATH.is_file() and "reference" in GPU_FACTS_PATH.parts, GPU_FACTS_PATH
    rows = gpu_facts_rows(GPU_FACTS_PATH)
    assert rows == gpu_facts_rows()
    assert all(row in rows for row in H100_ROWS), [row for row in H100_ROWS if row not in rows]
    assert gpu_facts_config(rows[0]).num_attention_heads == rows[0]["hidden"] // 128


def test_gpu_facts_weights_before_prepare():
    """gpu-facts.md: 7B NF4 + double quantization with bf16 embeddings and head = 3,687 MiB."""
    pred = training_memory(llama_config("7B"), "qlora", batch_size=1, seq_len=512, prepare_kbit=False)
    assert close(pred.frozen_weights / MiB, 3687, 0.005)
    pred13 = training_memory(llama_config("13B"), "qlora", batch_size=1, seq_len=512, prepare_kbit=False)
    assert close(pred13.frozen_weights / MiB, 6893, 0.005)


# ----------------------------------------------------------------------------------------------
# 2. CPU: real set-ups of a small random Llama


def predict_cpu(config, method, ckpt, batch_size, seq_len, **kw) -> MemoryBreakdown:
    if method != "full":
        kw.setdefault("prepare_kbit", method == "qlora")
    return training_memory(config, method, batch_size=batch_size, seq_len=seq_len, lora_r=8,
                           gradient_checkpointing=ckpt, device="cpu", **kw)


_SETUPS: dict[tuple, tuple] = {}


def setup(method: str, ckpt: bool):
    """(model, optimizer, measurement at batch 2 x 32), built once per session. Full fine-tuning trains in
    float32, so that torch's AdamW keeps the float32 states the model counts."""
    key = (method, ckpt)
    if key not in _SETUPS:
        wd = torch.float32 if method == "full" else torch.bfloat16
        config = tiny_config()
        model, trainable = build_training_model(config, method, lora_r=8, gradient_checkpointing=ckpt,
                                                weight_dtype=wd)
        optimizer = make_optimizer(trainable, "adamw", fused=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meas = measure_training_step(model, optimizer, random_batch(config, 2, 32), steps=2)
        _SETUPS[key] = (model, optimizer, meas, wd)
    return _SETUPS[key]


CPU_SETUPS = [("qlora", True), ("qlora", False), ("lora", True), ("full", True)]


@pytest.mark.parametrize(("method", "ckpt"), CPU_SETUPS)
def test_cpu_static_parts_match_real_tensors(method, ckpt):
    _, _, meas, wd = setup(method, ckpt)
    pred = predict_cpu(tiny_config(), method, ckpt, 2, 32, weight_dtype=wd)
    for part, value in predicted_static(pred).items():
        if meas[part] == 0:
            assert value <= 4 * 64, (part, value)  # full fine-tuning freezes only the rotary buffers
        else:
            assert close(value, meas[part], 0.01), (part, value, meas[part])


@pytest.mark.parametrize(("method", "ckpt"), CPU_SETUPS)
@pytest.mark.parametrize(("batch_size", "seq_len"), [(1, 24), (2, 32), (3, 64)])
def test_cpu_saved_activations(method, ckpt, batch_size, seq_len):
    model, _, _, wd = setup(method, ckpt)
    measured = saved_activation_bytes(model, random_batch(tiny_config(), batch_size, seq_len))
    pred = predict_cpu(tiny_config(), method, ckpt, batch_size, seq_len, weight_dtype=wd)
    assert close(pred.saved_activations, measured, 0.10), (pred.saved_activations, measured)


@pytest.mark.parametrize(("method", "ckpt"), CPU_SETUPS)
def test_cpu_peak_of_real_steps(method, ckpt):
    _, _, meas, wd = setup(method, ckpt)
    pred = predict_cpu(tiny_config(), method, ckpt, 2, 32, weight_dtype=wd)
    assert close(pred.total, meas["peak"], 0.05), (pred.total, meas["peak"], pred.peak_phase, meas["peak_op"])


@pytest.mark.parametrize(("method", "ckpt"), CPU_SETUPS)
@pytest.mark.parametrize("pad", [1, 9])
def test_cpu_saved_activations_of_a_padded_batch(method, ckpt, pad):
    """A padded batch (an attention mask with zeros, as every batch of chapter 8) makes transformers give SDPA
    an explicit mask: k and v repeated to every head and an additive mask saved by every layer. The prediction
    with ``padded=True`` is exact; without it, it is short by exactly those tensors (chapter 9's lab 8 gap)."""
    model, _, _, wd = setup(method, ckpt)
    config = tiny_config()
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention: k, v repeated
    measured = saved_activation_bytes(model, random_batch(config, 2, 32, pad=pad))
    pred = predict_cpu(config, method, ckpt, 2, 32, weight_dtype=wd, padded=True)
    assert pred.saved_activations == measured
    unpadded = predict_cpu(config, method, ckpt, 2, 32, weight_dtype=wd)
    rd = 4 if method == "qlora" or wd == torch.float32 else 2
    extra = 0 if ckpt else config.num_hidden_layers * 2 * 32 * rd * (
        2 * (config.num_attention_heads - config.num_key_value_heads) * config.head_dim + 32)
    assert measured - unpadded.saved_activations == extra


@pytest.mark.parametrize(("method", "ckpt"), [("qlora", False), ("qlora", True)])
def test_cpu_peak_of_a_padded_step(method, ckpt):
    config = tiny_config()
    model, trainable = build_training_model(config, method, lora_r=8, gradient_checkpointing=ckpt)
    optimizer = make_optimizer(trainable, "adamw", fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meas = measure_training_step(model, optimizer, random_batch(config, 2, 32, pad=7), steps=2)
    pred = predict_cpu(config, method, ckpt, 2, 32, weight_dtype=torch.bfloat16, padded=True)
    assert close(pred.total, meas["peak"], 0.05), (pred.total, meas["peak"], pred.peak_phase, meas["peak_op"])


def test_random_batch_padding():
    b = random_batch(tiny_config(), 3, 10, pad=4)
    assert b["attention_mask"][0].all() and (b["attention_mask"][1:, 6:] == 0).all()
    assert (b["labels"][1:, 6:] == -100).all() and (b["labels"][0] == b["input_ids"][0]).all()
    with pytest.raises(ValueError, match="pad"):
        random_batch(tiny_config(), 1, 10, pad=2)
    with pytest.raises(ValueError, match="pad"):
        random_batch(tiny_config(), 2, 10, pad=10)


@pytest.mark.parametrize("variant", ["eager", "no-dropout", "q-v-only", "no-prepare", "mha-tied"])
def test_cpu_saved_activations_variants(variant):
    """Other settings change what is saved: each must still match autograd."""
    config_kw, build_kw, pred_kw = {}, {}, {}
    method, ckpt = "qlora", False
    if variant == "eager":
        config_kw["attn_implementation"] = "eager"
        pred_kw["attention"] = "eager"
    elif variant == "no-dropout":
        build_kw["lora_dropout"] = pred_kw["lora_dropout"] = 0.0
    elif variant == "q-v-only":
        build_kw["lora_targets"] = pred_kw["lora_targets"] = ("q_proj", "v_proj")
    elif variant == "no-prepare":
        build_kw["prepare_kbit"] = pred_kw["prepare_kbit"] = False
    else:
        config_kw.update(num_key_value_heads=4, tie_word_embeddings=True)
        method = "lora"
    config = tiny_config(**config_kw)
    model, _ = build_training_model(config, method, lora_r=8, gradient_checkpointing=ckpt, **build_kw)
    measured = saved_activation_bytes(model, random_batch(config, 2, 40))
    pred = predict_cpu(config, method, ckpt, 2, 40, **pred_kw)
    assert close(pred.saved_activations, measured, 0.10), (variant, pred.saved_activations, measured)


def test_cpu_8bit_optimizer_states():
    """bitsandbytes' AdamW8bit: uint8 states + one float32 absmax per 256 values from 4096 elements on,
    float32 states below (r=16: the 16 x 384 and 384 x 16 adapters are 8-bit, the 16 x 128 ones are not)."""
    config = tiny_config()
    model, trainable = build_training_model(config, "qlora", lora_r=16, gradient_checkpointing=False)
    optimizer = make_optimizer(trainable, "adamw8bit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model(**random_batch(config, 1, 16)).loss
        loss.backward()
        optimizer.step()
    measured = static_bytes(model, optimizer)["optimizer_states"]
    pred = training_memory(config, "qlora", batch_size=1, seq_len=16, lora_r=16, optimizer="adamw8bit", device="cpu")
    assert close(pred.optimizer_states, measured, 0.01), (pred.optimizer_states, measured)
    fp32 = training_memory(config, "qlora", batch_size=1, seq_len=16, lora_r=16, device="cpu").optimizer_states
    assert pred.optimizer_states < 0.7 * fp32  # 3 of the 14 adapter tensors a layer are 8-bit here


def test_probe_counts_each_storage_once():
    w = torch.zeros(10, 10)
    assert tensor_bytes([w, w[2:], w.t()]) == 400
    assert tensor_bytes({"a": w, "b": [torch.zeros(3, dtype=torch.bfloat16)]}) == 406
    with pytest.raises(TypeError, match="tensors"):
        tensor_bytes(None)


def test_live_tensor_bytes_timeline():
    tracker = LiveTensorBytes()
    with tracker:
        a = torch.ones(1000)
        b = a * 2
        del a
        c = b + 1
    assert tracker.peak == 8000 and c.numel() == 1000  # a and b alive together, then b and c
    assert tracker.current == 8000
    assert "mul" in tracker.peak_op  # first reached when b was made


# ----------------------------------------------------------------------------------------------
# 3. The model's own logic: structure, monotonicity, helpers, guards


def test_breakdown_parts_add_up_and_print():
    pred = training_memory(llama_config("7B"), "qlora", batch_size=1, seq_len=512, optimizer="paged_adamw")
    assert sum(getattr(pred, p) for p in MemoryBreakdown.parts) == pred.total
    d = pred.as_dict()
    assert d["total"] == pred.total and d["torch_peak"] == pred.total - pred.paged_states
    text = str(pred)
    assert "total" in text and "GiB" in text and pred.peak_phase in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        pred.total = 0
    assert any("dropout mask" in name for name, _ in pred.layer_saved)


def test_methods_order_and_checkpointing():
    c = llama_config("7B")
    full, lora, qlora = (training_memory(c, m, batch_size=1, seq_len=512).total for m in ("full", "lora", "qlora"))
    assert qlora < lora < full
    on = training_memory(c, "qlora", batch_size=4, seq_len=512)
    off = training_memory(c, "qlora", batch_size=4, seq_len=512, gradient_checkpointing=False)
    assert on.saved_activations < off.saved_activations / 10 and on.total < off.total
    # full fine-tuning of 7B in bf16 with float32 AdamW states: 2 + 2 + 8 bytes per parameter at least
    assert full > 12 * 6.7e9


@given(batch=st.integers(1, 8), seq=st.integers(1, 1024), method=st.sampled_from(["full", "lora", "qlora"]),
       ckpt=st.booleans())
@property_settings(25)
def test_total_grows_with_batch_and_sequence(batch, seq, method, ckpt):
    """More tokens save more for backward, and never need less memory (the peak may sit at the optimizer
    step, which does not depend on the batch: for one token LoRA's all-gradients moment can be the peak)."""
    c = llama_config("course")
    kw = dict(method=method, gradient_checkpointing=ckpt)
    base = training_memory(c, batch_size=batch, seq_len=seq, **kw)
    for more in (training_memory(c, batch_size=batch + 1, seq_len=seq, **kw),
                 training_memory(c, batch_size=batch, seq_len=seq + 64, **kw)):
        assert more.saved_activations > base.saved_activations
        assert more.total >= base.total
    assert sum(getattr(base, p) for p in MemoryBreakdown.parts) == base.total


def test_settings_change_what_they_should():
    c = llama_config("7B")
    ref = training_memory(c, "qlora", batch_size=1, seq_len=2048, gradient_checkpointing=False)
    eager = training_memory(c, "qlora", batch_size=1, seq_len=2048, gradient_checkpointing=False, attention="eager")
    heads_s2 = 32 * 2048 * 2048 * 4  # the float32 softmax a layer saves ...
    fused_out = 2048 * 4096 * 4  # ... instead of the fused kernel's output (and its log-sum-exp)
    assert eager.saved_activations - ref.saved_activations >= 32 * (heads_s2 - fused_out - 32 * 2048 * 4)
    cpu = training_memory(c, "qlora", batch_size=1, seq_len=2048, gradient_checkpointing=False, device="cpu")
    assert cpu.saved_activations > ref.saved_activations  # float noise instead of a bool dropout mask
    no_dq = training_memory(c, "qlora", batch_size=1, seq_len=512, double_quant=False)
    assert no_dq.frozen_weights - ref.frozen_weights == pytest.approx(6_476_005_376 * 0.373 / 8, rel=0.01)
    fp32_master = training_memory(c, "full", batch_size=1, seq_len=512, full_precision=torch.float32)
    plain = training_memory(c, "full", batch_size=1, seq_len=512)
    assert fp32_master.trainable_weights == 3 * plain.trainable_weights
    # torch's multi-tensor AdamW: sqrt(v) for every parameter at once, on top of all the gradients
    foreach = training_memory(llama_config("course"), "full", batch_size=1, seq_len=64, foreach=True)
    assert foreach.peak_phase == "optimizer step"
    assert foreach.total > training_memory(llama_config("course"), "full", batch_size=1, seq_len=64).total
    ws = training_memory(c, "qlora", batch_size=1, seq_len=512, workspace_bytes=32 * MiB)
    assert ws.total - training_memory(c, "qlora", batch_size=1, seq_len=512).total == 32 * MiB


def test_paged_states_small_tensors_stay_in_the_pool():
    """bitsandbytes pages only states of >= 1e5 elements: the course model's r=16 adapters are smaller."""
    pred = training_memory(llama_config("course"), "qlora", batch_size=1, seq_len=64, lora_r=16,
                           optimizer="paged_adamw")
    assert pred.paged_states == 0 and pred.optimizer_states > 0
    sgd = training_memory(llama_config("course"), "qlora", batch_size=1, seq_len=64, optimizer="sgd")
    assert sgd.optimizer_states == 0


def test_llama_config_shapes():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(llama_config("7B")).parameters())
    assert n_params == 6_738_415_616  # LLaMA-1 7B as released
    for name, (h, i, layers) in {"13B": (5120, 13824, 40), "33B": (6656, 17920, 60),
                                 "65B": (8192, 22016, 80)}.items():
        c = llama_config(name)
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == (
            h, i, layers, h // 128)
        assert c.vocab_size == 32000 and not c.tie_word_embeddings
    assert llama_config("llama-7b").hidden_size == 4096
    with pytest.raises(ValueError, match="name"):
        llama_config("70B")


def test_course_config_matches_the_converted_model():
    """The hard-coded course shape equals the converted model's config.json (when the cache exists)."""
    from qlora_edu.common.base_model import cache_problem, default_cache_dir

    cache = default_cache_dir()
    if cache_problem(cache, None) is not None:
        pytest.skip(f"the converted course model is not cached at {cache}")
    on_disk = json.loads((cache / "config.json").read_text())
    assert {k: on_disk[k] for k in COURSE_MODEL_SHAPE} == COURSE_MODEL_SHAPE
    c = llama_config("course")
    assert all(getattr(c, k) == v for k, v in COURSE_MODEL_SHAPE.items())


def test_largest_fitting_helpers():
    c = llama_config("7B")
    gpu = 24 * GiB
    b = largest_batch_size(c, "qlora", gpu, seq_len=512)
    assert b >= 1
    assert training_memory(c, "qlora", batch_size=b, seq_len=512).total <= gpu
    assert training_memory(c, "qlora", batch_size=b + 1, seq_len=512).total > gpu
    n = largest_seq_len(c, "qlora", gpu, batch_size=1, multiple_of=128)
    assert n == c.max_position_embeddings  # memory allows more on 24 GiB; the model takes 2,048 tokens
    wide = llama_config("7B")
    wide.max_position_embeddings = 1 << 20  # a long-context variant of the same shape: memory is the limit
    n = largest_seq_len(wide, "qlora", gpu, batch_size=1, multiple_of=128)
    assert n % 128 == 0 and fits(wide, "qlora", gpu, batch_size=1, seq_len=n)
    assert not fits(wide, "qlora", gpu, batch_size=1, seq_len=n + 128)
    assert largest_batch_size(c, "full", gpu, seq_len=512) == 0  # 7B full fine-tuning needs far more
    assert largest_model("qlora", 48 * GiB) == "65B"  # the QLoRA paper's claim: 65B on one 48 GB card
    assert largest_model("lora", 48 * GiB) in ("7B", "13B")
    assert largest_model("full", 16 * GiB) is None
    assert fits(llama_config("course"), "qlora", 4e9, batch_size=1, seq_len=256)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"method": "qlora4"}, ValueError, "method"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"seq_len": 1.5}, TypeError, "seq_len"),
    ({"optimizer": "adafactor"}, ValueError, "optimizer"),
    ({"lora_targets": ("q_proj", "w_proj")}, ValueError, "lora_targets"),
    ({"lora_targets": "q_proj"}, TypeError, "lora_targets"),
    ({"gradient_checkpointing": 1}, TypeError, "gradient_checkpointing"),
    ({"weight_dtpye": torch.float32}, TypeError, "weight_dtpye"),
    ({"attention": "flash"}, ValueError, "attention"),
    ({"weight_dtype": torch.int8}, ValueError, "weight_dtype"),
    ({"lora_dropout": 1.0}, ValueError, "lora_dropout"),
    ({"method": "full", "prepare_kbit": True}, ValueError, "prepare_kbit"),
    ({"full_precision": torch.float32}, ValueError, "full_precision"),
    ({"device": "tpu"}, ValueError, "device"),
])
def test_guards_reject_bad_arguments(kwargs, error, match):
    args = {"method": "qlora", "batch_size": 1, "seq_len": 16, **kwargs}
    method = args.pop("method")
    with pytest.raises(error, match=match):
        training_memory(tiny_config(), method, **args)


def test_guards_reject_bad_configs_and_sizes():
    with pytest.raises(TypeError, match="config"):
        training_memory({"hidden_size": 64}, "qlora", batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        training_memory(tiny_config(num_key_value_heads=3), "qlora", batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="gpu_bytes"):
        largest_batch_size(tiny_config(), "qlora", 0, seq_len=8)
    with pytest.raises(TypeError, match="batch"):
        saved_activation_bytes(torch.nn.Linear(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="name"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], "adam")


# ----------------------------------------------------------------------------------------------
# 4. The course model (slow) and a CUDA step (gpu)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_course_model_on_cpu(method):
    """SmolLM2-135M as the course trains it: static parts (1%), saved activations (10%) with and without
    checkpointing, the peak of two real steps (5%), and its config against the hard-coded shape."""
    from qlora_edu.ch04_memory.memory_probe import course_training_model

    config = llama_config("course")
    model, trainable = course_training_model(method, lora_r=16, gradient_checkpointing=True)
    assert all(getattr(model.config, k) == v for k, v in COURSE_MODEL_SHAPE.items())
    optimizer = make_optimizer(trainable, "adamw", fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meas = measure_training_step(model, optimizer, random_batch(config, 1, 16), steps=2)
    kw = dict(lora_r=16, device="cpu", weight_dtype=torch.float32)
    pred = training_memory(config, method, batch_size=1, seq_len=16, **kw)
    for part, value in predicted_static(pred).items():
        if meas[part]:
            assert close(value, meas[part], 0.01), (part, value, meas[part])
    assert close(pred.saved_activations, meas["saved_activations"], 0.10)
    assert close(pred.total, meas["peak"], 0.05), (pred.total, meas["peak"], pred.peak_phase, meas["peak_op"])
    # without checkpointing (the input-gradient hook set up for checkpointing stays on)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_disable()
    measured = saved_activation_bytes(model, random_batch(config, 2, 32))
    pred = training_memory(config, method, batch_size=2, seq_len=32, gradient_checkpointing=False,
                           input_requires_grad=True, **kw)
    assert close(pred.saved_activations, measured, 0.10), (pred.saved_activations, measured)


@pytest.mark.gpu
@pytest.mark.parametrize(("method", "ckpt"), [("qlora", True), ("qlora", False), ("lora", True)])
def test_cuda_step_as_gpu_probe_measured(method, ckpt):
    """A random Llama on CUDA, set up and stepped as gpu_probe.py did (PagedAdamW32bit, peak over 3 steps
    of max_memory_allocated above the memory before the model was built)."""
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")  # cuBLAS workspace allocated before
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    model, trainable = build_training_model(config, method, device="cuda", lora_r=16, gradient_checkpointing=ckpt)
    optimizer = make_optimizer(trainable, "paged_adamw")
    meas = measure_training_step(model, optimizer, random_batch(config, 2, 512, device="cuda"), steps=3,
                                 baseline_bytes=base)
    pred = training_memory(config, method, batch_size=2, seq_len=512, lora_r=16, gradient_checkpointing=ckpt,
                           optimizer="paged_adamw")
    tol = 0.05 if ckpt else 0.10
    assert close(pred.total, meas["total"], tol), (pred.total, meas["total"], pred.peak_phase)
    assert close(pred.torch_peak, meas["peak"], tol), (pred.torch_peak, meas["peak"])
    for part, value in predicted_static(pred).items():
        assert close(value, meas[part], 0.02), (part, value, meas[part])
    del model, trainable, optimizer
    torch.cuda.empty_cache()
