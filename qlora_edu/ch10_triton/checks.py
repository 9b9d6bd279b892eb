"""Battery for chapter 10: the fused NF4 dequantization kernel, ``nf4_dequantize_kernel``.

Every case launches the kernel through the package's launcher (``launch_nf4_dequantize``: Triton's interpreter on a
CPU, the compiled kernel on CUDA) on stored bytes that come from bitsandbytes 0.50.2 (``quantize_4bit(...,
quant_type="nf4", compress_statistics=True)``'s packed bytes and ``QuantState``) or are drawn at random, and compares
every output bit with bitsandbytes' ``dequantize_4bit`` on the same bytes or with a reference written here from
bitsandbytes' tables; never with ``qlora_edu``.

A kernel writes through raw pointers, and a wrong one can write past the end of its output or read past its inputs.
So every launch here hands the kernel views into larger buffers ("fences", filled with a known pattern): a missing
mask then writes into the fence, where a case sees it, instead of into someone else's memory, and a read past an
input reads the fence's pattern, which shows up in the output.

The interpreter's float32 -> bfloat16 cast truncates instead of rounding to nearest even, so bfloat16 output is
checked on CUDA only (``requires="cuda"``); float32 and float16 output are exact under the interpreter.
"""

from __future__ import annotations

import copy
import math

import torch

from qlora_edu.ch02_nf4.checks import NF4_TABLE
from qlora_edu.checks import CheckFailure, bits, bnb_functional, case, expect_equal, expect_true, mistake

try:  # the mistakes below are kernels written in Triton's language; without triton their cases are skipped
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    tl = None

#: Elements of padding after each buffer handed to a kernel, beyond the weight count: more than one program's tile
#: (4,096 weights), so that a missing mask, or a byte index not halved, stays inside the fence.
FENCE = 3 * 4096
#: The pattern of the output's fence: a NaN with a payload no float arithmetic produces.
FENCE_BITS = 0x7FC0_BEEF

# (shape, input dtype): 1-D, a single partial block, odd counts (a pad nibble), partial blocks, 3-D, several programs,
# more than 256 blocks (two second-level blocks). No shape with several rows whose last dimension is a multiple of 16
# but not of 64: bitsandbytes 0.50.2 dequantizes those wrongly on AVX512 CPUs (qlora_edu/reference/).
SHAPES = [((1,), torch.float32), ((7,), torch.bfloat16), ((3, 37), torch.float32), ((5, 3, 33), torch.bfloat16),
          ((64, 64), torch.float16), ((2, 4097), torch.float32), ((300, 70), torch.bfloat16)]


def _sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Heavy-tailed weights, so that the blocks' constants differ a lot."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))).to(dtype)


def _fenced(t: torch.Tensor, fill: float | int, n: int) -> torch.Tensor:
    """A copy of ``t`` that is the front of a buffer ``n + FENCE`` elements longer (``n``: the weight count), the
    rest filled with ``fill``."""
    buffer = torch.full((t.numel() + n + FENCE,), fill, dtype=t.dtype, device=t.device)
    buffer[: t.numel()] = t.flatten()
    return buffer[: t.numel()].view(t.shape)


def _stored(packed, codes, offset, absmax2, shape, blocksize, blocksize2):
    """An NF4Tensor over fenced copies of the stored parts (a read past one of them reads 0xFF bytes or NaN)."""
    from qlora_edu import NF4Tensor

    n = math.prod(shape)
    return NF4Tensor(_fenced(packed, 255, n), _fenced(codes, 255, n), torch.Size(shape), torch.float32, blocksize,
                     True, _fenced(offset.reshape(()).float(), math.nan, n), _fenced(absmax2, math.nan, n), blocksize2)


def _from_bitsandbytes(x: torch.Tensor):
    """bitsandbytes' NF4 storage of ``x`` (double quantization) as a fenced NF4Tensor, and its quant_state."""
    packed, state = bnb_functional().quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    weight = _stored(packed, state.absmax, state.offset, state.state2.absmax, x.shape, state.blocksize,
                     state.state2.blocksize)
    return weight, packed, state


def _bnb_dequantize(packed, state, shape, dtype):
    """bitsandbytes' ``dequantize_4bit`` to ``dtype`` (its output dtype is the state's)."""
    state = copy.copy(state)
    state.dtype = dtype
    return bnb_functional().dequantize_4bit(packed, state).reshape(shape)


