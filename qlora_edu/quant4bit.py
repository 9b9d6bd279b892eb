"""Chapter 2: blockwise 4-bit quantization with a code table (NF4, FP4, Int4), byte for byte as bitsandbytes.

The tensor is flattened row-major and cut into blocks of ``blocksize`` consecutive elements (blocks cross
row ends; the last block may be shorter). For each block ``b``:

    absmax_b = max_i |x_i|                      (float32; the block's quantization constant)
    v_i      = clamp(x_i / absmax_b, -1, 1)     (in [-1, 1], the range of the code table)
    q_i      = index of the table entry nearest to v_i      (4 bits)

and two codes are packed per byte, first element in the high nibble (:mod:`qlora_edu.packing`). Reading
back is one lookup and one multiply, ``x_i ~ code[q_i] * absmax_b``, in float32, then rounded (to nearest
even) to the output dtype.

Details that decide bytes (bitsandbytes 0.50.2 on CPU; we reproduce them exactly):

* the input is converted to float32 first; ``absmax`` is float32, one per block, ``(ceil(n / blocksize),)``;
* full blocks are scaled by a reciprocal, ``x * (1 / absmax)``, the last partial block by a division,
  ``x / absmax`` (the two can differ in the last bit, which can flip a code);
* the divisor is ``max(absmax, 1e-38)``: an all-zero full block stores absmax 0 and its elements get the
  code of 0.0; the last partial block even *stores* the clamped value (``1e-38`` for an all-zero tail);
* "nearest" means: compare with the float32 midpoints between neighbouring (sorted) table entries; a value
  exactly on a midpoint goes to the **lower** entry (``torch.bucketize`` with ``right=False``). FP4's
  table is not sorted, so the sorted position is mapped back to FP4's bit pattern; FP4's two zeros are
  sorted code 0 first, so values in ``(-0.0026, 0]`` get code 0 and values in ``(0, 0.0026]`` code 8;
* an odd number of elements is padded with the code of 0.0 (NF4: 7) in the last low nibble;
* ``packed`` has shape ``(ceil(n / 2), 1)``, uint8, as bitsandbytes returns it.

Speed (not part of the lesson): the work is cut into slices of about 2**18 elements (whole blocks), and
:func:`for_each_slice` hands the slices to one worker thread per core. Inside a slice every operation is
vectorized over all its blocks, exactly as it would be over the whole tensor at once; slicing keeps the
float32 temporaries in the CPU cache instead of allocating (and page-faulting) several 64 MB tensors for a
4096 x 4096 matrix, and whole slices per thread keep a busy neighbour on a shared machine from stalling
every single operation (see :func:`for_each_slice`). :func:`quantize_nf4` and :func:`dequantize_nf4` run
their small steps (the 8-bit constants) single-threaded for the same reason (:func:`serial_torch`).

:class:`NF4Tensor` and :func:`quantize_nf4` put it together the way QLoRA stores a frozen weight: NF4
codes at blocksize 64, with the constants double-quantized (:mod:`qlora_edu.double_quant`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qlora_edu.double_quant import check_rounding, double_dequantize, double_quantize
from qlora_edu.nf4 import nf4_code
from qlora_edu.validation import (
    FLOAT_DTYPES,
    check_dtype,
    check_float_tensor,
    check_power_of_two,
    check_tensor,
    n_blocks,
)

#: Elements processed per slice (rounded to whole blocks); see "Speed" in the module docstring.
SLICE_ELEMENTS = 1 << 18
#: bitsandbytes' guard against dividing by a zero absmax (a float32 subnormal, ~1e-38).
MIN_ABSMAX = 1e-38
BLOCKSIZE_RANGE = (32, 4096)


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

    Why not let torch parallelize each operation? Then every operation is a parallel region that ends
    when its slowest thread does. On a shared 2-core machine where another process holds a core, that
    thread is often descheduled for a whole time slice, and hundreds of small regions made quantization
    10-25x slower than bitsandbytes (measured). Here each worker runs whole slices with torch's intra-op
    threads set to 1 (:func:`serial_torch`), so a stalled worker delays only its own slice. ``fn`` must
    not call :func:`for_each_slice` or :func:`serial_torch` itself.
    """
    global _POOL, _POOL_SIZE
    starts = range(0, n_items, step)
    with serial_torch():
        workers = min(_WORKERS, len(starts))
        if workers <= 1:
            for start in starts:
                fn(start, min(n_items, start + step))
            return
        if _POOL is None or _POOL_SIZE < workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL, _POOL_SIZE = ThreadPoolExecutor(workers, thread_name_prefix="qlora_edu"), workers
        list(_POOL.map(lambda start: fn(start, min(n_items, start + step)), starts))


