"""Chapter 11: sharded QLoRA on PyTorch FSDP, modelled (qlora_edu.ch11_fsdp.sharding, chapter 4's training_memory with
``sharding="fsdp"``) and run for real (qlora_edu.ch11_fsdp.fsdp_run) on two CPU processes with gloo.

* the battery: ``per_gpu_static`` against the bytes each rank of a real FSDP2 run holds;
* the run: the sharded loss curve equals the single-process one on the same batches (|diff| <= 1e-3: AdamW divides
  by sqrt(v), so float noise on near-zero gradients, which differs with the batch split, becomes lr-sized steps),
  each rank holds the bytes the model predicts, the adapters saved by rank 0 reload to the same logits;
* ``bnb_4bit_quant_storage``: FSDP1 refuses bitsandbytes' uint8 codes and takes the same bytes stored as bf16;
* ``training_memory(..., world_size, sharding, cpu_offload)``: unchanged by default, and what it adds.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from chapter_battery import battery_tests, control_passes

from qlora_edu.ch04_memory.memory import llama_config, static_tensors, training_memory
from qlora_edu.ch07_qlora.tools import tiny_llama_config
from qlora_edu.ch11_fsdp.fsdp_run import ShardableNF4Linear, build_model, run_summary, store_4bit_as
from qlora_edu.ch11_fsdp.sharding import per_gpu_static, sharded_units, step_traffic

test_battery_on_package, test_battery_on_solution, test_known_mistake_is_caught = battery_tests("11_fsdp")


def test_mistakes_reimplementation_passes_with_every_switch_off():
    import importlib

    checks = importlib.import_module("qlora_edu.ch11_fsdp.checks")
    assert control_passes("per_gpu_static", lambda tensors, world_size, **kw: checks._per_gpu_static(
        tensors, world_size, **kw))


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    """Both layers (bitsandbytes + peft, the course's) trained 4 steps on 2 gloo processes and on one."""
    return run_summary(2, steps=4, out_dir=tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("layer", ["bnb", "course"])
def test_sharded_loss_curve_equals_single_process(summary, layer):
    job = summary["jobs"][layer]
    assert len(job["sharded_losses"]) == 4
    assert job["max_loss_diff"] <= 1e-3, job
    assert job["sharded_losses"][-1] < job["sharded_losses"][0]  # it trains


@pytest.mark.parametrize("layer", ["bnb", "course"])
def test_adapters_saved_by_rank0_reload_to_the_same_logits(summary, layer):
    assert summary["jobs"][layer]["reload_max_logit_diff"] <= 1e-6


def test_each_rank_holds_the_predicted_shard_bnb(summary):
    """bitsandbytes + peft: every rank holds exactly per_gpu_static's bytes (the NF4 constants whole)."""
    job = summary["jobs"]["bnb"]
    predicted = per_gpu_static(static_tensors(tiny_llama_config(), "qlora", lora_r=8, prepare_kbit=False,
                                              device="cpu"), 2)
    whole = per_gpu_static(static_tensors(tiny_llama_config(), "qlora", lora_r=8, prepare_kbit=False,
                                          device="cpu"), 1)
    assert job["whole_bytes"]["frozen_weights"] == whole["frozen_weights"]
    for held in job["rank_bytes"]:
        assert {k: held[k] for k in predicted if k != "host"} == {k: v for k, v in predicted.items() if k != "host"}


def test_each_rank_holds_half_of_the_course_layer(summary):
    """The course's layer keeps its constants as parameters too: only the 0-d offsets and the rotary buffers stay
    whole, everything else is halved."""
    job = summary["jobs"]["course"]
    whole, held = job["whole_bytes"], job["rank_bytes"][0]
    kept_whole = 14 * 4 + 2 * 64  # 14 float32 offsets, the two rotary buffers
    assert held["frozen_weights"] == (whole["frozen_weights"] - kept_whole) // 2 + kept_whole
    assert held["trainable_weights"] == whole["trainable_weights"] // 2
    assert held["optimizer_states"] == job["single_held_bytes"]["optimizer_states"] // 2


def _fsdp1_wrap(model):
    """Wrap with FSDP1 (peft's auto-wrap policy) in a one-process gloo group; FSDP1 flattens at wrap time."""
    import tempfile

    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        try:
            return FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), device_id=torch.device("cpu"))
        finally:
            dist.destroy_process_group()


def test_fsdp1_needs_quant_storage_in_a_float_dtype():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="Cannot flatten integer dtype tensors"):
            _fsdp1_wrap(build_model("bnb", torch.uint8))
        wrapped = _fsdp1_wrap(build_model("bnb", torch.bfloat16))
    assert {p.dtype for p in wrapped.parameters()} == {torch.bfloat16, torch.float32}


