"""Chapter 5: the value types of the paging simulator (:mod:`qlora_edu.ch05_optimizers.paging`).

:class:`StepMemory` is what one training step allocates (the simulator's input), :class:`StepTimeline` what the
simulator saw (its output), :class:`PagingEvent` one transfer or failure in it. A :class:`StepMemory` checks its
fields when it is built, with the primitives of :mod:`qlora_edu.common.guards`; the simulator's guards
(:mod:`qlora_edu.ch05_optimizers.guards`) check that their arguments are of these types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from qlora_edu.common.guards import check_number

__all__ = ["StepMemory", "PagingEvent", "MEMORY_KINDS", "StepTimeline"]


def _check_step_memory(weights_bytes: object, state_bytes: object, grad_bytes: object,
                           layer_activation_bytes: object, spike_bytes: object, backward_transient_bytes: object,
                           unpageable_state_bytes: object, forward_ms: object, backward_ms: object,
                           optimizer_ms: object) -> tuple[float, ...]:
    """The checks of :class:`StepMemory`'s fields; returns the per-layer activation bytes as a tuple."""
    for name, value in (("weights_bytes", weights_bytes), ("state_bytes", state_bytes),
                        ("grad_bytes", grad_bytes), ("spike_bytes", spike_bytes),
                        ("backward_transient_bytes", backward_transient_bytes),
                        ("unpageable_state_bytes", unpageable_state_bytes)):
        check_number(name, value, low=0.0)
    if unpageable_state_bytes > state_bytes:
        raise ValueError(f"unpageable_state_bytes ({unpageable_state_bytes}) must not exceed state_bytes "
                         f"({state_bytes})")
    if isinstance(layer_activation_bytes, (str, bytes)) or not isinstance(layer_activation_bytes, Sequence):
        raise TypeError("layer_activation_bytes must be a sequence of numbers (bytes saved by each layer), "
                        f"got {type(layer_activation_bytes).__name__}")
    if len(layer_activation_bytes) == 0:
        raise ValueError("layer_activation_bytes must name at least one layer")
    for i, value in enumerate(layer_activation_bytes):
        check_number(f"layer_activation_bytes[{i}]", value, low=0.0)
    for name, value in (("forward_ms", forward_ms), ("backward_ms", backward_ms), ("optimizer_ms", optimizer_ms)):
        check_number(name, value, low=0.0)
    return tuple(float(v) for v in layer_activation_bytes)


@dataclass(frozen=True)
class StepMemory:
    """What one training step allocates, in bytes, and how long its parts take (inputs of the simulator).

    Args:
        weights_bytes: resident for the whole step and never paged: frozen (quantized) weights, adapters,
            buffers.
        state_bytes: optimizer states, all of them.
        grad_bytes: gradients of the trainable parameters, spread evenly over the layers; they appear during
            the backward pass and are freed after the optimizer step.
        layer_activation_bytes: bytes each layer saves for the backward pass (one entry per layer).
        spike_bytes: transient at the turn from forward to backward (logits and loss of a long sequence).
        backward_transient_bytes: live during each layer's backward (with gradient checkpointing: the
            layer's recomputed activations).
        unpageable_state_bytes: the part of ``state_bytes`` in tensors under ``PAGED_MIN_ELEMENTS`` elements.
        forward_ms, backward_ms, optimizer_ms: compute time of the parts, without any paging.

    Byte counts are rounded to whole bytes (ints), so conservation holds exactly.
    """

    weights_bytes: int
    state_bytes: int
    grad_bytes: int
    layer_activation_bytes: tuple[int, ...]
    spike_bytes: int = 0
    backward_transient_bytes: int = 0
    unpageable_state_bytes: int = 0
    forward_ms: float = 200.0
    backward_ms: float = 400.0
    optimizer_ms: float = 3.5

    def __post_init__(self):
        layers = _check_step_memory(self.weights_bytes, self.state_bytes, self.grad_bytes,
                                        self.layer_activation_bytes, self.spike_bytes,
                                        self.backward_transient_bytes, self.unpageable_state_bytes,
                                        self.forward_ms, self.backward_ms, self.optimizer_ms)
        for name in ("weights_bytes", "state_bytes", "grad_bytes", "spike_bytes", "backward_transient_bytes",
                     "unpageable_state_bytes"):
            object.__setattr__(self, name, int(round(getattr(self, name))))
        object.__setattr__(self, "layer_activation_bytes", tuple(int(round(b)) for b in layers))
        for name in ("forward_ms", "backward_ms", "optimizer_ms"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def n_layers(self) -> int:
        return len(self.layer_activation_bytes)

    @property
    def pageable_state_bytes(self) -> int:
        return self.state_bytes - self.unpageable_state_bytes


@dataclass(frozen=True)
class PagingEvent:
    """Something that happened during the step, from ``t_ms`` for ``duration_ms``: ``kind`` is ``"evict"``
    (states copied to host), ``"page_in"`` (states copied back before the update), ``"stream"`` (states that
    do not fit back, paged in and out during the update) or ``"oom"``."""

    t_ms: float
    kind: str
    bytes: int
    duration_ms: float
    message: str


#: What the GPU holds, bottom to top in :func:`plot_timeline`. Only "states" can be paged out.
MEMORY_KINDS = ("weights", "states", "activations", "gradients")


@dataclass(frozen=True)
class StepTimeline:
    """The simulated step: bytes over time, paging transfers and the outcome.

    Point ``i`` holds from ``t_ms[i]`` until ``t_ms[i + 1]``: ``resident[kind][i]`` bytes of each kind of
    ``MEMORY_KINDS`` on the GPU (``gpu_bytes[i]`` in all), ``host_bytes[i]`` bytes of states evicted to host
    memory, in phase ``phase[i]``. ``allocated_bytes[i]`` is counted separately, from allocations and frees
    only (evictions and page-ins do not change it): conservation is ``gpu + host == allocated``. Several
    points can share a time (an allocation and a free at the same instant).

    Totals: ``evicted_bytes`` copied to host, ``paged_in_bytes`` copied back (``streamed_bytes`` of them
    passed through during the update and were copied out again), ``page_out_ms`` / ``page_in_ms`` those
    bytes at ``bandwidth``, ``step_ms`` the whole step with transfers, ``oom`` / ``oom_at_ms``.
    """

    t_ms: tuple[float, ...]
    resident: dict[str, tuple[int, ...]]
    gpu_bytes: tuple[int, ...]
    host_bytes: tuple[int, ...]
    allocated_bytes: tuple[int, ...]
    phase: tuple[str, ...]
    events: tuple[PagingEvent, ...]
    capacity_bytes: int
    paged: bool
    bandwidth: float
    oom: bool
    oom_at_ms: float | None
    evicted_bytes: int
    paged_in_bytes: int
    streamed_bytes: int
    page_out_ms: float
    page_in_ms: float
    step_ms: float
    memory: StepMemory = field(repr=False)

    @property
    def transfer_ms(self) -> float:
        """Time spent moving states over PCIe in this step: ``evicted_bytes / bandwidth`` out plus
        ``paged_in_bytes / bandwidth`` in (``streamed_bytes`` are counted in both)."""
        return self.page_out_ms + self.page_in_ms

    @property
    def peak_gpu_bytes(self) -> int:
        return max(self.gpu_bytes)

    @property
    def peak_allocated_bytes(self) -> int:
        return max(self.allocated_bytes)