_SCRATCH = threading.local()


def scratch_buffers(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's int32 index and int64 pair buffers, ``k`` elements each, kept between calls.

    Every slice of :func:`dequantize_4bit` needs ``k <= SLICE_ELEMENTS / 2`` of each. Allocating them once
    per worker thread, rather than once per call, spares every call the page faults of fresh memory.
    """
    if getattr(_SCRATCH, "size", 0) < k:
        _SCRATCH.index = torch.empty(k, dtype=torch.int32)
        _SCRATCH.pairs = torch.empty(k, dtype=torch.int64)
        _SCRATCH.size = k
    return _SCRATCH.index[:k], _SCRATCH.pairs[:k]


def check_code(code: object) -> torch.Tensor:
    """``code`` must be a finite float32 table of 16 values that contains 0.0."""
    check_tensor("code", code)
    if code.dtype != torch.float32:
        raise TypeError(f"code must be a float32 tensor, got dtype {code.dtype}")
    if tuple(code.shape) != (16,):
        raise ValueError(f"code must have shape (16,) (one value per 4-bit code), got {tuple(code.shape)}")
    if not bool(torch.isfinite(code).all()):
        raise ValueError("code must be finite")
    if not bool((code == 0).any()):
        raise ValueError("code must contain 0.0 (zero blocks and the padding use the code of 0.0)")
    return code


def check_blocksize(blocksize: object) -> int:
    """``blocksize`` must be a power of two in 32..4096 (what the 4-bit kernels accept)."""
    return check_power_of_two("blocksize", blocksize, low=BLOCKSIZE_RANGE[0], high=BLOCKSIZE_RANGE[1])


def check_shape(shape: object) -> torch.Size:
    """``shape`` must be a tuple (or torch.Size) of non-negative ints describing >= 1 element."""
    if isinstance(shape, torch.Size):
        dims = tuple(shape)
    elif isinstance(shape, Sequence) and not isinstance(shape, str):
        dims = tuple(shape)
    else:
        raise TypeError(f"shape must be a tuple of ints (e.g. x.shape), got {type(shape).__name__}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"shape must hold non-negative ints, got {dims}")
    if math.prod(dims) == 0:
        raise ValueError(f"shape must describe at least one element, got {dims}")
    return torch.Size(dims)


def quantize_4bit(x: torch.Tensor, code: torch.Tensor,
                  blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of ``x`` to 4-bit indices into ``code``, packed two to a byte.

    Equal, byte for byte, to ``bitsandbytes.functional.quantize_4bit(x, blocksize=blocksize,
    quant_type="nf4" | "fp4", compress_statistics=False)`` on CPU with ``code = nf4_code()`` or
    ``fp4_code()``.

    Args:
        x: float tensor (fp32, fp16, bf16; fp64 is rounded to fp32 first), any shape, finite.
        code: float32 table of 16 values containing 0.0 (``nf4_code()``, ``fp4_code()``, ``int4_code()``).
        blocksize: elements per block, a power of two in 32..4096.

    Returns:
        ``(packed, absmax)``: uint8 ``(ceil(n / 2), 1)`` and float32 ``(ceil(n / blocksize),)``.
    """
    check_float_tensor("x", x, finite=False)  # finiteness is checked on the block maxima below
    check_code(code)
    check_blocksize(blocksize)
    # BEGIN SOLUTION
    # Hint: sort the table (stable), midpoints = (sorted[:-1] + sorted[1:]) / 2, nearest code =
    # Hint: torch.bucketize(v, midpoints) (ties go to the lower code), mapped back through the sort order.
    # Hint: full blocks: view the flat float32 tensor as (n_full, blocksize), absmax = row max of |x|,
    # Hint: v = x * (1 / absmax.clamp(min=1e-38))[:, None]; the partial tail: v = x / its clamped absmax
    # Hint: (store the clamped value); clamp v to [-1, 1]; pad an odd count with the code of 0.0 and pack
    # Hint: (first element in the high nibble). One pass over all blocks is fine: slicing is only for speed.
    # Hint: End with `packed` (uint8, ceil(n / 2) bytes) and `absmax` (float32): the lines below use them.
    sorted_code, order = code.sort(stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    to_code = None if bool((order == torch.arange(16)).all()) else order.to(torch.int32)

    def nearest(v: torch.Tensor) -> torch.Tensor:  # int32 index of the nearest table entry
        q = torch.bucketize(v, midpoints, out_int32=True)
        return q if to_code is None else to_code[q]

    flat = x.detach().reshape(-1)
    if flat.dtype == torch.float64:
        flat = flat.float()  # bitsandbytes takes no float64: round to float32 first
    n = flat.numel()
    n_full = n // blocksize
    full = n_full * blocksize
    packed = torch.empty(-(-n // 2), dtype=torch.uint8)
    absmax = torch.empty(n_blocks(n, blocksize), dtype=torch.float32)

    blocks = flat[:full].view(n_full, blocksize)

    def quantize_blocks(start: int, stop: int) -> None:  # full blocks start..stop-1
        xb = blocks[start:stop]
        a = xb.abs().amax(dim=1).float()  # the max of |x| is exact in x's own dtype
        absmax[start:stop] = a
        v = (xb * (1 / a.clamp(min=MIN_ABSMAX))[:, None]).clamp_(-1, 1)  # float32 (x * float32 promotes)
        q = nearest(v).view(-1, 2)
        torch.add(q[:, 1], q[:, 0], alpha=16, out=packed[start * blocksize // 2: stop * blocksize // 2])

    # The same as quantize_blocks(0, n_full), in cache-sized slices on all cores:
    for_each_slice(quantize_blocks, n_full, max(1, SLICE_ELEMENTS // blocksize))

    if full < n:  # the last, partial block: divided, not multiplied by a reciprocal
        tail = flat[full:].float()
        a = tail.abs().max().clamp(min=MIN_ABSMAX)
        absmax[-1] = a
        v = (tail / a).clamp(-1, 1)
        if v.numel() % 2:
            v = F.pad(v, (0, 1))  # an odd count: the pad element is 0.0, i.e. gets the code of 0.0
        q = nearest(v).view(-1, 2)
        packed[full // 2:] = q[:, 0] * 16 + q[:, 1]
    # END SOLUTION
    if not bool(torch.isfinite(absmax).all()):  # a NaN or inf anywhere in x makes its block's max NaN/inf
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x must be finite: it holds {n_bad} NaN or inf value(s)")
    return packed.view(-1, 1), absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: Sequence[int],
                    blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reverse :func:`quantize_4bit`: ``code[q] * absmax`` in float32, rounded to ``dtype``, in ``shape``.

    Equal to ``bitsandbytes.functional.dequantize_4bit`` where that is correct (see the course notes:
    bitsandbytes 0.50.2 on AVX512 CPUs gets multi-row shapes whose last dimension is a multiple of 16 but
    not of the blocksize wrong); a 1-D shape comes back 1-D (bitsandbytes returns ``(1, n)``).

    Args:
        packed: uint8 tensor of ``ceil(n / 2)`` bytes (any shape, e.g. ``(ceil(n/2), 1)``).
        absmax: float32 tensor of shape ``(ceil(n / blocksize),)``.
        code: the float32 table of 16 values used to quantize.
        shape: the original shape (``n`` = product of its dimensions).
        blocksize: the block size used to quantize (power of two, 32..4096).
        dtype: output dtype: float32, float16, bfloat16 (or float64).

    Returns:
        tensor of ``shape`` and ``dtype``.
    """
    check_dtype("packed", packed, torch.uint8)
    check_float_tensor("absmax", absmax)
    check_dtype("absmax", absmax, torch.float32)
    check_code(code)
    shape = check_shape(shape)
    check_blocksize(blocksize)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    n = math.prod(shape)
    if packed.numel() != -(-n // 2):
        raise ValueError(f"packed must hold ceil(n / 2) = {-(-n // 2)} bytes for shape {tuple(shape)}, "
                         f"got {packed.numel()}")
    if tuple(absmax.shape) != (n_blocks(n, blocksize),):
        raise ValueError(f"absmax must have shape ({n_blocks(n, blocksize)},) for {n} elements at blocksize "
                         f"{blocksize}, got {tuple(absmax.shape)}")
    # BEGIN SOLUTION
    # Hint: unpack the codes (high nibble first), look them up (code[q.long()]), multiply each block by its
    # Hint: absmax in float32 (pad to whole blocks and view (n_blocks, blocksize)), cast to dtype, reshape.
    # Hint: Faster: a (256, 2) table of both nibbles' values for every byte value gathers two at once.
    # Hint: End with `out`, the n values in `dtype` (flat is fine): the line below reshapes it.
    # Row b of the (256, 2) table holds the values of byte b's two codes: code[b >> 4], code[b & 15].
    pair_table = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)
    # Viewed as one int64 per row, index_select moves both float32 values as a single 8-byte element
    # (about twice as fast as copying 2-float rows); viewing the result as float32 gives them back in order.
    pair_table64 = pair_table.view(torch.int64).flatten()
    flat = packed.reshape(-1)
    scale = absmax.detach()
    out = torch.empty(n, dtype=dtype)
    n_full = n // blocksize
    full = n_full * blocksize
    half = blocksize // 2
    step = max(1, SLICE_ELEMENTS // blocksize)

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

    for_each_slice(dequantize_blocks, n_full, step)  # the same as dequantize_blocks(0, n_full)
    if full < n:
        values = pair_table.index_select(0, flat[full // 2:].int()).flatten()[: n - full]
        out[full:] = values * scale[-1]
    # END SOLUTION
    return out.view(shape)


@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A weight as QLoRA stores it: exactly the tensors that are kept, plus how to read them.

    Attributes:
        packed: uint8 ``(ceil(n / 2), 1)``, two NF4 codes a byte (first element in the high nibble).
        absmax: float32 ``(n_blocks,)`` constants, or, with ``double_quant``, their uint8 codes into
            ``dynamic_map(True)``.
        shape, dtype: the original weight's shape and dtype (``dequantize_nf4`` returns them).
        blocksize: weights per first-level block (64 in QLoRA).
        double_quant: whether ``absmax`` holds 8-bit codes.
        offset: float32 0-d mean of the constants (double quantization only).
        absmax2: float32 ``(ceil(n_blocks / blocksize2),)`` second-level constants (double quantization only).
        blocksize2: constants per second-level block (256).

    The two code tables (NF4's 16 values, the dynamic map's 256) are constants of the format and not
    counted; bitsandbytes' ``QuantState`` keeps a copy of both with every weight (64 B + 1 KiB).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    double_quant: bool = False
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    blocksize2: int = 256

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors: packed codes + constants (+ offset and absmax2)."""
        stored = [self.packed, self.absmax, self.offset, self.absmax2]
        return sum(t.numel() * t.element_size() for t in stored if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def __repr__(self) -> str:
        constants = f"double_quant=True, blocksize2={self.blocksize2}" if self.double_quant else "double_quant=False"
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {constants}, "
                f"nbytes={self.nbytes}, {self.bits_per_param:.3f} bits/param)")


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = True, rounding: str = "grid",
                 blocksize2: int = 256) -> NF4Tensor:
    """Store ``x`` as QLoRA does: NF4 codes, with the constants double-quantized by default.

    Matches ``bitsandbytes.functional.quantize_4bit(x, quant_type="nf4", blocksize=blocksize,
    compress_statistics=double_quant)``: the packed bytes, and ``absmax`` / ``offset`` / ``state2.absmax``
    (with ``rounding="grid"``; ``"nearest"`` differs on ~0.2% of the constants' codes).
    """
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    check_rounding(rounding)
    check_power_of_two("blocksize2", blocksize2, low=32, high=4096)
    packed, absmax = quantize_4bit(x, nf4_code(), blocksize)
    if not double_quant:
        return NF4Tensor(packed, absmax, x.shape, x.dtype, blocksize)
    # Not inside serial_torch(): the float32 mean of the constants depends on how many threads sum it,
    # and bitsandbytes takes it with the caller's threads. Same threads, same last bit, same codes.
    codes, offset, absmax2 = double_quantize(absmax, blocksize2, rounding)
    return NF4Tensor(packed, codes, x.shape, x.dtype, blocksize, True, offset, absmax2, blocksize2)


def dequantize_nf4(t: NF4Tensor) -> torch.Tensor:
    """The weight back from an :class:`NF4Tensor`, in its original shape and dtype."""
    if not isinstance(t, NF4Tensor):
        raise TypeError(f"t must be an NF4Tensor, got {type(t).__name__}")
    with serial_torch():  # the big work is sliced over all cores; the small steps need no thread team
        if t.double_quant:
            absmax = double_dequantize(t.absmax, t.offset, t.absmax2, t.blocksize2)
        else:
            absmax = t.absmax
        return dequantize_4bit(t.packed, absmax, nf4_code(), t.shape, t.blocksize, t.dtype)
