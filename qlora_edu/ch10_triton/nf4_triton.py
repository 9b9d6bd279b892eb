"""Chapter 10: NF4 dequantization as one fused Triton kernel, bit for bit equal to the course's ``dequantize_nf4``.

An :class:`~qlora_edu.ch03_double_quant.nf4_tensor.NF4Tensor` with double quantization stores, for ``n`` weights::

    packed   uint8  (ceil(n / 2),)        two 4-bit NF4 codes a byte, the even element in the high nibble
    absmax   uint8  (ceil(n / 64),)       the 8-bit code of each block's constant, an index into the dynamic map
    absmax2  float32 (ceil(n / 64 / 256),) one second-level scale per 256 constants
    offset   float32 ()                   the constants' mean

and reading weight ``i`` back is two lookups and three float32 operations, each rounded as bitsandbytes rounds::

    b        = i // blocksize                                   # its block
    constant = dynamic_map[absmax[b]] * absmax2[b // blocksize2]  (rounded to float32)
               + offset                                           (rounded to float32)
    w[i]     = nf4[code_i] * constant                             (rounded to float32, then once to the dtype)

The course's :func:`~qlora_edu.ch03_double_quant.nf4_codec.dequantize_nf4` does this in several passes over memory
(the constants, then the lookup and the product); :func:`nf4_dequantize_kernel` does it in one: a program reads
``BLOCKS`` blocks of ``BLOCKSIZE`` weights, computes each block's constant once, and writes the weights, so each byte
of the stored weight is read once and each output element written once. No multiply-add is fused
(``enable_fp_fusion=False``): a fused ``a * b + c`` rounds once instead of twice and would change the last bit.

**A kernel is a Python function in Triton's language.** :func:`nf4_dequantize_kernel` is kept as a plain function
and :func:`launch_nf4_dequantize` decides how to run it: on a CUDA tensor it compiles it with ``triton.jit`` (once per
function), on a CPU tensor it runs it in Triton's interpreter (``triton.runtime.interpreter``, the machinery behind
``TRITON_INTERPRET=1``, but for this launch only, whatever the environment says). The interpreter runs each program
with numpy: exact for float32 and float16 results, but its float32 -> bfloat16 cast truncates instead of rounding to
nearest even (measured in ``tests/test_10_triton.py``), so on a CPU :func:`dequantize_nf4_triton` lets the kernel
write float32 and rounds to bfloat16 with torch. The interpreter cannot call other ``@triton.jit`` functions (such
as ``tl.cdiv``) unless ``TRITON_INTERPRET=1`` was set before triton was imported, so the kernel uses only the
core language.

Limits, the same as bitsandbytes' CUDA kernel (``int n``): fewer than ``2**31`` weights.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import types
from collections.abc import Callable

import torch

from qlora_edu.ch02_nf4.nf4 import nf4_code
from qlora_edu.ch03_double_quant.double_quant import dynamic_map
from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.ch10_triton.guards import (
    MAX_WEIGHTS,
    OUTPUT_DTYPES,
    check_dequantize_nf4_triton_args,
    check_launch_nf4_dequantize_args,
    check_nf4_dequantize_ptx_args,
    check_triton_dequantize_applies_args,
)

try:  # the kernel's body refers to `tl`; the module imports without triton (the chapter then says what is missing)
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    tl = None

__all__ = ["nf4_dequantize_kernel", "launch_nf4_dequantize", "dequantize_nf4_triton", "triton_dequantize_applies",
           "triton_available", "nf4_dequantize_ptx", "WEIGHTS_PER_PROGRAM"]

#: Weights one program writes (``BLOCKS * BLOCKSIZE``): 4,096 = 64 blocks of 64. On a GPU that is 32 weights for each
#: of a program's 128 threads (4 warps), enough to hide memory latency without spilling registers; 4,096 x 4,096
#: weights make 4,096 programs, about 30 for each of an H200's 132 streaming multiprocessors.
WEIGHTS_PER_PROGRAM = 4096


def nf4_dequantize_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                          BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """One program of the fused NF4 dequantization: ``BLOCKS`` consecutive blocks of ``BLOCKSIZE`` weights.

    Program ``p`` handles blocks ``p * BLOCKS ... p * BLOCKS + BLOCKS - 1`` as a ``(BLOCKS, BLOCKSIZE)`` tile: row
    ``r`` is block ``b = p * BLOCKS + r``, column ``c`` its weight ``i = b * BLOCKSIZE + c``. The last program's tile
    runs past the ``n`` weights (a partial last block, or fewer blocks than ``BLOCKS``): those lanes load nothing
    and store nothing (masks).

    Args (pointers are to the first element; the launcher passes tensors):
        packed_ptr: uint8, ``ceil(n / 2)`` bytes; weight ``i``'s code is the high nibble of byte ``i // 2`` when
            ``i`` is even, the low nibble when it is odd.
        codes_ptr: uint8, one 8-bit code per block (``NF4Tensor.absmax``), an index into ``dmap_ptr``.
        absmax2_ptr: float32, one scale per ``BLOCKSIZE2`` blocks.
        offset_ptr: float32, one value (the constants' mean).
        nf4_ptr: float32, NF4's 16 levels. dmap_ptr: float32, the signed dynamic map's 256 values.
        out_ptr: ``n`` elements of the output dtype (float32, float16 or bfloat16).
        n: the number of weights. BLOCKSIZE, BLOCKSIZE2, BLOCKS: powers of two, known when compiling.
    """
    # BEGIN SOLUTION
    # Hint: block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS) are this program's blocks (a (BLOCKS,) vector);
    # Hint: i = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :] their weights (BLOCKS, BLOCKSIZE).
    # Hint: masks: i < n for the weights, block < (n + BLOCKSIZE - 1) // BLOCKSIZE for the constants (no tl.cdiv).
    # Hint: constant = dmap[code] * absmax2[block // BLOCKSIZE2] + offset: load each with tl.load(ptr + index, mask,
    # Hint: other=0); then byte = packed[i // 2], code = byte >> 4 for even i, byte & 15 for odd (tl.where);
    # Hint: w = nf4[code] * constant[:, None]; tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=...).
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,) the blocks of this program
    i = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (BLOCKS, BLOCKSIZE) their weights
    is_weight = i < n  # the tail: a partial last block, or blocks past the end
    is_block = block < (n + BLOCKSIZE - 1) // BLOCKSIZE
    # 1. Each block's constant, once per block (BLOCKS values, not BLOCKS * BLOCKSIZE): two float32 roundings.
    code = tl.load(codes_ptr + block, mask=is_block, other=0)
    scale2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=is_block, other=0.0)
    constant = tl.load(dmap_ptr + code) * scale2 + tl.load(offset_ptr)
    # 2. Each weight's 4-bit code: two weights share a byte, the even one in the high nibble.
    byte = tl.load(packed_ptr + i // 2, mask=is_weight, other=0)
    q = tl.where(i % 2 == 0, byte >> 4, byte & 15)
    # 3. The NF4 level times its block's constant in float32, rounded once to the output's dtype.
    w = tl.load(nf4_ptr + q) * constant[:, None]
    tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=is_weight)
    # END SOLUTION


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (Linux wheels; none for macOS or Windows)."""
    return importlib.util.find_spec("triton") is not None


def triton_dequantize_applies(weight: object) -> bool:
    """Whether :func:`dequantize_nf4_triton` is the fast path for ``weight``: an :class:`NF4Tensor` with double
    quantization of a float32 / float16 / bfloat16 weight, on a CUDA device, of fewer than ``2**31`` weights, where
    triton imports. (It also runs on a CPU, in the interpreter, for the lesson and the tests: exact, but far slower
    than ``dequantize_nf4``.)"""
    check_triton_dequantize_applies_args(weight)
    return (isinstance(weight, NF4Tensor) and weight.device.type == "cuda" and weight.double_quant
            and weight.dtype in OUTPUT_DTYPES and weight.numel < MAX_WEIGHTS and triton_available())


def dequantize_nf4_triton(weight: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back from ``weight`` in one pass of :func:`nf4_dequantize_kernel`: equal, bit for bit, to
    ``dequantize_nf4(weight)`` (and to bitsandbytes' ``dequantize_4bit`` on the same stored bytes).

    Args:
        weight: an :class:`NF4Tensor` with double quantization (``quantize_nf4(x)``'s default), on CUDA (the kernel,
            compiled) or on the CPU (Triton's interpreter: slow, for the lesson and the tests).
        dtype: the output's dtype, float32, float16 or bfloat16; default ``weight.dtype``.

    Returns:
        A tensor of ``weight.shape`` and ``dtype`` on ``weight``'s device.
    """
    dtype = check_dequantize_nf4_triton_args(weight, dtype)
    # The interpreter's float32 -> bfloat16 cast truncates; there the kernel writes float32 and torch rounds.
    interpreted = weight.device.type != "cuda"
    kernel_dtype = torch.float32 if interpreted and dtype == torch.bfloat16 else dtype
    out = torch.empty(weight.shape, dtype=kernel_dtype, device=weight.device)
    launch_nf4_dequantize(nf4_dequantize_kernel, weight, out)
    return out if kernel_dtype == dtype else out.to(dtype)


def launch_nf4_dequantize(kernel: Callable, weight: NF4Tensor, out: torch.Tensor) -> torch.Tensor:
    """Run ``kernel`` (a function with :func:`nf4_dequantize_kernel`'s signature, plain or ``@triton.jit``) over
    ``weight``, writing ``out`` (``weight.numel`` contiguous elements, float32 / float16 / bfloat16, same device).

    One program per ``WEIGHTS_PER_PROGRAM // blocksize`` blocks (at least one block). On CUDA the kernel is
    compiled by ``triton.jit`` without fused multiply-adds; on a CPU it runs in Triton's interpreter. Returns ``out``.
    """
    check_launch_nf4_dequantize_args(kernel, weight, out)
    nf4, dmap = _format_tables(weight.device)
    blocks = max(1, WEIGHTS_PER_PROGRAM // weight.blocksize)
    grid = (math.ceil(math.ceil(weight.numel / weight.blocksize) / blocks),)
    runner = _compiled(_python_function(kernel)) if weight.device.type == "cuda" else _interpreted(kernel)
    try:
        runner[grid](weight.packed, weight.absmax, weight.absmax2, weight.offset, nf4, dmap, out, weight.numel,
                     BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2, BLOCKS=blocks, enable_fp_fusion=False)
    except Exception as err:
        raise _readable(err) from None
    return out


def nf4_dequantize_ptx(capability: int = 90, dtype: torch.dtype = torch.bfloat16, fp_fusion: bool = False) -> str:
    """The PTX (NVIDIA's GPU assembly) Triton makes of :func:`nf4_dequantize_kernel` for a GPU of compute
    ``capability`` (90: H100 / H200), writing ``dtype``, with or without fused multiply-adds; no GPU needed.

    Compiled as the launcher compiles it (block 64, second level 256, ``WEIGHTS_PER_PROGRAM`` weights a program,
    4 warps), with every pointer and ``n`` taken as divisible by 16, as Triton's launcher specializes them for torch's
    allocations. Uses Triton's ahead-of-time API (``triton.compile`` of an ``ASTSource``), which runs the whole
    tool chain (the PTX assembler, bundled with Triton, included) on the CPU.
    """
    check_nf4_dequantize_ptx_args(capability, dtype, fp_fusion)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointee = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    signature = {"packed_ptr": "*u8", "codes_ptr": "*u8", "absmax2_ptr": "*fp32", "offset_ptr": "*fp32",
                 "nf4_ptr": "*fp32", "dmap_ptr": "*fp32", "out_ptr": f"*{pointee}", "n": "i32",
                 "BLOCKSIZE": "constexpr", "BLOCKSIZE2": "constexpr", "BLOCKS": "constexpr"}
    aligned = {(k,): [["tt.divisibility", 16]] for k in range(8)}
    source = ASTSource(fn=_compiled(_python_function(nf4_dequantize_kernel)), signature=signature,
                       constexprs={"BLOCKSIZE": 64, "BLOCKSIZE2": 256, "BLOCKS": WEIGHTS_PER_PROGRAM // 64},
                       attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"enable_fp_fusion": fp_fusion, "num_warps": 4})
    return compiled.asm["ptx"]


@functools.cache
def _format_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4's 16 levels and the signed dynamic map's 256 values on ``device``, built once per device (constants of
    the format; never handed out, so nothing changes them in place)."""
    return nf4_code().to(device), dynamic_map(True).to(device)


def _python_function(kernel: Callable) -> Callable:
    """The plain Python function of ``kernel``: through ``functools.wraps`` wrappers (the battery's) and
    ``triton.jit`` (its ``.fn``), under the name it was defined with (Triton finds a kernel in its re-compiled source
    by that name, so a function renamed after its ``def`` would not be found)."""
    fn = inspect.unwrap(kernel)
    fn = inspect.unwrap(getattr(fn, "fn", fn))
    if fn.__name__ != fn.__code__.co_name:
        renamed = fn
        fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__code__.co_name, fn.__defaults__, fn.__closure__)
        fn.__kwdefaults__, fn.__annotations__ = renamed.__kwdefaults__, renamed.__annotations__
    return fn


@functools.cache
def _compiled(fn: Callable):
    """``triton.jit(fn)``, once per function: Triton then caches one binary per dtype and block sizes."""
    import triton

    return triton.jit(fn)


def _interpreted(kernel: Callable):
    """``kernel`` as Triton's interpreter runs it, for CPU tensors (a fresh wrapper: it costs nothing to make)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_python_function(kernel))


def _readable(err: Exception) -> Exception:
    """The error a kernel raised, not the interpreter's wrapper around it (so a stub's NotImplementedError reads as
    one), and a sentence for the interpreter's one surprise."""
    cause = err.__cause__ if type(err).__name__ == "InterpreterError" and err.__cause__ is not None else err
    if "Cannot call @triton.jit'd outside of the scope of a kernel" in str(cause):
        return RuntimeError("the kernel called another @triton.jit function (tl.cdiv, say): Triton's interpreter, "
                            "which runs kernels on a CPU here, cannot; write it out, e.g. (n + B - 1) // B")
    return cause
