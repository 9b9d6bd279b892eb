"""Chapter 5: paged optimizers, simulated honestly (and shown for real on a GPU).

**What bitsandbytes does.** A paged optimizer (``PagedAdamW``, ``PagedAdamW8bit``, ...) allocates the state
of every tensor of at least ``PAGED_MIN_ELEMENTS = 1e5`` elements with ``cudaMallocManaged`` (CUDA unified
memory) instead of from PyTorch's pool. Nothing else changes while memory is plentiful. When the GPU runs
short, the driver evicts managed pages to host memory; before each parameter's update the optimizer
prefetches its states back (``cudaMemPrefetchAsync``). So paging turns an out-of-memory error into
transfers over PCIe, and only the *optimizer states* can move: weights, activations and gradients stay.

**The model here.** One training step as a sequence of allocations (bytes on the y axis, time on x)::

    start       weights + states resident (gradients were freed by the last step)
    forward     + activations saved by layer 1, 2, ..., L; then + spike (logits, loss) at the top
    backward    - spike; per layer L..1: + transient (recomputed activations, activation gradients)
                + that layer's gradients, then - its activations - transient
    update      evicted states come back first (page-in: bytes / bandwidth), as far as they fit; the
                rest pass through the GPU during the update (in and out again) and stay on the host;
                then - gradients (``zero_grad(set_to_none=True)``)

When an allocation would exceed the GPU's capacity: unpaged, it is an out-of-memory error (OOM); paged,
the pageable states still on the GPU are evicted to host, lazily, as many bytes as the allocation needs (up
to all of them), each eviction a transfer at ``bandwidth`` that the allocation waits for; if that is not
enough, OOM. The update needs one parameter's states at a time (bitsandbytes prefetches per parameter), so
states never cause an OOM there. Bytes are conserved: at every point ``gpu + host = allocated`` (counted
apart), and at the end ``host = evicted - paged in``.

So, exactly: unpaged, OOM iff the peak of allocated bytes exceeds the capacity; paged, OOM iff the peak of
the *non-pageable* bytes (everything but the pageable states) does.

Simplifications: one step, starting with every state on the GPU; transfers do not overlap compute or each
other (PCIe is full duplex: this overestimates the streaming case); a page is evicted at most once before
the update; no fragmentation, no allocator cache, no CUDA context.

**Measured vs simulated.** Everything this module computes is a simulation; what it is calibrated on was
measured. Eviction by real memory pressure was never exercised (oversubscribing a shared GPU can hang it for
every user): the measurement moved the states to the host by reading them from the CPU, which migrates managed
pages as the driver's eviction does.

**Measured (qlora_edu/reference/gpu-facts.md, one H100, PCIe, 2026-11-22):** 1,221 MiB of fp32 AdamW states
(160 M LoRA parameters of Llama-7B at r = 64) take 3.5 ms to update when resident and 29.4-31.1 ms right after
they were moved to the host:
~26 ms for bringing them back, against a pinned host-to-device copy of the same bytes in 24.3 ms
(52.8 GB/s, the default ``bandwidth`` here, so the model's page-in is a slight underestimate). A 7B QLoRA
step takes ~600 ms: a fully evicted optimizer costs about 4% per step. The eviction itself (device to host)
is modelled at the same bandwidth; it was not measured separately.

**What paging buys in QLoRA.** The states are small (LoRA: 1.2 GiB for 7B), so paging can absorb a spike
at most that large; a long sequence (the measured 7B peak grows by ~1 GiB from 512 to 2,048 tokens) is the
kind of spike it is for. It cannot rescue a step whose activations alone exceed the GPU.

:func:`paging_demo_cuda` runs the real thing on a GPU without oversubscribing it: it caps PyTorch's pool
(``torch.cuda.set_per_process_memory_fraction``) just below what ``torch.optim.AdamW`` needs; the managed
states of ``bitsandbytes.optim.PagedAdamW`` live outside that pool, so it survives where AdamW OOMs.
"""

from __future__ import annotations

import time

import torch

from qlora_edu.ch05_optimizers.guards import (
    check_paging_demo_cuda_args,
    check_plot_timeline_args,
    check_qlora_7b_example_args,
    check_simulate_step_args,
)
from qlora_edu.ch05_optimizers.step_memory import MEMORY_KINDS, PagingEvent, StepMemory, StepTimeline

