"""What every lab of chapter 9 shares: its budget, its context, its results file, and running it by name.

A lab is a module ``labN_topic.py`` of this package that holds, top to bottom:

* ``QUESTION``: the seed notes' question it answers (one line, kept in the results file);
* ``FULL`` and ``SMOKE``: its :class:`Budget` (``SMOKE``: a few steps on a few orders, for CI);
* ``run(ctx, budget) -> dict``: the measurements, JSON-able.

:func:`run_lab` runs one and writes ``notebooks/results/labN_topic.json``::

    {"header": {"lab", "question", "mode", "model", "device", "dtype", "budget",
                "wall_seconds", "cpu_seconds", "load_average_start", "load_average_end", "cpu_count",
                "torch_threads", "versions", "platform", "command", "created_utc", "converted"},
     ...the lab's measurements...}

The header says what ran where: ``mode`` is ``"smoke"`` or ``"full"``; wall and CPU seconds of the whole lab and
the machine's 1, 5 and 15-minute load averages at its start and end (the machines the committed files come from are
shared: wall times are noisy, CPU seconds and ratios less so); ``converted`` is None for a file this module wrote,
or says how an older file's header was mapped onto this one (its unrecorded fields are None).
:func:`read_results` is the one reader: the notebook and the tests read every file through it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from qlora_edu.common import settings

__all__ = ["run_lab", "read_results", "verdicts"]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "notebooks" / "results"
#: Lab name -> its module in this package (and the stem of its results file).
LABS = {"lab1": "lab1_methods", "lab2": "lab2_rank", "lab3": "lab3_targets", "lab4": "lab4_quant",
        "lab5": "lab5_hotswap", "lab6": "lab6_merge_export", "lab7": "lab7_dynamics", "lab8": "lab8_activations",
        "lab9": "lab9_sweeps", "lab10": "lab10_seeds"}
HEADER_FIELDS = ("lab", "question", "mode", "model", "device", "dtype", "budget", "wall_seconds", "cpu_seconds",
                 "load_average_start", "load_average_end", "cpu_count", "torch_threads", "versions", "platform",
                 "command", "created_utc", "converted")
BUNDLED = "SmolLM2-135M-Instruct (bundled)"
MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class Budget:
    """How much a lab trains and how much of the held-out split it measures.

    Attributes:
        steps: optimizer steps (the same seeded batches in every trial of a lab).
        batch_size: orders a step.
        eval_size: held-out orders scored exactly by greedy generation (the first ``eval_size`` of 200).
        loss_size: held-out orders whose response loss is measured (teacher forcing, no generation).
        max_new_tokens: generation budget (a correct reply takes 32-40 tokens).
        seed: adapters' initialization, batch order, dropout.
    """

    steps: int
    batch_size: int
    eval_size: int
    loss_size: int
    max_new_tokens: int = 48
    seed: int = 0


@dataclass
class Context:
    """What the labs of one run share: the mode, the model, the device, the data and tokenizer, where files go.

    ``trials``, ``updates``, ``offered`` and ``cache_dir`` serve the trial labs (:mod:`.trials`): a fine-tune two
    labs share is trained once.
    """

    smoke: bool
    model_path: str | None
    model_name: str
    compute: object
    tokenizer: object
    train_set: list
    heldout: list
    heldout_templates: list = field(default_factory=list)  # chapter 8's split with sentences unseen in training
    progress: bool = True
    log: Callable[[str], None] | None = None
    out: Path = RESULTS
    work: Path | None = None        # where labs 5 and 6 keep the files they write (None: a temporary folder)
    cache_dir: Path | None = None   # where finished trials are kept as files (None: in memory only)
    current_lab: str = ""
    trials: dict = field(default_factory=dict)
    updates: dict = field(default_factory=dict)
    offered: set = field(default_factory=set)

    @classmethod
    def create(cls, model_path: str | Path | None = None, *, smoke: bool | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None, cache_dir: str | Path | None = None,
               work: str | Path | None = None) -> Context:
        """A context for ``model_path`` (None: the bundled model or ``$QLORA_EDU_MODEL``) on the course's device
        (:func:`~qlora_edu.common.device.pick_compute`); ``smoke`` defaults to ``$QLORA_EDU_SMOKE``."""
        from qlora_edu.ch08_finetune.instruct_data import load_dataset, load_tokenizer
        from qlora_edu.common.device import pick_compute

        model_path = None if model_path is None else str(model_path)
        return cls(smoke=settings.smoke_mode() if smoke is None else bool(smoke), model_path=model_path,
                   model_name=model_path or settings.model_override() or BUNDLED, compute=pick_compute(),
                   tokenizer=load_tokenizer(model_path), train_set=load_dataset("train"),
                   heldout=load_dataset("heldout"), heldout_templates=load_dataset("heldout_templates"),
                   progress=progress, log=log,
                   cache_dir=None if cache_dir is None else Path(cache_dir), work=None if work is None else Path(work))

    def say(self, line: str) -> None:
        """Report progress (``log``, when given)."""
        if self.log is not None:
            self.log(line)


def lab_module(name: str):
    """The module of lab ``name`` (``"lab1"`` ... ``"lab9"``)."""
    if name not in LABS:
        raise ValueError(f"lab must be one of {', '.join(LABS)}, got {name!r}")
    return importlib.import_module(f"{__package__}.{LABS[name]}")


def results_path(name: str, out: str | Path = RESULTS) -> Path:
    """Where lab ``name`` writes its results in ``out``."""
    if name not in LABS:
        raise ValueError(f"lab must be one of {', '.join(LABS)}, got {name!r}")
    return Path(out) / f"{LABS[name]}.json"


def versions() -> dict[str, str]:
    """The libraries the labs measure with."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version()}


