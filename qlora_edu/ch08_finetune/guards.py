"""Guards of :mod:`qlora_edu.ch08_finetune.instruct_data` (the task's data, labels and scores) and
:mod:`qlora_edu.ch08_finetune.finetune`
(the fine-tune): one ``check_<function>_args`` a public function."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from qlora_edu.ch07_qlora.guards import check_compute_dtype
from qlora_edu.ch08_finetune.config import FinetuneConfig
from qlora_edu.common.device import Compute
from qlora_edu.common.guards import (
    check_bool,
    check_choice,
    check_device,
    check_instance,
    check_int,
    check_number,
    check_tensor,
)

METHODS = ("peft", "scratch")


# ----------------------------------------------------------------------------------------------
# primitives of this module


def check_path(name: str, value: object) -> Path:
    """``value`` must be a ``str`` or ``os.PathLike`` (not empty); returns a ``Path``."""
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or a path, got {type(value).__name__}")
    if str(value) == "":
        raise ValueError(f"{name} must not be empty")
    return Path(value)


def check_tokenizer(tokenizer: object) -> object:
    """``tokenizer`` must have a chat template (``apply_chat_template``) and an end token (``eos_token_id``)."""
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise TypeError(f"tokenizer must be a transformers tokenizer with a chat template, got "
                        f"{type(tokenizer).__name__}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("tokenizer must define eos_token_id (the token that ends the assistant's reply)")
    return tokenizer


def check_examples(examples: object) -> list:
    """``examples`` must be a non-empty list/tuple of :class:`qlora_edu.ch08_finetune.instruct_data.Example`: records
    with a str ``message`` and a dict ``answer``, checked by those fields (this module sits below the one that
    defines the class)."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(f"examples must be a list of Example, got {type(examples).__name__}")
    if len(examples) == 0:
        raise ValueError("examples must not be empty")
    bad = next((i for i, e in enumerate(examples)
                if not (isinstance(getattr(e, "message", None), str) and isinstance(getattr(e, "answer", None), dict))),
               None)
    if bad is not None:
        raise TypeError(f"examples must hold Example objects; examples[{bad}] is {type(examples[bad]).__name__}")
    return list(examples)


def check_model(model: object) -> nn.Module:
    """``model`` must be a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_trainable_model(model: object) -> nn.Module:
    """A model with at least one parameter that requires grad (the adapters)."""
    check_model(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameter: add adapters first (load_qlora_model / prepare_qlora)")
    return model


def check_optimizer(optimizer: object) -> torch.optim.Optimizer:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def check_bools(name: str, value: object) -> list[bool]:
    """A non-empty sequence of bools (per-item correctness)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of bools, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    if not all(isinstance(x, bool) for x in value):
        raise TypeError(f"{name} must hold only bools (True/False)")
    return list(value)


# ----------------------------------------------------------------------------------------------
# instruct_data


def check_generate_dataset_args(seed: object, n_train: object, n_heldout: object) -> None:
    check_int("seed", seed, low=0)
    check_int("n_train", n_train, low=1)
    check_int("n_heldout", n_heldout, low=1)


def check_write_dataset_args(directory: object) -> Path:
    return check_path("directory", directory)


def check_load_dataset_args(split: object, directory: object, splits: tuple[str, ...]) -> tuple[str, Path]:
    check_choice("split", split, splits)
    path = check_path("directory", directory)
    file = path / f"orders_{split}.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"directory {path} has no {file.name}; write it with "
                                "`python scripts/make_finetune_data.py`")
    return split, path


def check_load_tokenizer_args(name_or_path: object) -> None:
    if name_or_path is not None:
        check_path("name_or_path", name_or_path)


def check_build_messages_args(example: object, with_response: object) -> None:
    check_examples([example])
    check_bool("with_response", with_response)


def check_encode_example_args(tokenizer: object, example: object) -> None:
    check_tokenizer(tokenizer)
    check_examples([example])