def test_store_4bit_as_is_bitsandbytes_quant_storage():
    """The same bytes bitsandbytes makes with quant_storage=bf16, and the same layer output."""
    from qlora_edu.common.training_setup import to_bnb_linear4bit

    torch.manual_seed(0)
    base = torch.nn.Linear(128, 64, bias=False)
    ours = store_4bit_as(torch.nn.Sequential(to_bnb_linear4bit(base)), torch.bfloat16)[0]
    import bitsandbytes as bnb

    packed, _ = bnb.functional.quantize_4bit(base.weight.detach(), blocksize=64, compress_statistics=True,
                                             quant_type="nf4", quant_storage=torch.bfloat16)
    assert ours.weight.dtype == torch.bfloat16 and ours.weight.shape == packed.shape == (128 * 64 // 4, 1)
    assert torch.equal(ours.weight.data.view(torch.uint8), packed.view(torch.uint8))
    x = torch.randn(3, 128)
    assert torch.equal(ours(x), to_bnb_linear4bit(base)(x))


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_shardable_nf4_linear_holds_parameters_and_computes_the_same(storage):
    from qlora_edu.ch07_qlora.qlora import NF4Linear

    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(128, 64, bias=False))
    shardable = ShardableNF4Linear.from_nf4_linear(layer, storage)
    assert {n for n, _ in shardable.named_parameters()} == {"packed", "absmax", "absmax2"}
    assert {n for n, _ in shardable.named_buffers()} == {"offset"}
    assert all(p.dtype == storage and not p.requires_grad for p in shardable.parameters())
    x = torch.randn(3, 128)
    assert torch.equal(shardable(x), layer(x))


def test_shardable_nf4_linear_rejects_bad_arguments():
    from qlora_edu.ch07_qlora.qlora import NF4Linear

    layer = NF4Linear.from_linear(torch.nn.Linear(128, 64, bias=False))
    with pytest.raises(TypeError, match="layer"):
        ShardableNF4Linear.from_nf4_linear(torch.nn.Linear(4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match="storage"):
        ShardableNF4Linear.from_nf4_linear(layer, torch.int32)


# ----------------------------------------------------------------------------------------------
# training_memory with sharding


def test_training_memory_default_is_unchanged():
    config = llama_config("7B")
    a = training_memory(config, "qlora", batch_size=1, seq_len=512)
    b = training_memory(config, "qlora", batch_size=1, seq_len=512, world_size=1, sharding="none", cpu_offload=False)
    assert a == b


def test_training_memory_fsdp_static_parts():
    """The static parts are per_gpu_static's, plus the whole units gathered at the peak in frozen_weights."""
    config = llama_config("65B")
    kw = dict(batch_size=1, seq_len=1024, lora_r=64)
    for n in (2, 4, 8):
        pred = training_memory(config, "qlora", world_size=n, sharding="fsdp", **kw)
        tensors = static_tensors(config, "qlora", lora_r=64, prepare_kbit=False)
        parts, units = per_gpu_static(tensors, n), sharded_units(tensors)
        assert pred.optimizer_states == pytest.approx(parts["optimizer_states"], rel=1e-3)
        assert pred.trainable_weights == pytest.approx(parts["trainable_weights"], rel=1e-3)
        assert pred.frozen_weights == pytest.approx(parts["frozen_weights"] + units.gathered, rel=1e-3)
    totals = [training_memory(config, "qlora", world_size=n, sharding="fsdp", **kw).total for n in (2, 4, 8)]
    assert totals[0] > totals[1] > totals[2]
    one = training_memory(config, "qlora", prepare_kbit=False, **kw).total
    assert totals[0] < one
    off = training_memory(config, "qlora", world_size=2, sharding="fsdp", cpu_offload=True, **kw)
    assert off.total < totals[0] and off.optimizer_states == 0


def test_training_memory_sharding_guard():
    config = llama_config("7B")
    with pytest.raises(ValueError, match="sharding"):
        training_memory(config, "qlora", batch_size=1, seq_len=64, world_size=2)
    with pytest.raises(ValueError, match="sharding"):
        training_memory(config, "qlora", batch_size=1, seq_len=64, sharding="zero3")
    with pytest.raises(ValueError, match="world_size"):
        training_memory(config, "qlora", batch_size=1, seq_len=64, world_size=0, sharding="fsdp")


def test_step_traffic_counts_two_gathers_per_layer():
    units = sharded_units(static_tensors(llama_config("7B"), "qlora", lora_r=64, prepare_kbit=False))
    t = step_traffic(units, 2)
    layers = units.all_params - units.root_params
    assert t["all_gather"] == round((2 * layers + units.root_params) / 2)
    assert t["reduce_scatter"] == round(units.trainable / 2)
    assert step_traffic(units, 1)["all_gather"] == 0