def _reference_values(weight, dtype: torch.dtype) -> torch.Tensor:
    """What the kernel must write, computed here with torch from bitsandbytes' tables, in bitsandbytes' float32
    steps: ``constant = dmap[code] * absmax2`` then ``+ offset`` (two roundings), ``nf4[q] * constant`` (one), one
    cast to ``dtype``."""
    nf4 = torch.tensor(NF4_TABLE, dtype=torch.float32)
    dmap = bnb_functional().create_dynamic_map(signed=True)
    n, m = weight.numel, weight.absmax.numel()
    codes, absmax2, offset = weight.absmax.cpu(), weight.absmax2.cpu(), weight.offset.cpu()
    constant = dmap[codes.long()] * absmax2.repeat_interleave(weight.blocksize2)[:m] + offset
    flat = weight.packed.cpu().flatten().long()
    q = torch.stack([flat >> 4, flat & 15], dim=1).flatten()[:n]
    return (nf4[q] * constant.repeat_interleave(weight.blocksize)[:n]).to(dtype).view(weight.shape)


def _launch(impl, weight, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Run ``impl``'s kernel on ``weight`` into a fenced output; ``(output in weight's shape, fence untouched)``."""
    n = weight.numel
    buffer = torch.full((n + FENCE,), FENCE_BITS, dtype=torch.int32, device=weight.device)
    out_bytes = buffer.view(torch.uint8)[: n * dtype.itemsize]
    out = out_bytes.view(dtype)
    fence = buffer.view(torch.uint8)[n * dtype.itemsize:]
    before = fence.clone()
    impl.launch_nf4_dequantize(impl.nf4_dequantize_kernel, weight, out)
    return out.view(weight.shape).clone(), bool(torch.equal(fence, before))


def _label(shape, dtype) -> str:
    return f"{tuple(shape)} to {str(dtype).removeprefix('torch.')}"


# ----------------------------------------------------------------------------------- cases


@case("nf4_dequantize_kernel", requires="triton",
      hint="constant = dmap[code] * absmax2[block // BLOCKSIZE2] + offset (product first, then the sum); the even "
           "weight i is the HIGH nibble of byte i // 2; w = nf4[q] * constant, rounded once to the output dtype",
      code_hint="q = tl.where(i % 2 == 0, byte >> 4, byte & 15); constant = tl.load(dmap_ptr + code) * "
                "tl.load(absmax2_ptr + block // BLOCKSIZE2, ...) + tl.load(offset_ptr)")
def kernel_equals_bitsandbytes_float32(impl):
    """float32 output on the bytes bitsandbytes stored, on every shape of ``SHAPES`` (1-D, partial blocks, odd sizes,
    several programs, two second-level blocks), bit for bit equal to the reference written here from bitsandbytes'
    tables, and to bitsandbytes' ``dequantize_4bit`` itself where the last dimension is even (for an odd one
    bitsandbytes 0.50.2 compiles a fallback with torch.compile, seconds per shape on two cores;
    ``tests/test_10_triton.py`` compares two such shapes with it once)."""
    for k, (shape, dtype) in enumerate(SHAPES):
        x = _sample(shape, dtype, seed=k)
        weight, packed, state = _from_bitsandbytes(x)
        got, _ = _launch(impl, weight, torch.float32)
        expected = _reference_values(weight, torch.float32)
        expect_equal(f"float32 bits of the kernel's output, {_label(shape, torch.float32)}", bits(got),
                     bits(expected))
        if shape[-1] % 2 == 0:
            expected = _bnb_dequantize(packed, state, shape, torch.float32)
            expect_equal(f"float32 bits of the kernel's output vs bitsandbytes, {_label(shape, torch.float32)}",
                         bits(got), bits(expected))


@case("nf4_dequantize_kernel", requires="triton",
      hint="the last program's tile runs past the n weights: store with mask=(i < n)",
      code_hint="tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=i < n)")
def kernel_writes_nothing_past_the_end(impl):
    """Weights that are not a multiple of a program's tile: nothing is written past the ``n``-th output element."""
    for k, shape in enumerate([(7,), (5, 3, 33), (2, 4097)]):
        weight, _, _ = _from_bitsandbytes(_sample(shape, torch.float32, seed=10 + k))
        for dtype in (torch.float32, torch.float16):
            _, fence_intact = _launch(impl, weight, dtype)
            if not fence_intact:
                raise CheckFailure(f"the kernel wrote past the end of its output ({_label(shape, dtype)}, "
                                   f"{weight.numel} weights)", "nothing written after element n",
                                   "the fence after the output was overwritten")