def check_mask_prompt_labels_args(input_ids: object, prompt_lengths: object, attention_mask: object) -> None:
    """``input_ids`` ``(B, T)`` int64; ``prompt_lengths`` ``(B,)`` int64 in ``[0, row length]``;
    ``attention_mask`` ``(B, T)`` of 0/1 (int or bool), right-padded (each row: ones, then zeros); one device."""
    check_tensor("input_ids", input_ids)
    check_tensor("prompt_lengths", prompt_lengths)
    check_tensor("attention_mask", attention_mask)
    if input_ids.dtype != torch.long or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (B, T) int64 tensor, got shape {tuple(input_ids.shape)} "
                         f"dtype {input_ids.dtype}")
    batch, _ = input_ids.shape
    if prompt_lengths.dtype != torch.long or tuple(prompt_lengths.shape) != (batch,):
        raise ValueError(f"prompt_lengths must be an int64 tensor of shape ({batch},), one length a row, got shape "
                         f"{tuple(prompt_lengths.shape)} dtype {prompt_lengths.dtype}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype not in (torch.bool, torch.long, torch.int32, torch.int8, torch.uint8):
        raise TypeError(f"attention_mask must hold 0/1 as an integer or bool tensor, got dtype {attention_mask.dtype}")
    if len({input_ids.device, prompt_lengths.device, attention_mask.device}) > 1:
        raise ValueError(f"input_ids, prompt_lengths and attention_mask must be on one device, got "
                         f"{input_ids.device}, {prompt_lengths.device}, {attention_mask.device}")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("attention_mask must be right-padded: each row 1...1 then 0...0 (is the batch left-padded?)")
    lengths = mask.sum(dim=1)
    if bool((prompt_lengths < 0).any()) or bool((prompt_lengths > lengths).any()):
        row = int(((prompt_lengths < 0) | (prompt_lengths > lengths)).nonzero()[0])
        raise ValueError(f"prompt_lengths must be in [0, row length]; row {row} has prompt length "
                         f"{int(prompt_lengths[row])} but {int(lengths[row])} tokens")


def check_collate_examples_args(tokenizer: object, examples: object) -> None:
    check_tokenizer(tokenizer)
    check_examples(examples)


def check_parse_answer_args(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def check_score_answers_args(replies: object, examples: object) -> None:
    if isinstance(replies, (str, bytes)) or not isinstance(replies, Sequence):
        raise TypeError(f"replies must be a list of str, got {type(replies).__name__}")
    if not all(isinstance(r, str) for r in replies):
        raise TypeError("replies must hold only str")
    examples = check_examples(examples)
    if len(replies) != len(examples):
        raise ValueError(f"replies and examples must have the same length, got {len(replies)} and {len(examples)}")


def check_field_accuracy_args(replies: object, examples: object) -> None:
    check_score_answers_args(replies, examples)


def check_sign_test_p_value_args(before: object, after: object) -> None:
    before, after = check_bools("before", before), check_bools("after", after)
    if len(before) != len(after):
        raise ValueError(f"before and after must score the same items, got {len(before)} and {len(after)}")


def check_paired_bootstrap_args(before: object, after: object, n_resamples: object, level: object,
                                seed: object) -> None:
    before, after = check_bools("before", before), check_bools("after", after)
    if len(before) != len(after):
        raise ValueError(f"before and after must score the same items, got {len(before)} and {len(after)}")
    check_int("n_resamples", n_resamples, low=1)
    check_number("level", level, low=0.0, high=1.0, low_open=True)
    check_int("seed", seed, low=0)


# ----------------------------------------------------------------------------------------------
# finetune


def _config(config: object) -> None:
    check_instance("config", config, FinetuneConfig, "paper_config() or default_config()")


def check_paper_config_args(steps: object) -> None:
    check_int("steps", steps, low=1)


def check_default_config_args(device: object, smoke: object) -> tuple[torch.device, bool | None]:
    device = check_device("device", device, available=False)  # a GPU's settings can be shown on a CPU
    if smoke is not None:
        check_bool("smoke", smoke)
    return device, smoke


def check_learning_rate_at_args(step: object, config: object) -> None:
    _config(config)
    check_int("step", step, low=0)


def check_batch_indices_args(n_examples: object, batch_size: object, step: object, seed: object) -> None:
    check_int("n_examples", n_examples, low=1)
    check_int("batch_size", batch_size, low=1)
    check_int("step", step, low=0)
    check_int("seed", seed, low=0)


def check_prepare_qlora_args(model: object, config: object, method: object, compute_dtype: object,
                             optimizers: tuple[str, ...]) -> None:
    check_model(model)
    _config(config)  # its fields were checked when it was made
    check_choice("method", method, METHODS)
    check_compute_dtype(compute_dtype)
    in_4bit = bool(getattr(model, "is_loaded_in_4bit", False))
    if method == "peft" and not in_4bit:
        raise ValueError("method='peft' needs a model loaded in 4 bits (from_pretrained with "
                         "quantization_config=bnb_config(...)); use method='scratch' for a full-precision model")
    if method == "scratch" and in_4bit:
        raise ValueError("method='scratch' quantizes the model itself: give it a full-precision model, not one "
                         "loaded in 4 bits")


def check_load_qlora_model_args(config: object, compute: object, method: object, progress: object,
                                optimizers: tuple[str, ...]) -> None:
    """``compute``: a :class:`qlora_edu.common.device.Compute` or None."""
    _config(config)  # its fields were checked when it was made
    check_bool("progress", progress)
    if compute is not None and not isinstance(compute, Compute):
        raise TypeError(f"compute must be a qlora_edu.Compute (pick_compute()), got {type(compute).__name__}")
    check_choice("method", method, METHODS)


def check_load_finetuned_args(adapter: object, compute: object, progress: object) -> Path:
    """``adapter``: a folder holding ``adapter_config.json``; ``compute``: a Compute or None."""
    path = check_path("adapter", adapter)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {path} holds no adapter_config.json (save_adapter writes one)")
    if compute is not None and not isinstance(compute, Compute):
        raise TypeError(f"compute must be a qlora_edu.Compute (pick_compute()), got {type(compute).__name__}")
    check_bool("progress", progress)
    return path


def check_build_optimizer_args(params: object, config: object, optimizers: tuple[str, ...]) -> list:
    _config(config)  # its fields were checked when it was made
    if isinstance(params, torch.Tensor) or not hasattr(params, "__iter__"):
        raise TypeError(f"params must be a list of parameters, got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError("params must not be empty: the model has no trainable parameter")
    if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ValueError("params must hold only tensors that require grad (the adapters)")
    return params


def check_atomic_directory_args(target: object) -> Path:
    path = check_path("target", target)
    if path.exists() and not path.is_dir():
        raise ValueError(f"target {path} exists and is not a folder")
    return path


def check_save_adapter_args(model: object, path: object) -> Path:
    check_trainable_model(model)
    return check_atomic_directory_args(path)


def check_save_checkpoint_args(path: object, model: object, optimizer: object, step: object, history: object,
                               config: object = None) -> Path:
    if config is not None:
        _config(config)
    check_trainable_model(model)
    check_optimizer(optimizer)
    check_int("step", step, low=0)
    if not isinstance(history, dict):
        raise TypeError(f"history must be a dict of JSON-able records, got {type(history).__name__}")
    return check_atomic_directory_args(path)


def check_load_checkpoint_args(path: object, model: object, optimizer: object) -> Path:
    path = check_path("path", path)
    check_trainable_model(model)
    check_optimizer(optimizer)
    if not path.is_dir() and not any(path.parent.glob(f".{path.name}.old-*")):
        raise FileNotFoundError(f"path {path} is not a checkpoint folder (save_checkpoint writes one)")
    return path


def check_train_args(model: object, tokenizer: object, examples: object, config: object, output_dir: object,
                     resume: object, on_step: object, progress: object, optimizers: tuple[str, ...],
                     sync_every: object = 1, profile_steps: object = 0) -> Path | None:
    check_int("sync_every", sync_every, low=1)
    check_int("profile_steps", profile_steps, low=0)
    check_trainable_model(model)
    check_tokenizer(tokenizer)
    check_examples(examples)
    _config(config)  # its fields were checked when it was made
    out = None if output_dir is None else check_path("output_dir", output_dir)
    check_bool("resume", resume)
    if resume and out is None:
        raise ValueError("resume=True needs output_dir (the folder holding the checkpoint)")
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step must be callable or None, got {type(on_step).__name__}")
    check_bool("progress", progress)
    return out


def check_evaluate_args(model: object, tokenizer: object, examples: object, batch_size: object,
                        max_new_tokens: object) -> None:
    check_model(model)
    if not callable(getattr(model, "generate", None)):
        raise TypeError(f"model must be a generative model with .generate(), got {type(model).__name__}")
    check_tokenizer(tokenizer)
    check_examples(examples)
    check_int("batch_size", batch_size, low=1)
    check_int("max_new_tokens", max_new_tokens, low=1)


def check_generate_replies_args(model: object, tokenizer: object, examples: object, batch_size: object,
                                max_new_tokens: object) -> None:
    check_evaluate_args(model, tokenizer, examples, batch_size, max_new_tokens)


def check_heldout_loss_args(model: object, tokenizer: object, examples: object, batch_size: object) -> None:
    check_model(model)
    check_tokenizer(tokenizer)
    check_examples(examples)
    check_int("batch_size", batch_size, low=1)


def check_inference_mode_args(model: object) -> None:
    check_model(model)


def check_memory_summary_args(model: object, optimizer: object, config: object, seq_len: object, device: object,
                              peak_bytes: object, optimizers: tuple[str, ...], padded: object = True) -> torch.device:
    check_model(model)
    if optimizer is not None:
        check_optimizer(optimizer)
    _config(config)  # its fields were checked when it was made
    check_int("seq_len", seq_len, low=1)
    device, _ = check_default_config_args(device, None)
    if peak_bytes is not None:
        check_int("peak_bytes", peak_bytes, low=0)
    check_bool("padded", padded)
    return device


def check_calibration_step_seconds_args(model: object, steps: object, batch_size: object, seq_len: object,
                                        seed: object) -> None:
    check_trainable_model(model)
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(f"model must be a transformers model (get_input_embeddings), got {type(model).__name__}")
    check_int("steps", steps, low=1)
    check_int("batch_size", batch_size, low=1)
    check_int("seq_len", seq_len, low=2)
    check_int("seed", seed, low=0)


def check_run_finetune_args(model: object, device: object, dtype: object, smoke: object, output_dir: object,
                            resume: object, method: object, progress: object, log: object, overwrite: object = False,
                            profile_steps: object = 0) -> None:
    """``model``: None or a hub id / folder; ``device`` / ``dtype``: None or names (checked by pick_compute)."""
    if model is not None:
        check_path("model", model)
    for name, value in (("device", device), ("dtype", dtype)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {type(value).__name__}")
    if smoke is not None:
        check_bool("smoke", smoke)
    check_path("output_dir", output_dir)
    check_bool("resume", resume)
    check_bool("overwrite", overwrite)
    if resume and overwrite:
        raise ValueError("resume (--resume) and overwrite (--overwrite) exclude each other: continue the previous run "
                         "or replace it")
    check_int("profile_steps", profile_steps, low=0)
    check_choice("method", method, METHODS)
    check_bool("progress", progress)
    if not callable(log):
        raise TypeError(f"log must be callable (print, a list's append), got {type(log).__name__}")