def run_lab(name: str, ctx: Context | None = None, *, out: str | Path = RESULTS) -> Path:
    """Run lab ``name`` in ``ctx`` (default: a fresh :meth:`Context.create`) and write its results file into
    ``out``; returns the file's path."""
    import torch

    module = lab_module(name)
    ctx = Context.create() if ctx is None else ctx
    budget = module.SMOKE if ctx.smoke else module.FULL
    ctx.current_lab, ctx.out = name, Path(out)
    load = os.getloadavg()
    began, cpu_began = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers.*")  # on a CPU: the same update, unpaged
        warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*")
        body = module.run(ctx, budget)
    flags = (" --smoke" if ctx.smoke else "") + (f" --model {ctx.model_path}" if ctx.model_path else "")
    header = {"lab": name, "question": module.QUESTION, "mode": "smoke" if ctx.smoke else "full",
              "model": ctx.model_name, "device": ctx.compute.device.type,
              "dtype": str(ctx.compute.dtype).removeprefix("torch."), "budget": asdict(budget),
              "wall_seconds": round(time.perf_counter() - began, 1),
              "cpu_seconds": round(time.process_time() - cpu_began, 1),
              "load_average_start": [round(x, 2) for x in load],
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "versions": versions(),
              "platform": platform.platform(), "command": f"python -m qlora_edu.ch09_labs {name}{flags}",
              "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "converted": None}
    return write_results(results_path(name, out), header, body)


def write_results(path: str | Path, header: dict, body: dict) -> Path:
    """Write ``{"header": header, **body}`` to ``path`` atomically (a reader never sees half a file)."""
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing or "header" in body:
        raise ValueError(f"header lacks {missing}" if missing else "body must not hold a 'header' key")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"header": {k: header[k] for k in HEADER_FIELDS}, **body}, indent=1,
                              allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_results(path: str | Path) -> dict:
    """A lab's results file: ``{"header": {...}, ...measurements...}``, its header checked to hold every field of
    :data:`HEADER_FIELDS` (a field its run did not record is None) and ``mode`` to be ``"smoke"`` or ``"full"``."""
    path = Path(path)
    results = json.loads(path.read_text())
    header = results.get("header")
    if not isinstance(header, dict):
        raise ValueError(f"{path} has no header: not a results file of python -m qlora_edu.ch09_labs")
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing:
        raise ValueError(f"{path}: the header lacks {', '.join(missing)}")
    if header["mode"] not in ("smoke", "full"):
        raise ValueError(f"{path}: mode must be 'smoke' or 'full', got {header['mode']!r}")
    return results



# ----------------------------------------------------------------------------------------------
# Verdicts: the sentences the notebook prints, computed from a results file
#
# Every lab module has ``verdicts(results) -> list[str]``: its findings with their numbers, worded from the results
# file alone. The notebook prints them (``for line in verdicts(lab[n]): print(line)``) and
# ``tests/test_09_labs.py`` recomputes them from the committed results files and finds each line in the committed
# notebook's outputs: a printed number cannot drift from its file, and a re-run lab fails the test until the
# notebook is re-executed.


def verdicts(name: str, results: dict) -> list[str]:
    """Lab ``name``'s verdict lines for ``results`` (its results file, :func:`read_results`)."""
    return lab_module(name).verdicts(results)


def score_text(correct) -> str:
    """``'57/100 = 57%'`` from a list of 0/1 (or booleans)."""
    k, n = sum(bool(c) for c in correct), len(correct)
    return f"{k}/{n} = {k / n:.0%}"


def diff_text(d) -> str:
    """``'+4% [-3%, +11%]'`` from ``[difference, low, high]`` or a ``{'difference', 'interval_95'}`` dict."""
    if d is None:
        return "—"
    if isinstance(d, dict):
        d = [d["difference"], *d["interval_95"]]
    return f"{d[0]:+.0%} [{d[1]:+.0%}, {d[2]:+.0%}]"


# ----------------------------------------------------------------------------------------------
# Small helpers several labs use


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block on a fork of torch's global generator seeded with ``seed`` (peft draws the adapters' initial A
    from it), leaving the caller's random state as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def finetune_config(ctx: Context, budget: Budget, **overrides):
    """Chapter 8's defaults for ``ctx``'s device (:func:`~qlora_edu.ch08_finetune.finetune.default_config`; on a CPU:
    lr 1e-3, r = 16, alpha = 16, dropout 0.05, all seven projections, clip 0.3, 3% warm-up) with ``budget``; torch's
    AdamW (on a CPU bitsandbytes' paged AdamW is the same update, unpaged) and no gradient checkpointing unless
    ``overrides`` turn it on."""
    from qlora_edu.ch08_finetune.finetune import default_config

    fields = dict(steps=budget.steps, batch_size=budget.batch_size, eval_size=budget.eval_size,
                  max_new_tokens=budget.max_new_tokens, optimizer="adamw", gradient_checkpointing=False,
                  seed=budget.seed)
    return default_config(ctx.compute.device, smoke=False, **(fields | overrides))


def logits(model, batch: dict):
    """The model's logits on a collated ``batch`` (inference mode: dropout off, no gradients)."""
    import torch

    from qlora_edu.ch08_finetune.finetune import inference_mode

    device = next(model.parameters()).device
    with inference_mode(model), torch.no_grad():
        return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits


def lora_layers(model) -> list[tuple[str, object]]:
    """``(name, peft LoRA layer)`` of a PeftModel, name as in the plain model (``model.layers.0.self_attn.q_proj``)."""
    from peft.tuners.lora import LoraLayer

    return [(name.removeprefix("base_model.model."), module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer)]
