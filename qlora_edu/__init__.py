"""qlora_edu: the companion package of the QLoRA course.

Every function a learner writes in the exercises lives here, under the same name, and is checked by
the same test battery (:mod:`qlora_edu.checks`) against bitsandbytes, peft and torch.

One package a chapter, named as the chapter's notebooks are (``ch02_nf4`` for ``notebooks/02_nf4.ipynb``):

* :mod:`~qlora_edu.ch01_absmax` absmax block quantization to signed integers
* :mod:`~qlora_edu.ch02_nf4` the NF4, FP4 and Int4 code tables, packing, blockwise 4-bit quantization (and a fast
  path per device)
* :mod:`~qlora_edu.ch03_double_quant` quantizing the constants, ``NF4Tensor``, bits per parameter
* :mod:`~qlora_edu.ch04_memory` the memory formula and the probes that measure it
* :mod:`~qlora_edu.ch05_optimizers` AdamW, 8-bit AdamW, paging
* :mod:`~qlora_edu.ch06_lora` LoRA; :mod:`~qlora_edu.ch07_qlora` QLoRA from scratch;
  :mod:`~qlora_edu.ch08_finetune` the fine-tune; :mod:`~qlora_edu.ch09_labs` the labs

Each chapter package holds its teaching module(s), its guards (``guards.py``), its test battery (``checks.py``)
and an ``__init__.py`` whose ``CHAPTER`` declares the chapter's facts. Code every chapter shares lives in
:mod:`~qlora_edu.common` (settings, device, base model, progress bars, guard primitives, the chapter manifests,
the reference facts, the pre-flight check); :mod:`~qlora_edu.checks` runs the batteries.

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

# No network at import: bitsandbytes, when something first imports it, must not ask the Hub for a CPU kernel
# (qlora_edu/common/offline.py). Cheap: an import hook that finds nothing, no library loaded here.
from qlora_edu.common.offline import install as _install_offline  # noqa: E402

_install_offline()

_HERE = Path(__file__).resolve().parent


@cache
def _public_names() -> dict[str, str]:
    """``{name: module}`` for every name in the ``__all__`` of a module of a chapter package or of ``common``.

    Read from the source files with :mod:`ast` rather than by importing them: importing ``base_model`` alone
    loads transformers (seconds), and a learner asking for ``absmax_quantize`` should not pay for that.
    """
    index: dict[str, str] = {}
    for path in sorted([*_HERE.glob("ch[0-9][0-9]_*/*.py"), *_HERE.glob("common/*.py")]):
        if path.name.startswith("_"):
            continue
        module = f"{__name__}.{path.parent.name}.{path.stem}"
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
    # Looked up by name, like every other name of this index: the battery imports the package (for the functions
    # a learner has not written), so a static import here would make the two import each other.
    run_check = importlib.import_module(f"{__name__}.checks").check
    return run_check(*functions, verbose=verbose, raise_on_failure=raise_on_failure)
