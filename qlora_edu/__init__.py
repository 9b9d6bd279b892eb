"""qlora_edu: the companion package of the QLoRA course.

Every function a learner writes in the exercises lives here, under the same name, and is checked by
the same test battery (:mod:`qlora_edu.checks`) against bitsandbytes, peft and torch.

One concept a module; the chapter that teaches it in brackets:

* :mod:`~qlora_edu.absmax` (1) absmax block quantization to signed integers
* :mod:`~qlora_edu.nf4` (2) the NF4, FP4 and Int4 code tables; :mod:`~qlora_edu.packing` two codes a byte;
  :mod:`~qlora_edu.quant4bit` blockwise 4-bit quantization; :mod:`~qlora_edu.fast4bit` the same, fast, per device
* :mod:`~qlora_edu.double_quant` (3) quantizing the constants; :mod:`~qlora_edu.nf4_tensor` a weight as QLoRA
  stores it; :mod:`~qlora_edu.storage` bits per parameter and gigabytes
* :mod:`~qlora_edu.memory` (4), :mod:`~qlora_edu.optim` and :mod:`~qlora_edu.paging` (5),
  :mod:`~qlora_edu.lora` (6), :mod:`~qlora_edu.qlora` (7), :mod:`~qlora_edu.finetune` (8), as they are written

and around them: :mod:`~qlora_edu.base_model` (the offline SmolLM2-135M base model), :mod:`~qlora_edu.device`
(which device and dtype a notebook runs on), :mod:`~qlora_edu.settings` (the environment variables, read in one
place), :mod:`~qlora_edu.validation` (argument checks), :mod:`~qlora_edu.checks` (the test battery).

``from qlora_edu import quantize_nf4`` works for every public name of every module: each module lists its
public names in ``__all__``, and the package imports a module the first time one of its names is asked for.
So ``import qlora_edu`` itself loads nothing but this file (no torch, no transformers, no test tooling), and a
new chapter's module needs no line here.
"""

from __future__ import annotations

import ast
import importlib
from functools import cache
from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent


@cache
def _public_names() -> dict[str, str]:
    """``{name: module}`` for every name in the ``__all__`` of a top-level module of the package.

    Read from the source files with :mod:`ast` rather than by importing them: importing ``base_model`` alone
    loads transformers (seconds), and a learner asking for ``absmax_quantize`` should not pay for that.
    """
    index: dict[str, str] = {}
    for path in sorted(_HERE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = f"{__name__}.{path.stem}"
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                for name in ast.literal_eval(node.value):
                    if name in index:
                        raise ImportError(f"{name!r} is exported by both {index[name]} and {module}")
                    index[name] = module
    return index


def __getattr__(name: str):
    module = _public_names().get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_public_names()})


def check(*functions, verbose: bool = True, raise_on_failure: bool = True) -> bool:
    """Run the course's test battery against the functions you wrote: ``check(absmax_quantize)``.

    Prints a report (one line a case, the first failure in full with a hint) and returns True when every case
    passed; raises :class:`qlora_edu.checks.ChecksFailed` after the report when one failed, unless
    ``raise_on_failure`` is False. See :func:`qlora_edu.checks.check`.
    """
    from qlora_edu.checks import check as run_check

    return run_check(*functions, verbose=verbose, raise_on_failure=raise_on_failure)
