"""Chapter 11: what one GPU holds when N GPUs share a QLoRA model with FSDP, and what the sharing costs.

PyTorch's Fully Sharded Data Parallel (FSDP) splits every **parameter** into N equal pieces along its first
dimension, one piece per rank (a rank is one process, one GPU). Between steps each rank holds only its piece;
just before a unit of the model runs (here: one decoder layer, and the *root* holding the embedding, the final
norm and ``lm_head``), the pieces are **all-gathered** into the whole unit, used, and freed again. The adapters'
gradients are computed whole and then **reduce-scattered**: summed over the ranks (each rank saw its own
micro-batch), averaged, and each rank keeps only the piece matching its parameter shard, which its optimizer
updates (so the optimizer states are sharded too).

Per GPU, for a QLoRA model given as chapter 4's :func:`~qlora_edu.ch04_memory.memory.static_tensors` list
(``n`` bytes of a tensor, ``N`` ranks):

* **sharded** (``ceil(n / N)`` each): the parameters, frozen or not: the packed NF4 codes, the unquantized
  embeddings, norms and ``lm_head``, the adapters; the adapters' gradients; the optimizer states;
* **replicated** (``n`` each, on every rank): what is not a parameter: bitsandbytes keeps the NF4 constants
  (``absmax`` codes, ``absmax2``, the offset, the two code tables) in the layer's ``QuantState``, a plain
  attribute FSDP never sees, and the rotary embedding's buffers;
* **gathered**, alive only around the computation: the root unit (FSDP2 does not free the root after the
  forward: the backward needs it straight away), and two decoder-layer units at once (the one computing and
  the next, prefetched while the first computes), each whole; plus one layer's adapter gradients, whole, before
  their reduce-scatter.

With ``cpu_offload`` (FSDP2's ``CPUOffloadPolicy``) the sharded parameters, gradients and optimizer states
live in host memory: they are copied to the GPU for each all-gather, the gradients are copied back, and the
optimizer steps on the CPU. The GPU keeps the replicated tensors and what is gathered.

**Traffic per step** (one rank's, ring algorithms): an all-gather of ``P`` bytes receives ``P (N - 1) / N`` bytes,
and so does a reduce-scatter. Every layer is gathered twice (forward; backward, where gradient checkpointing
re-runs the layer while it is gathered), the root once; the adapter gradients are reduce-scattered once. With
offload, every sharded byte also crosses PCIe twice more (parameters in; gradients out, optimizer states stay on
the host but the step reads them there).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_edu.ch11_fsdp.guards import (
    PARAMETER_WHATS,
    check_link_seconds_args,
    check_per_gpu_static_args,
    check_sharded_units_args,
)

__all__ = ["LINKS", "Link", "ShardedUnits", "link_seconds", "per_gpu_static", "sharded_units", "step_traffic"]

#: Decoder-layer units alive at once: the one computing and the one prefetched (FSDP2's default prefetch).
LAYER_UNITS_ALIVE = 2


def _is_parameter(t) -> bool:
    """Is this :class:`~qlora_edu.ch04_memory.memory.StaticTensor` a parameter (or a parameter's gradient or
    optimizer state), the things FSDP shards?"""
    return t.part != "frozen_weights" or t.what in PARAMETER_WHATS


def per_gpu_static(tensors, world_size: int, *, cpu_offload: bool = False) -> dict[str, int]:
    """The static memory one GPU holds between steps when FSDP shards the model over ``world_size`` GPUs.

    Each parameter, gradient and optimizer state is cut into ``world_size`` equal pieces (FSDP pads the first
    dimension to a multiple of ``world_size``; rank 0 holds ``ceil(n / world_size)`` bytes of an ``n``-byte
    tensor, the most of any rank); every other tensor (the NF4 constants of bitsandbytes' ``QuantState``, the
    rotary buffers) is held whole by every rank. With ``cpu_offload`` the sharded pieces live in host memory.

    Args:
        tensors: chapter 4's :func:`~qlora_edu.ch04_memory.memory.static_tensors` list (``StaticTensor`` s with
            ``part``, ``what`` and ``nbytes``).
        world_size: the number of GPUs (ranks), >= 1.
        cpu_offload: FSDP2's ``CPUOffloadPolicy``: sharded parameters, gradients and states in host memory.

    Returns:
        ``{"frozen_weights", "trainable_weights", "gradients", "optimizer_states", "host"}``: bytes of each part on
        one GPU (rank 0), and ``host`` the bytes that rank keeps in host memory (0 without offload).
    """
    tensors, world_size = check_per_gpu_static_args(tensors, world_size, cpu_offload)
    parts = dict.fromkeys(("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "host"), 0)
    # BEGIN SOLUTION
    # Hint: for each tensor t: is it sharded? Everything that is not part "frozen_weights" is (adapters, their
    # Hint: gradients, optimizer states), and among the frozen ones the tensors whose t.what is in
    # Hint: PARAMETER_WHATS (the parameters); the rest of the frozen tensors are replicated (t.nbytes on each GPU).
    # Hint: A sharded tensor puts ceil(t.nbytes / world_size) bytes on rank 0: in parts[t.part], or, with
    # Hint: cpu_offload, in parts["host"].
    for t in tensors:
        if t.part == "frozen_weights" and t.what not in PARAMETER_WHATS:
            parts[t.part] += t.nbytes  # a QuantState's constants, buffers: every rank holds them whole
            continue
        shard = -(-t.nbytes // world_size)  # FSDP pads to a multiple of world_size: rank 0's piece is the largest
        parts["host" if cpu_offload else t.part] += shard
    # END SOLUTION
    return parts


@dataclass(frozen=True)
class ShardedUnits:
    """The units FSDP all-gathers (whole, in bytes) when each decoder layer is one unit and the root the rest.

    Attributes:
        layer_params: the largest decoder layer's parameters (packed codes, norms, adapters), gathered.
        layer_grads: that layer's adapter gradients, whole before the reduce-scatter.
        root_params: the parameters outside the layers (embedding, final norm, ``lm_head``).
        all_params: every parameter, whole (the bytes one all-gather of the whole model moves).
        trainable: every trainable parameter (the bytes the gradients' reduce-scatter moves).
        layers: the number of decoder layers.
    """

    layer_params: int
    layer_grads: int
    root_params: int
    all_params: int
    trainable: int
    layers: int

    @property
    def gathered(self) -> int:
        """Bytes of whole parameters alive at once: the root and :data:`LAYER_UNITS_ALIVE` layers."""
        return self.root_params + LAYER_UNITS_ALIVE * self.layer_params


def sharded_units(tensors) -> ShardedUnits:
    """Group chapter 4's :func:`~qlora_edu.ch04_memory.memory.static_tensors` list into FSDP units: one per
    decoder layer (its ``StaticTensor.layer``), the root for those outside the layers."""
    tensors = check_sharded_units_args(tensors)
    per_layer: dict[int, int] = {}
    grads: dict[int, int] = {}
    root = trainable = 0
    for t in tensors:
        if t.part == "gradients" and t.layer is not None:
            grads[t.layer] = grads.get(t.layer, 0) + t.nbytes
        if t.part not in ("frozen_weights", "trainable_weights") or not _is_parameter(t):
            continue
        trainable += t.nbytes if t.part == "trainable_weights" else 0
        if t.layer is None:
            root += t.nbytes
        else:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.nbytes
    return ShardedUnits(layer_params=max(per_layer.values(), default=0), layer_grads=max(grads.values(), default=0),
                        root_params=root, all_params=root + sum(per_layer.values()), trainable=trainable,
                        layers=len(per_layer))


def step_traffic(units: ShardedUnits, world_size: int, *, cpu_offload: bool = False) -> dict[str, int]:
    """Bytes one GPU receives per training step (ring all-gather and reduce-scatter: ``(N - 1) / N`` of the
    collective's size), and the PCIe bytes of offloading.

    Returns:
        ``{"all_gather": layers twice + root once, "reduce_scatter": the adapter gradients,
        "offload_pcie": host <-> GPU copies of the shards (0 without offload)}``.
    """
    world_size = check_link_seconds_args(1, world_size)[1]
    share = (world_size - 1) / world_size
    layers = units.all_params - units.root_params
    gather = round(share * (2 * layers + units.root_params))
    scatter = round(share * units.trainable)
    # offload: each rank's parameter shard copied in (forward and backward), its gradient shard copied out
    offload = round((2 * units.all_params + units.trainable) / world_size) if cpu_offload else 0
    return {"all_gather": gather, "reduce_scatter": scatter, "offload_pcie": offload}


@dataclass(frozen=True)
class Link:
    """A GPU-to-GPU (or host-to-GPU) link: its peak bandwidth in bytes per second, one direction, and where the
    figure comes from."""

    name: str
    bytes_per_second: float
    source: str


#: Peak one-direction bandwidths (bytes/s). Collectives reach a fraction of these (NCCL's bus bandwidth on PCIe
#: is typically 70-85% of the link); the course's H100 measured 52.8 GB/s for a pinned host-to-GPU copy over
#: PCIe 5 (``qlora_edu/reference/gpu-facts.md``, "Paging"), 83% of PCIe 5's 63 GB/s.
LINKS = {
    "pcie4": Link("PCIe 4.0 x16", 31.5e9, "PCI-SIG, PCI Express Base Specification 4.0: 16 GT/s a lane, "
                  "128b/130b encoding, 16 lanes = 31.5 GB/s each way"),
    "nvlink-3090": Link("NVLink bridge, 2x RTX 3090", 56.25e9, "NVIDIA GeForce RTX 3090 specifications: NVLink "
                        "112.5 GB/s total, both directions"),
    "nvlink-a100": Link("NVLink 3, A100 SXM", 300e9, "NVIDIA A100 datasheet: NVLink 600 GB/s total, both "
                        "directions"),
    "nvlink-h100": Link("NVLink 4, H100 SXM", 450e9, "NVIDIA H100 datasheet: NVLink 900 GB/s total, both "
                        "directions"),
}


def link_seconds(nbytes: int, link: str | Link) -> float:
    """Seconds to move ``nbytes`` over ``link`` (a key of :data:`LINKS` or a :class:`Link`) at its peak."""
    nbytes, _ = check_link_seconds_args(nbytes, 1)
    if isinstance(link, str):
        if link not in LINKS:
            raise ValueError(f"link must be one of {sorted(LINKS)} or a Link, got {link!r}")
        link = LINKS[link]
    elif not isinstance(link, Link):
        raise TypeError(f"link must be a str (one of {sorted(LINKS)}) or a Link, got {type(link).__name__}")
    return nbytes / link.bytes_per_second
