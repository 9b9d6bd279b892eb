"""The 4-bit functions of chapter 2, fast on a CPU: the same bytes, in slices on every core.

:func:`qlora_edu.quant4bit.quantize_4bit` and :func:`~qlora_edu.quant4bit.dequantize_4bit` are the lesson:
each is one vectorized pass over the whole tensor, short enough to read top to bottom. On a 4096 x 4096
weight that pass allocates several 64-128 MB temporaries, and first touching fresh memory (page faults)
costs more than the arithmetic. The QLoRA layer dequantizes every weight in every forward and backward
pass, so :func:`~qlora_edu.nf4_tensor.quantize_nf4` and :func:`~qlora_edu.nf4_tensor.dequantize_nf4` use
the two functions here instead:

* :func:`quantize_4bit_fast` calls the lesson's ``quantize_4bit`` itself, on slices of about 2**18
  elements (whole blocks), and copies each slice's bytes and constants into place. Blocks never straddle
  two slices and a slice holds an even number of elements, so the result is byte for byte the one pass.
  Nothing of the quantization is written twice.
* :func:`dequantize_4bit_fast` does the same lookup and multiply, ``code[q] * absmax`` in float32 rounded
  to the output dtype, with one trick: a (256, 2) table holds the values of both nibbles of every byte
  value, so one ``index_select`` of 8-byte rows decodes two elements at once without unpacking. It is
  checked equal to ``dequantize_4bit`` (and to bitsandbytes) in ``tests/test_nf4_parity.py``.

:func:`for_each_slice` hands the slices to one worker thread per core. Inside a slice everything runs
single-threaded (:func:`serial_torch`), and its temporaries stay in the CPU cache.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from qlora_edu.quant4bit import (
    check_blocksize,
    check_code,
    check_dequantize_args,
    dequantize_4bit,
    quantize_4bit,
)
from qlora_edu.validation import check_float_tensor, n_blocks

#: Elements processed per slice (rounded down to whole blocks). 2**18 measured best on a 2-core x86 VM:
#: smaller slices pay Python's per-call overhead more often, larger ones spill the temporaries from L2.
SLICE_ELEMENTS = 1 << 18

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_LOCK = threading.RLock()
_WORKERS = 0  # torch's thread count outside serial_torch() while inside it, else 0


@contextmanager
def serial_torch() -> Iterator[None]:
    """Run torch single-threaded inside the block; :func:`for_each_slice` still uses one worker per thread
    that torch had before. Re-entrant; calls from different threads are serialized (the setting is
    process-wide)."""
    global _WORKERS
    with _LOCK:
        outer, previous = torch.get_num_threads(), _WORKERS
        _WORKERS = previous or outer
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(outer)
            _WORKERS = previous


def for_each_slice(fn: Callable[[int, int], None], n_items: int, step: int) -> None:
    """Call ``fn(start, stop)`` for the slices ``[0, step), [step, 2 step), ...`` of ``range(n_items)``,
    on one worker thread per torch thread. ``fn`` must write only its own slice of the outputs, so the
    result does not depend on which thread runs which slice.

    Each worker takes the next slice from a shared counter until none is left, so a worker whose core is
    busy with another process simply does fewer slices. (Letting torch parallelize every small operation
    instead makes each one a parallel region that waits for its slowest thread: on a shared 2-core machine
    that was 10-25x slower than bitsandbytes, measured. Submitting each slice as its own pool task cost
    ~0.1 ms a slice, also measured.) ``fn`` must not call :func:`for_each_slice` or :func:`serial_torch`.
    """
    global _POOL, _POOL_SIZE
    starts = itertools.count(0, step)  # shared by the workers; next() on it is atomic under the GIL
    failed = threading.Event()  # set by a worker whose slice raised: the others stop at their next slice

    def work() -> None:
        try:
            for start in starts:
                if start >= n_items or failed.is_set():
                    return
                fn(start, min(n_items, start + step))
        except BaseException:
            failed.set()
            raise

    with serial_torch():
        workers = min(_WORKERS, math.ceil(n_items / step))
        if workers <= 1:
            work()
            return
        if _POOL is None or _POOL_SIZE < workers - 1:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE = ThreadPoolExecutor(workers - 1, thread_name_prefix="qlora_edu"), workers - 1
        helpers = [_POOL.submit(work) for _ in range(workers - 1)]
        try:
            work()  # the calling thread is a worker too
        finally:
            for helper in helpers:
                helper.result()  # re-raises a worker's exception after all have stopped


def quantize_4bit_fast(x: torch.Tensor, code: torch.Tensor,
                       blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~qlora_edu.quant4bit.quantize_4bit`, slice by slice on all cores: the same bytes, faster."""
    check_float_tensor("x", x, finite=False)
    check_code(code)
    check_blocksize(blocksize)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty(math.ceil(n / 2), dtype=torch.uint8)
    absmax = torch.empty(n_blocks(n, blocksize), dtype=torch.float32)
    step = max(1, SLICE_ELEMENTS // blocksize) * blocksize  # whole blocks, so an even count

    def quantize_slice(start: int, stop: int) -> None:
        slice_packed, slice_absmax = quantize_4bit(flat[start:stop], code, blocksize)
        packed[start // 2: start // 2 + slice_packed.numel()] = slice_packed.view(-1)
        absmax[start // blocksize: start // blocksize + slice_absmax.numel()] = slice_absmax

    try:
        for_each_slice(quantize_slice, n, step)
    except ValueError:
        check_float_tensor("x", x)  # a slice found NaN or inf: report the count for the whole tensor
        raise
    return packed.view(-1, 1), absmax


_SCRATCH = threading.local()


def scratch_buffers(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's int32 index and int64 pair buffers, ``k`` elements each, kept between calls.

    Every slice of :func:`dequantize_4bit_fast` needs ``k <= SLICE_ELEMENTS / 2`` of each. Allocating them
    once per worker thread, rather than once per call, spares every call the page faults of fresh memory.
    """
    if getattr(_SCRATCH, "size", 0) < k:
        _SCRATCH.index = torch.empty(k, dtype=torch.int32)
        _SCRATCH.pairs = torch.empty(k, dtype=torch.int64)
        _SCRATCH.size = k
    return _SCRATCH.index[:k], _SCRATCH.pairs[:k]


def dequantize_4bit_fast(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: Sequence[int],
                         blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`~qlora_edu.quant4bit.dequantize_4bit` with a byte -> two values table, on all cores."""
    shape = check_dequantize_args(packed, absmax, code, shape, blocksize, dtype)
    n = math.prod(shape)
    # Row b of the (256, 2) table holds the values of byte b's two codes: code[b >> 4], code[b & 15].
    pair_table = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)
    # Viewed as one int64 per row, index_select moves both float32 values as a single 8-byte element
    # (about twice as fast as copying 2-float rows); viewing the result as float32 gives them back in order.
    pair_table64 = pair_table.view(torch.int64).flatten()
    flat = packed.reshape(-1)
    scale = absmax.detach()
    out = torch.empty(n, dtype=dtype)
    n_full = n // blocksize
    half = blocksize // 2

    def dequantize_blocks(start: int, stop: int) -> None:  # full blocks start..stop-1
        k = (stop - start) * half
        index, pairs = scratch_buffers(k)
        index.copy_(flat[start * half: stop * half])  # index_select needs int32/int64 indices
        torch.index_select(pair_table64, 0, index, out=pairs)
        values = pairs.view(torch.float32).view(stop - start, blocksize)
        values.mul_(scale[start:stop, None])  # the float32 product, in the thread's scratch buffer
        # rounded to nearest even on the copy into `out` (a same-dtype multiply plus a copy is faster than
        # a multiply that writes bf16/fp16 directly; measured)
        out[start * blocksize: stop * blocksize].view(-1, blocksize).copy_(values)

    for_each_slice(dequantize_blocks, n_full, max(1, SLICE_ELEMENTS // blocksize))
    full = n_full * blocksize
    if full < n:  # the last, partial block: small, so the lesson's function does it
        out[full:] = dequantize_4bit(flat[full // 2:], scale[-1:], code, (n - full,), blocksize, dtype)
    return out.view(shape)
