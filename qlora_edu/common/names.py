"""Names the whole course shares, kept in one small module below every chapter: the seven Llama projections that
get adapters (:data:`LLAMA_TARGETS`) and the optimizers, one spelling each (:data:`OPTIMIZERS`).

Chapter 4's memory model, chapter 5's state bytes, chapter 6's LoRA, chapter 8's config and the one model set-up
(:mod:`qlora_edu.common.training_setup`) all read them here. No torch, and no import of any chapter: a chapter's
guards can take these names without reaching the set-up module (which builds chapter 7's layer).
"""

from __future__ import annotations

from collections.abc import Iterable

from qlora_edu.common.guards import check_choice

__all__ = ["OPTIMIZERS"]  # LLAMA_TARGETS is exported by qlora_edu.ch06_lora.lora, the chapter that teaches it

#: The seven linear projections of a Llama decoder layer: attention's q, k, v, o and the MLP's gate, up, down.
#: (Exported by :mod:`qlora_edu.ch06_lora.lora`, the chapter that teaches which layers get adapters.)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


#: The optimizers, one name each: the class it builds, lower-cased (``torch.optim.AdamW``, bitsandbytes'
#: ``AdamW8bit``, ``PagedAdamW``, ``PagedAdamW8bit``, ``torch.optim.SGD``). This spelling rather than
#: transformers' ``optim=`` strings (``"adamw_torch"``, ``"paged_adamw_32bit"``, ...) because a name here is also a
#: row of chapter 4's memory model and chapter 5's state-bytes formula, which describe the class's states, not a
#: Trainer option (``TrainingArguments(optim="paged_adamw_32bit")`` builds the same ``PagedAdamW``).
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "sgd")


def check_targets(name: str, value: object) -> tuple[str, ...]:
    """``value`` must be a non-empty sequence of distinct names from :data:`LLAMA_TARGETS`; returns it as a tuple."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a tuple of module names from {list(LLAMA_TARGETS)}, "
                        f"got {type(value).__name__}")
    targets = tuple(value)
    if not targets:
        raise ValueError(f"{name} must name at least one module from {list(LLAMA_TARGETS)}")
    for t in targets:
        check_choice(f"{name} entry", t, LLAMA_TARGETS)
    if len(set(targets)) != len(targets):
        raise ValueError(f"{name} must not repeat a module, got {list(targets)}")
    return targets