@case("nf4_dequantize_kernel", requires="triton",
      hint="multiply in float32 and round once, when storing: w.to(out_ptr.dtype.element_ty); rounding the level "
           "and the constant to float16 first rounds three times")
def kernel_rounds_once_to_float16(impl):
    """float16 output, bit for bit equal to bitsandbytes' (the float32 product rounded once, to nearest even)."""
    for k, shape in enumerate([(6, 3, 34), (300, 70)]):  # even last dimensions: bitsandbytes' fast path
        x = _sample(shape, torch.bfloat16, seed=20 + k)
        weight, packed, state = _from_bitsandbytes(x)
        got, _ = _launch(impl, weight, torch.float16)
        expected = _bnb_dequantize(packed, state, shape, torch.float16)
        expect_equal(f"the kernel's output, {_label(shape, torch.float16)}", got.view(torch.int16),
                     expected.view(torch.int16))


@case("nf4_dequantize_kernel", requires="triton",
      hint="use the BLOCKSIZE and BLOCKSIZE2 the kernel is given, never 64 or 256 written in: QLoRA's sizes are "
           "only the default")
def kernel_follows_the_block_sizes(impl):
    """Random stored bytes with other block sizes (32 / 32 and 128 / 64, partial blocks at both levels), against a
    reference written here from bitsandbytes' NF4 table and dynamic map, in the same float32 steps."""
    for k, (shape, blocksize, blocksize2) in enumerate([((1061,), 32, 32), ((3, 3001), 128, 64)]):
        g = torch.Generator().manual_seed(30 + k)
        n = math.prod(shape)
        m = math.ceil(n / blocksize)
        packed = torch.randint(0, 256, (math.ceil(n / 2), 1), generator=g, dtype=torch.uint8)
        codes = torch.randint(0, 256, (m,), generator=g, dtype=torch.uint8)
        absmax2 = torch.rand(math.ceil(m / blocksize2), generator=g) * 0.5 + 0.01
        offset = torch.rand((), generator=g)
        weight = _stored(packed, codes, offset, absmax2, shape, blocksize, blocksize2)
        got, _ = _launch(impl, weight, torch.float32)
        expect_equal(f"float32 bits, {tuple(shape)}, blocksize {blocksize}, blocksize2 {blocksize2}", bits(got),
                     bits(_reference_values(weight, torch.float32)))


@case("nf4_dequantize_kernel", requires=("cuda", "triton"),
      hint="on a GPU the kernel is compiled: bfloat16 output must equal bitsandbytes' CUDA kernel's bit for bit")
def kernel_equals_bitsandbytes_on_cuda(impl):
    """Compiled on CUDA, every output dtype (bfloat16 included), bit for bit equal to bitsandbytes' CUDA
    ``dequantize_4bit`` on the bytes its CUDA ``quantize_4bit`` stored; odd shapes and the benchmark's shapes."""
    shapes = [(1,), (5, 3, 33), (2, 4097), (576, 576), (1536, 576), (4096, 4096), (11008, 4096)]
    for k, shape in enumerate(shapes):
        x = _sample(shape, torch.bfloat16, seed=40 + k).cuda()
        weight, packed, state = _from_bitsandbytes(x)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            got, fence_intact = _launch(impl, weight, dtype)
            expected = _bnb_dequantize(packed, state, shape, dtype)
            expect_true(fence_intact, f"the kernel wrote past the end of its output ({_label(shape, dtype)})")
            expect_equal(f"the kernel's output on CUDA, {_label(shape, dtype)}",
                         got.view(torch.uint8).cpu(), expected.view(torch.uint8).cpu())


# ----------------------------------------------------------------------------------- known mistakes
# Each is the reference kernel below with one switch on (a plain Python function called from the kernel: that runs
# in the interpreter, where these cases run); with every switch off it passes the battery
# (tests/test_10_triton.py checks that control), so a failure is the mistake's own.


