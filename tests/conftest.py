"""Shared fixtures and markers.

* ``@pytest.mark.gpu``: the test needs a CUDA device; without one it is skipped, and the skip says why.
* ``@pytest.mark.slow``: the test loads the real base model (seconds to a minute on two CPU cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}); "
              "this test needs a GPU (run `make test-gpu` on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def notebook_impl():
    """Namespace of a notebook's exercise functions laid over the package, executed once per notebook."""
    from qlora_edu.checks import overlay
    from qlora_edu.checks.notebooks import notebook_functions

    cache: dict[Path, object] = {}

    def load(path: Path):
        if path not in cache:
            cache[path] = overlay(notebook_functions(path))
        return cache[path]

    return load


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding a 2-layer random Llama with the course model's real tokenizer (chapters 8 and 9 train and
    generate with it in seconds). Every dimension a multiple of 64: bitsandbytes 0.50.2 dequantizes some other
    shapes wrongly on AVX512 CPUs; the real vocabulary, so the real tokenizer and chat template work."""
    from transformers import LlamaForCausalLM

    from qlora_edu.ch07_qlora.tools import tiny_llama_config
    from qlora_edu.ch08_finetune.instruct_data import load_tokenizer

    config = tiny_llama_config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=32, max_position_embeddings=256, bos_token_id=1,
                               eos_token_id=2, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    with torch.random.fork_rng(devices=[]):  # leave the tests' random state as it was
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path