__all__ = [
    "H100_PCIE_BYTES_PER_S",
    "PAGED_MIN_ELEMENTS",
    "simulate_step",
    "plot_timeline",
    "qlora_7b_example",
    "paging_demo_cuda",
]

MiB = 2**20
GiB = 2**30
#: Pinned host-to-device copy measured on an H100 over PCIe (gpu-facts.md), bytes per second.
H100_PCIE_BYTES_PER_S = 52.8e9
#: bitsandbytes pages the states of tensors with at least this many elements (smaller ones stay on the GPU).
PAGED_MIN_ELEMENTS = 100_000


class _Run:
    """The mutable bookkeeping of one simulation (a small state machine; the result is a frozen StepTimeline)."""

    def __init__(self, memory: StepMemory, capacity: int, paged: bool, bandwidth: float):
        self.memory, self.capacity, self.paged, self.bandwidth = memory, capacity, paged, bandwidth
        self.t = 0.0
        # Two bookkeepings kept apart on purpose: where bytes are (on the GPU by kind, on the host) and how
        # many exist (allocated). alloc/free change both; evictions and page-ins only move states.
        self.gpu = {"weights": memory.weights_bytes, "states": memory.state_bytes, "activations": 0,
                    "gradients": 0}
        self.host = 0
        self.allocated = memory.weights_bytes + memory.state_bytes
        self.pageable_on_gpu = memory.pageable_state_bytes if paged else 0
        self.points: list[tuple] = []
        self.events: list[PagingEvent] = []
        self.oom_at: float | None = None
        self.evicted = self.paged_in = self.streamed = 0
        self.page_out_ms = self.page_in_ms = 0.0
        # States that do not fit from the start live partly on the host (paged), or nothing fits.
        self._evict(self.used - capacity, "start")
        if self.used > capacity:
            self._oom("start", 0, "the weights and the states that cannot be paged do not fit")
        else:
            self.record("start")

    @property
    def used(self) -> int:
        return sum(self.gpu.values())

    def record(self, phase: str) -> None:
        self.points.append((self.t, dict(self.gpu), self.used, self.host, self.allocated, phase))

    def _ms(self, n_bytes: int) -> float:
        return n_bytes / self.bandwidth * 1e3

    def _oom(self, phase: str, wanted: int, why: str) -> None:
        self.oom_at = self.t
        self.events.append(PagingEvent(self.t, "oom", wanted, 0.0, f"OOM at {self.t:.1f} ms ({phase}): {why}"))
        self.record(phase)

    def _evict(self, short: int, phase: str) -> None:
        """Move up to ``short`` bytes of pageable states to the host; the allocation waits for the copy."""
        out = min(short, self.pageable_on_gpu)  # lazily: only what is needed
        if out <= 0:
            return
        self.pageable_on_gpu -= out
        self.gpu["states"] -= out
        self.host += out
        self.evicted += out
        ms = self._ms(out)
        self.events.append(PagingEvent(self.t, "evict", out, ms, f"evict {out / MiB:.0f} MiB of states ({phase})"))
        self.t += ms
        self.page_out_ms += ms
        self.record(phase)

    def alloc(self, n_bytes: int, kind: str, phase: str) -> bool:
        """Allocate on the GPU, evicting pageable states if needed; False (and an OOM event) if impossible."""
        if self.oom_at is not None:
            return False
        self._evict(self.used + n_bytes - self.capacity, phase)
        if self.used + n_bytes > self.capacity:
            self._oom(phase, n_bytes, f"{n_bytes / MiB:.0f} MiB of {kind} do not fit in "
                                      f"{self.capacity / MiB:.0f} MiB ({self.used / MiB:.0f} MiB in use)")
            return False
        self.gpu[kind] += n_bytes
        self.allocated += n_bytes
        self.record(phase)
        return True

    def free(self, n_bytes: int, kind: str, phase: str) -> None:
        self.gpu[kind] -= n_bytes
        self.allocated -= n_bytes
        self.record(phase)

    def update(self) -> bool:
        """The optimizer step: evicted states come back first (the optimizer prefetches them); those that
        do not fit next to weights and gradients pass through the GPU during the update, in and out again."""
        if self.oom_at is not None:
            return False
        back = min(self.host, self.capacity - self.used)
        if back > 0:
            ms = self._ms(back)
            self.events.append(PagingEvent(self.t, "page_in", back, ms, f"page in {back / MiB:.0f} MiB of states"))
            self.t += ms  # the update waits for its states
            self.page_in_ms += ms
            self.gpu["states"] += back
            self.host -= back
            self.pageable_on_gpu += back
            self.paged_in += back
        self.record("optimizer")
        self.streamed = self.host
        if self.streamed:
            ms = self._ms(self.streamed)
            self.events.append(PagingEvent(self.t, "stream", self.streamed, 2 * ms + self.memory.optimizer_ms,
                                     f"{self.streamed / MiB:.0f} MiB of states do not fit back: paged in and "
                                     "out again during the update"))
            self.paged_in += self.streamed
            self.evicted += self.streamed
            self.page_in_ms += ms
            self.page_out_ms += ms
            self.t += 2 * ms
        self.t += self.memory.optimizer_ms
        return True

    def timeline(self) -> StepTimeline:
        t, by_kind, gpu, host, allocated, phase = zip(*self.points, strict=True)
        resident = {kind: tuple(b[kind] for b in by_kind) for kind in MEMORY_KINDS}
        return StepTimeline(t_ms=t, resident=resident, gpu_bytes=gpu, host_bytes=host, allocated_bytes=allocated,
                        phase=phase, events=tuple(self.events), capacity_bytes=self.capacity, paged=self.paged,
                        bandwidth=self.bandwidth, oom=self.oom_at is not None, oom_at_ms=self.oom_at,
                        evicted_bytes=self.evicted, paged_in_bytes=self.paged_in, streamed_bytes=self.streamed,
                        page_out_ms=self.page_out_ms,
                        page_in_ms=self.page_in_ms, step_ms=self.t, memory=self.memory)


