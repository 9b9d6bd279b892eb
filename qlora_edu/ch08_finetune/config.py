"""Chapter 8: :class:`FinetuneConfig`, every choice of a fine-tune in one frozen record (kept apart from the code
that uses it, as peft keeps a ``LoraConfig`` apart from its layers). It checks its fields when it is made, with the
primitives of :mod:`qlora_edu.common.guards`; :func:`~qlora_edu.ch08_finetune.finetune.paper_config` and
:func:`~qlora_edu.ch08_finetune.finetune.default_config` make the course's two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qlora_edu.common.guards import check_bool, check_choice, check_int, check_number
from qlora_edu.common.names import LLAMA_TARGETS

__all__ = ["FinetuneConfig"]

#: The optimizers a fine-tune may use: the AdamW family, by their one name (qlora_edu.common.training_setup.OPTIMIZERS).
OPTIMIZERS = ("paged_adamw", "paged_adamw8bit", "adamw")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every choice of a fine-tune, with the QLoRA paper's values as defaults (``artidoro/qlora``).

    Attributes:
        steps: optimizer steps (the paper's code: ``max_steps``; 1875 for Guanaco on OASST1).
        batch_size: examples a step (the paper: 4 a device x 4 accumulated = 16).
        learning_rate: peak learning rate (2e-4).
        warmup_ratio: fraction of the steps with a linear warm-up from 0 (0.03 in the course; the paper's constant
            schedule runs none); then constant.
        max_grad_norm: clip the gradients' global norm to this (0.3).
        lora_r, lora_alpha, lora_dropout: the adapters (64, 16, 0.05; the paper used 0.1 up to 13B).
        target_modules: projections that get adapters (all seven linear layers of a Llama block).
        optimizer: ``"paged_adamw"`` (the paper's ``paged_adamw_32bit``), ``"paged_adamw8bit"`` or ``"adamw"``
            (torch's); the names of :data:`qlora_edu.common.training_setup.OPTIMIZERS`.
        weight_decay: AdamW's decoupled weight decay (0.0: the paper regularizes with dropout only).
        gradient_checkpointing: recompute each layer in the backward instead of keeping its activations.
        seed: seeds the adapters' initialization, the batch order and dropout.
        save_every: write a checkpoint every this many steps (0: only at the end).
        eval_size: held-out examples to score (None: all of them).
        max_new_tokens: generation budget of an answer (the held-out answers take 32-40 tokens with the end token).
    """

    steps: int
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=LLAMA_TARGETS)
    optimizer: str = "paged_adamw"
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    seed: int = 0
    save_every: int = 0
    eval_size: int | None = None
    max_new_tokens: int = 48

    def __post_init__(self):
        """Every field in its range, checked when a config is made (so a bad one never reaches a run)."""
        check_int("steps", self.steps, low=1)
        check_int("batch_size", self.batch_size, low=1)
        check_number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        check_int("lora_r", self.lora_r, low=1)
        check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, low=0.0, high=0.99)
        targets = self.target_modules
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets \
                or not all(isinstance(t, str) and t for t in targets):
            raise TypeError(f"target_modules must be a non-empty tuple of module names like 'q_proj', got {targets!r}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_int("seed", self.seed, low=0)
        check_int("save_every", self.save_every, low=0)
        if self.eval_size is not None:
            check_int("eval_size", self.eval_size, low=1)
        check_int("max_new_tokens", self.max_new_tokens, low=1)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (``target_modules`` as a list)."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d
