"""The 4-bit functions of chapter 2, fast: the same bytes as the lesson's, by a different route on each device.

:func:`qlora_edu.ch02_nf4.quant4bit.quantize_4bit` and :func:`~qlora_edu.ch02_nf4.quant4bit.dequantize_4bit` are the
lesson: one
vectorized pass over the whole tensor each, readable top to bottom, and correct on CPU and CUDA alike. The QLoRA
layer of chapter 7 dequantizes every weight in every forward and backward pass, so
:func:`~qlora_edu.ch03_double_quant.nf4_codec.quantize_nf4` /
:func:`~qlora_edu.ch03_double_quant.nf4_codec.dequantize_nf4` call the two functions
here instead, the way nanoGPT keeps a flash-attention path beside the manual one. Each is checked equal to the
lesson's function (and to bitsandbytes) in ``tests/test_02_nf4.py``.

Why the lesson's pass is slow on a CPU: on a 4096 x 4096 weight it allocates several 64-128 MB temporaries, and
first touching fresh memory (page faults) costs more than the arithmetic. So on the CPU:

* :func:`quantize_4bit_fast` calls the lesson's ``quantize_4bit`` itself on slices of ``SLICE_ELEMENTS`` elements
  (whole blocks, an even count), so its temporaries are a few MB that the allocator hands back slice after slice.
  Blocks never straddle two slices, so the bytes are those of the one pass; nothing of the math is written twice.
* :func:`dequantize_4bit_fast` does the same lookup and multiply, ``code[q] * absmax`` in float32 rounded once to
  the output dtype, slice by slice, with one trick: a (256, 2) table holds the values of both nibbles of every
  byte value, so one ``index_select`` of 8-byte rows decodes two elements at once without unpacking.

Both run on the caller's thread; torch parallelizes each slice's operations over its own intra-op threads (the
slices are large enough for that to pay). Nothing here changes torch's settings or keeps threads or buffers
between calls. Measured against bitsandbytes in ``benchmarks/bench_nf4.py``.

On CUDA there are no page faults to dodge: quantizing is the lesson's function, and dequantizing is the lesson's
lookup-and-multiply compiled by ``torch.compile`` into one fused kernel (4096 x 4096 on an H100: eager 0.315 ms,
compiled 0.095 ms, bitsandbytes' kernel 0.115 ms, bit-identical; ``qlora_edu/reference/gpu-facts.md``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch

from qlora_edu.ch02_nf4.guards import check_dequantize_4bit_args, check_quantize_4bit_args
from qlora_edu.ch02_nf4.quant4bit import dequantize_4bit, quantize_4bit
from qlora_edu.common.guards import check_float32_range

__all__ = ["quantize_4bit_fast", "dequantize_4bit_fast", "dequantize_4bit_unchecked", "byte_pair_table"]

#: Elements per slice on the CPU (rounded down to whole blocks). 2**18 to 2**21 measured alike on a 2-core x86
#: VM; much smaller slices pay Python's per-call overhead more often, much larger ones page-fault again.
SLICE_ELEMENTS = 1 << 18


def quantize_4bit_fast(x: torch.Tensor, code: torch.Tensor,
                       blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~qlora_edu.ch02_nf4.quant4bit.quantize_4bit`, the same bytes: slice by slice on a CPU, in one pass on
    CUDA."""
    check_quantize_4bit_args(x, code, blocksize)
    if x.device.type != "cpu":
        return quantize_4bit(x, code, blocksize)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty(math.ceil(n / 2), dtype=torch.uint8)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32)
    step = max(1, SLICE_ELEMENTS // blocksize) * blocksize  # whole blocks, so an even count
    try:
        for start in range(0, n, step):
            slice_packed, slice_absmax = quantize_4bit(flat[start:start + step], code, blocksize)
            packed[start // 2: start // 2 + slice_packed.numel()] = slice_packed.view(-1)
            absmax[start // blocksize: start // blocksize + slice_absmax.numel()] = slice_absmax
    except ValueError:
        check_quantize_4bit_args(x.float(), code, blocksize)  # not a bad argument: so a slice found NaN or inf,
        check_float32_range("x", x)  # or a float64 value too large for the float32 constants;
        raise ValueError(f"x must be finite: it holds {int((~torch.isfinite(x)).sum())} NaN or inf value(s)") \
            from None  # report the count for the whole tensor, not the slice
    return packed.view(-1, 1), absmax


def dequantize_4bit_fast(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: Sequence[int],
                         blocksize: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`~qlora_edu.ch02_nf4.quant4bit.dequantize_4bit`, the same values: a byte -> two values table on a CPU, a
    compiled kernel on CUDA."""
    shape = check_dequantize_4bit_args(packed, absmax, code, shape, blocksize, dtype)
    return dequantize_4bit_unchecked(packed, absmax, code.to(packed.device), shape, blocksize, dtype)


def byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 ``(256,)``: entry ``b`` holds the float32 values of byte ``b``'s two codes, ``code[b >> 4]`` then
    ``code[b & 15]``, as one 8-byte element, so one ``index_select`` decodes two weights without unpacking (about
    twice as fast as copying 2-float rows); viewing the result as float32 gives the values back in order."""
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous().view(torch.int64).flatten()


def dequantize_4bit_unchecked(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size,
                              blocksize: int, dtype: torch.dtype, pair_table: torch.Tensor | None = None
                              ) -> torch.Tensor:
    """:func:`dequantize_4bit_fast` for callers that checked the arguments already (``code`` on ``packed``'s
    device). :func:`qlora_edu.ch03_double_quant.nf4_codec.dequantize_nf4` runs on every weight in every pass of the
    QLoRA layer,
    and passes the ``pair_table`` it keeps per device: on a small weight, re-checking the code table and
    rebuilding the pair table cost as much as the lookup itself."""
    if packed.device.type == "cuda":
        return _dequantize_cuda(packed, absmax, code, shape, blocksize, dtype)
    if packed.device.type != "cpu":
        return dequantize_4bit(packed, absmax, code, shape, blocksize, dtype)
    if pair_table is None:
        pair_table = byte_pair_table(code)
    n = math.prod(shape)
    flat = packed.reshape(-1)
    out = torch.empty(n, dtype=dtype)
    n_full = n // blocksize
    half = blocksize // 2
    step = max(1, SLICE_ELEMENTS // blocksize)  # blocks per slice
    index = torch.empty(min(step, n_full) * half, dtype=torch.int32)  # index_select needs int32/int64 indices
    pairs = torch.empty(min(step, n_full) * half, dtype=torch.int64)
    for start in range(0, n_full, step):
        stop = min(n_full, start + step)
        k = (stop - start) * half
        index[:k].copy_(flat[start * half: stop * half])
        torch.index_select(pair_table, 0, index[:k], out=pairs[:k])
        values = pairs[:k].view(torch.float32).view(stop - start, blocksize)
        values.mul_(absmax[start:stop, None])  # the float32 product, in the slice's buffer
        # rounded to nearest even on the copy into `out` (a float32 multiply plus a copy is faster than a multiply
        # that writes bf16/fp16 directly; measured)
        out[start * blocksize: stop * blocksize].view(-1, blocksize).copy_(values)
    full = n_full * blocksize
    if full < n:  # the last, partial block: small, so the lesson's function does it
        out[full:] = dequantize_4bit(flat[full // 2:], absmax[-1:], code, (n - full,), blocksize, dtype)
    return out.view(shape)


def _lookup_multiply(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The lesson's dequantization, written for a compiler: unpack, look up, scale, round once."""
    q = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[q] * scale).to(dtype)


@functools.cache
def _compiled_lookup_multiply():
    return torch.compile(_lookup_multiply, dynamic=True)


def _dequantize_cuda(packed, absmax, code, shape, blocksize, dtype):
    n = math.prod(shape)
    try:
        out = _compiled_lookup_multiply()(packed.reshape(-1), absmax, code, n, blocksize, dtype)
    except Exception as err:  # noqa: BLE001 - no compiler (e.g. no Triton): the eager path gives the same values
        warnings.warn(f"torch.compile is unavailable here ({type(err).__name__}: {err}); "
                      "dequantizing with the eager lesson function instead", RuntimeWarning, stacklevel=3)
        _compiled_lookup_multiply.cache_clear()
        return dequantize_4bit(packed, absmax, code, shape, blocksize, dtype)
    return out.view(shape)
