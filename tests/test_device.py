"""qlora_edu.common.device: the device/dtype rule, with the GPUs simulated by monkeypatching torch.cuda."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qlora_edu.common import device as dev
from qlora_edu.common.device import Compute, gpu_available, pick_compute, skip_reason_no_gpu


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    """Tests must not depend on the developer's own overrides."""
    monkeypatch.delenv(dev.DEVICE_ENV, raising=False)
    monkeypatch.delenv(dev.DTYPE_ENV, raising=False)


def fake_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """Make torch.cuda report one GPU of the given name and compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: capability >= (8, 0))


def no_gpu(monkeypatch, native_bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native_bf16)


def test_a100_gets_bf16(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))
    c = pick_compute()
    assert c.device == torch.device("cuda") and c.dtype == torch.bfloat16
    assert "A100" in c.reason and "8.0" in c.reason


def test_t4_gets_fp16_and_says_why(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    c = pick_compute()
    assert c.device.type == "cuda" and c.dtype == torch.float16
    assert "no bf16 support" in c.reason and "T4 and V100" in c.reason and "7.5" in c.reason


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_dtype_follows_native_bf16(monkeypatch, native, expected):
    no_gpu(monkeypatch, native)
    c = pick_compute()
    assert c.device == torch.device("cpu") and c.dtype == expected
    assert c.reason.startswith("no CUDA device")


def test_describe_and_str(monkeypatch):
    no_gpu(monkeypatch, False)
    c = pick_compute()
    assert str(c) == c.describe() == f"Running on cpu with torch.float32: {c.reason}"


def test_compute_is_frozen():
    c = Compute(torch.device("cpu"), torch.float32, "test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dtype = torch.float16  # type: ignore[misc]


def test_env_overrides(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA A100", (8, 0))
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")
    monkeypatch.setenv(dev.DTYPE_ENV, "float32")
    c = pick_compute()
    assert c.device.type == "cpu" and c.dtype == torch.float32
    assert dev.DTYPE_ENV in c.reason


def test_argument_wins_over_env(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA A100", (8, 0))
    monkeypatch.setenv(dev.DEVICE_ENV, "cpu")
    monkeypatch.setenv(dev.DTYPE_ENV, "float32")
    c = pick_compute("cuda", dtype="float16")
    assert c.device.type == "cuda" and c.dtype == torch.float16
    assert "argument dtype" in c.reason


def test_env_value_is_case_insensitive(monkeypatch):
    no_gpu(monkeypatch, True)
    monkeypatch.setenv(dev.DTYPE_ENV, "Float32")
    assert pick_compute().dtype == torch.float32


@pytest.mark.parametrize("env, value, allowed", [
    (dev.DEVICE_ENV, "gpu", "cpu, cuda"),
    (dev.DTYPE_ENV, "fp16", "float32, bfloat16, float16"),
])
def test_bad_env_value_names_variable_and_allowed(monkeypatch, env, value, allowed):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=env) as info:
        pick_compute()
    assert allowed in str(info.value) and repr(value) in str(info.value)


def test_bad_argument_names_argument():
    with pytest.raises(ValueError, match="argument prefer must be one of cpu, cuda"):
        pick_compute("tpu")
    with pytest.raises(ValueError, match="argument dtype"):
        pick_compute(dtype="int8")


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    no_gpu(monkeypatch, False)
    with pytest.raises(RuntimeError, match="asks for cuda, but torch.cuda.is_available"):
        pick_compute("cuda")
    monkeypatch.setenv(dev.DEVICE_ENV, "cuda")
    with pytest.raises(RuntimeError, match=dev.DEVICE_ENV):
        pick_compute()


def test_gpu_helpers(monkeypatch):
    no_gpu(monkeypatch, False)
    assert gpu_available() is False
    assert "no CUDA device" in skip_reason_no_gpu()
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    assert gpu_available() is True and skip_reason_no_gpu() is None


def test_cpu_native_bf16_reads_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert dev.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True})
    assert dev.cpu_has_native_bf16() is False


def test_real_machine_choice_is_consistent():
    """On whatever machine runs the tests, the choice must be one of the rule's four outcomes."""
    c = pick_compute()
    allowed = {("cuda", torch.bfloat16), ("cuda", torch.float16),
               ("cpu", torch.bfloat16), ("cpu", torch.float32)}
    assert (c.device.type, c.dtype) in allowed
    assert (c.device.type == "cuda") == gpu_available()