def simulate_step(memory: StepMemory, gpu_bytes: float, *, paged: bool,
                  bandwidth: float = H100_PCIE_BYTES_PER_S) -> StepTimeline:
    """Simulate one training step's GPU memory over time, with or without paged optimizer states.

    Args:
        memory: what the step allocates and how long its parts take (:class:`StepMemory`).
        gpu_bytes: the GPU's capacity in bytes (what the process may use).
        paged: True: optimizer states (but ``memory.unpageable_state_bytes``) can be evicted to host memory
            under pressure and are paged back before the update; False: running out is an OOM.
        bandwidth: host-device transfer speed in bytes per second (default: the H100 PCIe measurement).

    Returns:
        A :class:`StepTimeline`. On OOM it ends at the failing allocation (``oom=True``, ``oom_at_ms``).
    """
    check_simulate_step_args(memory, gpu_bytes, paged, bandwidth)
    run = _Run(memory, int(gpu_bytes), paged, float(bandwidth))
    n = memory.n_layers
    fwd_slice, bwd_slice = memory.forward_ms / (n + 1), memory.backward_ms / (n + 1)  # L layers + the head
    grads = [memory.grad_bytes // n + (1 if i < memory.grad_bytes % n else 0) for i in range(n)]  # exact sum
    ok = run.oom_at is None
    for act in memory.layer_activation_bytes:  # forward: each layer saves its activations
        ok = ok and run.alloc(act, "activations", "forward")
        run.t += fwd_slice if ok else 0.0
    ok = ok and run.alloc(memory.spike_bytes, "activations", "forward")  # logits and loss at the top
    if ok:
        run.t += fwd_slice + bwd_slice
        run.free(memory.spike_bytes, "activations", "backward")
    for i in reversed(range(n)):  # backward: last layer first
        ok = ok and run.alloc(memory.backward_transient_bytes, "activations", "backward")
        ok = ok and run.alloc(grads[i], "gradients", "backward")
        if ok:
            run.t += bwd_slice
            run.free(memory.layer_activation_bytes[i] + memory.backward_transient_bytes, "activations",
                     "backward")
    ok = ok and run.update()
    if ok:
        run.free(memory.grad_bytes, "gradients", "end")
    return run.timeline()


def plot_timeline(timeline: StepTimeline, ax=None):
    """Draw a :class:`StepTimeline`: what the GPU holds (stacked by kind), states paged out to host, the
    capacity, the page-in before the update and an OOM if there is one.

    Args:
        timeline: the result of :func:`simulate_step`.
        ax: a matplotlib Axes to draw on; None makes a new figure (``matplotlib.pyplot``).

    Returns:
        The Axes (its figure is ``ax.figure``).
    """
    check_plot_timeline_args(timeline, ax)
    if ax is None:
        import matplotlib.pyplot as plt  # imported here: the package does not need matplotlib to simulate

        _, ax = plt.subplots(figsize=(8, 4))
    # Keep the last point of each instant: what holds until the next one (zero-length states are not drawn).
    keep = [i for i in range(len(timeline.t_ms)) if i + 1 == len(timeline.t_ms)
            or timeline.t_ms[i + 1] > timeline.t_ms[i]]
    t = [timeline.t_ms[i] for i in keep]
    colors = {"weights": "tab:gray", "states": "tab:purple", "activations": "tab:blue", "gradients": "tab:green"}
    bottom = [0.0] * len(keep)
    for kind in MEMORY_KINDS:
        top = [b + timeline.resident[kind][i] / GiB for b, i in zip(bottom, keep, strict=True)]
        ax.fill_between(t, bottom, top, step="post", color=colors[kind], alpha=0.6, label=f"{kind} on the GPU")
        bottom = top
    if timeline.evicted_bytes:
        top = [b + timeline.host_bytes[i] / GiB for b, i in zip(bottom, keep, strict=True)]
        ax.fill_between(t, bottom, top, step="post", facecolor="none", edgecolor="tab:purple", hatch="//",
                        label="states paged out to host")
    ax.axhline(timeline.capacity_bytes / GiB, color="tab:red", linestyle="--", label="GPU capacity")
    for event in timeline.events:
        if event.kind == "page_in":
            ax.axvspan(event.t_ms, event.t_ms + event.duration_ms, color="tab:orange", alpha=0.4,
                       label=f"page-in {event.duration_ms:.1f} ms")
        elif event.kind == "stream":
            ax.axvspan(event.t_ms, event.t_ms + event.duration_ms, color="tab:brown", alpha=0.3,
                       label=f"update streaming {event.bytes / MiB:.0f} MiB of states")
        elif event.kind == "oom":
            ax.plot([event.t_ms], [timeline.capacity_bytes / GiB], "x", color="tab:red", markersize=12, mew=3,
                    label="out of memory")
    ax.set_xlabel("time in the training step (ms)")
    ax.set_ylabel("memory (GiB)")
    ax.set_ylim(bottom=0)
    states = "paged" if timeline.paged else "unpaged"
    if timeline.oom:
        outcome = f"OOM at {timeline.oom_at_ms:.0f} ms"
    else:
        outcome = f"step {timeline.step_ms:.0f} ms, of which paging {timeline.transfer_ms:.1f} ms"
    ax.set_title(f"{states} optimizer states, {timeline.capacity_bytes / GiB:.1f} GiB GPU: {outcome}")
    ax.legend(loc="lower right", fontsize="small")
    return ax


def qlora_7b_example(spike_bytes: float = 0.0) -> StepMemory:
    """A Llama-7B QLoRA step (batch 1 x 512, r = 64, checkpointing, paged fp32 AdamW) from gpu-facts.md.

    Measured on an H100: 4,798 MiB resident after set-up (NF4 weights 3,687 MiB, fp32 embeddings and head,
    160 M fp32 LoRA parameters); optimizer states 1,220 MiB (2 x 4 bytes x 160 M, all in tensors above
    1e5 elements, so all pageable); torch peak 5,776 MiB; 812 tokens/s (631 ms a step); resident optimizer
    step 3.5 ms. Assumed (not measured): gradients 4 bytes x 160 M = 610 MiB; per layer the checkpointed
    fp32 residual stream, 512 x 4096 x 4 bytes = 8 MiB; backward = 3 x forward (it recomputes the forward);
    the backward transient (recomputed layer, dequantized weights, activation gradients, logits) set to what
    makes the model's peak equal the measured one: 5,776 - 4,798 - 610 - 8 = 360 MiB (the peak comes at the
    last layer's backward, when all gradients exist: weights + states + 1 layer + gradients + transient).

    Args:
        spike_bytes: extra bytes at the forward/backward turn. A simplification for a longer sequence,
            which really grows every layer's activations: the measured peak is ~1,063 MiB higher at
            1 x 2048 than at 1 x 512 tokens.
    """
    check_qlora_7b_example_args(spike_bytes)
    compute_ms = 512 / 812 * 1e3 - 3.5
    return StepMemory(weights_bytes=4798 * MiB, state_bytes=1220 * MiB, grad_bytes=610 * MiB,
                      layer_activation_bytes=(8 * MiB,) * 32, spike_bytes=spike_bytes,
                      backward_transient_bytes=360 * MiB, unpageable_state_bytes=0,
                      forward_ms=compute_ms / 4, backward_ms=compute_ms * 3 / 4, optimizer_ms=3.5)


def _cuda_ms(fn, device: torch.device) -> float:
    """Wall time of ``fn()`` on ``device`` in ms, synchronised before and after."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def paging_demo_cuda(n_params: int = 32_000_000, *, max_managed_fraction: float = 0.25, steps: int = 5,
                     device: str | torch.device = "cuda") -> dict:
    """On a GPU: under a capped PyTorch pool ``torch.optim.AdamW`` runs out of memory, ``PagedAdamW`` does not.

    One float32 parameter of ``n_params`` elements and its gradient are allocated; then PyTorch's pool is
    capped (``torch.cuda.set_per_process_memory_fraction``) at what it holds plus room for half of one
    state: AdamW needs two states (8 bytes per parameter) from that pool and fails at the first.
    ``bitsandbytes.optim.PagedAdamW`` allocates its states in CUDA unified memory, outside the pool, so the
    same cap does not stop it. This shows where paged states live, not an eviction: nothing is
    oversubscribed. Safety: the managed states are sized so that they take at most
    ``max_managed_fraction`` of the free GPU memory (``n_params`` is reduced if needed); the whole demo uses
    at most twice that. The cap is restored afterwards. bitsandbytes 0.50.2 never frees paged buffers, so
    the ``8 * n`` managed bytes stay allocated until the process exits.

    Args:
        n_params: parameter elements wanted (at least ``PAGED_MIN_ELEMENTS``, so the states are paged).
        max_managed_fraction: largest share of free GPU memory for the managed states (at most 0.25).
        steps: PagedAdamW steps to time.
        device: the CUDA device.

    Returns:
        dict with ``device_name``, ``n_params`` (used), ``state_bytes``, ``pool_cap_bytes``,
        ``adamw_needs_bytes``, ``adamw_oom`` (bool), ``adamw_error`` (first line, or None), ``paged_ok``,
        ``states_paged`` (one bool per state tensor), ``paged_step_ms`` (list; the first includes allocating
        the states), ``free_bytes_before``.
    """
    check_paging_demo_cuda_args(n_params, max_managed_fraction, steps, device)
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(dev)
    n = min(n_params, int(max_managed_fraction * free) // 8)  # two fp32 states: 8 bytes per element
    if n < PAGED_MIN_ELEMENTS:
        raise RuntimeError(f"only {free / MiB:.0f} MiB free on {dev}: too little for a demo of paged states")
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous_fraction = get_fraction(dev) if get_fraction is not None else 1.0
    result = {"device_name": torch.cuda.get_device_name(dev), "n_params": n, "state_bytes": 8 * n,
              "free_bytes_before": free, "adamw_error": None}
    param = torch.nn.Parameter(torch.zeros(n, device=dev))
    param.grad = torch.randn(n, device=dev).mul_(1e-3)
    paged_opt = None
    try:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(dev)
        cap = reserved + 2 * n  # room for half of one fp32 state; AdamW needs 8 * n more
        result.update(pool_cap_bytes=cap, adamw_needs_bytes=reserved + 8 * n)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), dev)

        adamw = torch.optim.AdamW([param], lr=1e-4)
        try:
            adamw.step()
            torch.cuda.synchronize(dev)
            result["adamw_oom"] = False
        except torch.OutOfMemoryError as err:
            result["adamw_oom"] = True
            result["adamw_error"] = str(err).strip().splitlines()[0]
        del adamw
        torch.cuda.empty_cache()

        paged_opt = bnb.optim.PagedAdamW([param], lr=1e-4)
        times = [_cuda_ms(paged_opt.step, dev) for _ in range(steps)]
        state = paged_opt.state[param]
        result.update(paged_ok=True, paged_step_ms=times,
                      states_paged=[bool(getattr(state[k], "is_paged", False)) for k in ("state1", "state2")])
    finally:
        torch.cuda.set_per_process_memory_fraction(previous_fraction, dev)
        if paged_opt is not None:
            # bitsandbytes keeps every paged buffer in a process-wide list; drop ours from it.
            ours = {id(v) for v in paged_opt.state[param].values() if isinstance(v, torch.Tensor)}
            manager = bnb_functional.GlobalPageManager.get_instance()
            manager.paged_tensors = [t for t in manager.paged_tensors if id(t) not in ours]
        del param, paged_opt
        torch.cuda.empty_cache()
    return result