@mistake("nf4_dequantize_kernel", caught_by=kernel_equals_bitsandbytes_float32)
def kernel_nibbles_swapped(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                           BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """The even weight read from the low nibble."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, swap_nibbles=True)


@mistake("nf4_dequantize_kernel", caught_by=kernel_equals_bitsandbytes_float32)
def kernel_constant_of_wrong_block(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """The second-level scale of block ``block // BLOCKSIZE`` instead of ``block // BLOCKSIZE2``."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, second_level_by=BLOCKSIZE)


@mistake("nf4_dequantize_kernel", caught_by=kernel_equals_bitsandbytes_float32)
def kernel_offset_forgotten(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """The constant read back as ``dmap[code] * absmax2``, without the offset."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, add_offset=False)


@mistake("nf4_dequantize_kernel", caught_by=kernel_equals_bitsandbytes_float32)
def kernel_offset_before_scale(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                               BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """``(dmap[code] + offset) * absmax2``: the offset added before the scale."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, offset_first=True)


@mistake("nf4_dequantize_kernel", caught_by=kernel_equals_bitsandbytes_float32)
def kernel_byte_index_not_halved(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """Weight ``i`` read from byte ``i`` instead of byte ``i // 2``."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, byte_per_weight=True)


@mistake("nf4_dequantize_kernel", caught_by=kernel_writes_nothing_past_the_end)
def kernel_tail_not_masked(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                           BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """The store without a mask: the last program writes its whole tile."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, mask_store=False)


@mistake("nf4_dequantize_kernel", caught_by=kernel_rounds_once_to_float16)
def kernel_rounds_in_output_dtype(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                                  BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """The level and the constant cast to the output dtype before the multiply."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, multiply_in_output_dtype=True)


@mistake("nf4_dequantize_kernel", caught_by=kernel_follows_the_block_sizes)
def kernel_blocksize2_written_in(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """``block // 256`` written in: right for QLoRA's block sizes (the first case passes), wrong for others."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, second_level_by=256)


def _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS, *, swap_nibbles=False, second_level_by=None, add_offset=True,
                      offset_first=False, byte_per_weight=False, mask_store=True, multiply_in_output_dtype=False):
    """The kernel's body (written here, not the package's), one switch per mistake. Runs inside a kernel, under the
    interpreter (a plain function, not ``@triton.jit``: the interpreter calls it as Python)."""
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    i = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    is_weight = i < n
    is_block = block < (n + BLOCKSIZE - 1) // BLOCKSIZE
    code = tl.load(codes_ptr + block, mask=is_block, other=0)
    scale2 = tl.load(absmax2_ptr + block // (second_level_by or BLOCKSIZE2), mask=is_block, other=0.0)
    level2 = tl.load(dmap_ptr + code)
    offset = tl.load(offset_ptr) if add_offset else 0.0
    constant = (level2 + offset) * scale2 if offset_first else level2 * scale2 + offset
    byte = tl.load(packed_ptr + (i if byte_per_weight else i // 2), mask=is_weight, other=0)
    high, low = byte >> 4, byte & 15
    q = tl.where(i % 2 == 0, low, high) if swap_nibbles else tl.where(i % 2 == 0, high, low)
    level = tl.load(nf4_ptr + q)
    out_type = out_ptr.dtype.element_ty
    if multiply_in_output_dtype:
        w = level.to(out_type) * constant[:, None].to(out_type)
    else:
        w = level * constant[:, None]
    tl.store(out_ptr + i, w.to(out_type), mask=is_weight if mask_store else None)


def reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, BLOCKS: tl.constexpr):
    """The control: :func:`_reference_kernel` with every switch off (must pass the whole battery)."""
    _reference_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n, BLOCKSIZE,
                      BLOCKSIZE2, BLOCKS)


# Equivalent mistakes, not declared (no output can tell them from the right kernel, so no case can catch them):
# * the loads without their masks: the lanes past the end read bytes (of the fence here, of whatever follows on a
#   GPU) whose values are never stored. On a GPU such a read can still fault at the end of an allocation: keep them.
# * a fused multiply-add for the constant (tl.fma): the interpreter computes it as a product and a sum, rounded
#   twice, so it agrees on a CPU; compiled on a GPU it rounds once and the CUDA case catches its last bits.
