# %% [markdown]
# # Exercise 10: your own GPU kernel
#
# In [chapter 10](../notebooks/10_triton.ipynb) you saw why dequantizing an NF4 weight is bound by memory, not by
# arithmetic, and how a Triton kernel does it in one pass. Now you write the kernel's body yourself:
#
# `nf4_dequantize_kernel(packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dmap_ptr, out_ptr, n,
# BLOCKSIZE, BLOCKSIZE2, BLOCKS)`: one *program* reads `BLOCKS` consecutive blocks of `BLOCKSIZE` weights and writes
# them, in float32, float16 or bfloat16 (whatever `out_ptr` points to).
#
# The launcher is given: `launch_nf4_dequantize(kernel, weight, out)` starts one program per `BLOCKS` blocks
# (`BLOCKS * BLOCKSIZE = 4096` weights). On a CUDA GPU it compiles your function with `triton.jit`; on a CPU it runs
# it in **Triton's interpreter**, which executes each program with numpy: slow, but exact, and every check below runs
# there. (Triton's interpreter cannot call other `@triton.jit` functions such as `tl.cdiv` here: write
# `(n + B - 1) // B`.)
#
# The check at the end runs the chapter's battery against *your* kernel: every output bit against bitsandbytes'
# `dequantize_4bit` on the bytes bitsandbytes stored, partial blocks, odd sizes, other block sizes, float16, and
# nothing written past the end of the output.

# %% tags=["setup"]
import torch
import triton.language as tl

from qlora_edu import dequantize_nf4, launch_nf4_dequantize, quantize_nf4

# %% [markdown]
# ## Exercise 10.1: the kernel
#
# For the weights `i` of this program's blocks (a `(BLOCKS, BLOCKSIZE)` tile: row `r` is block
# `b = program_id * BLOCKS + r`, column `c` its weight `i = b * BLOCKSIZE + c`):
#
# 1. **each block's constant**, once per block: `dmap[code[b]] * absmax2[b // BLOCKSIZE2] + offset` in float32 (the
#    product first, then the sum: two roundings, as bitsandbytes does);
# 2. **each weight's 4-bit code**: byte `i // 2` holds two; the even weight is its **high** nibble (`byte >> 4`),
#    the odd one the low nibble (`byte & 15`);
# 3. **the weight**: `nf4[code] * constant`, in float32, rounded **once** when stored:
#    `w.to(out_ptr.dtype.element_ty)`.
#
# The tile of the last program runs past the `n` weights (a partial block, or fewer blocks than `BLOCKS`): load and
# store with masks (`tl.load(ptr, mask=..., other=0)`, `tl.store(ptr, value, mask=...)`).

# %%
# @solution qlora_edu.ch10_triton.nf4_triton.nf4_dequantize_kernel

# %% [markdown]
# Try it on a small weight (on a CPU this runs in the interpreter: a few hundredths of a second): the same bits as
# the course's `dequantize_nf4`?

# %%
x = torch.randn(5, 3, 33, generator=torch.Generator().manual_seed(0))
weight = quantize_nf4(x)
out = torch.empty(weight.numel, dtype=torch.float32)
launch_nf4_dequantize(nf4_dequantize_kernel, weight, out)
expected = dequantize_nf4(weight).flatten()
print(f"{weight.numel} weights, {weight.absmax.numel()} blocks; the same bits as dequantize_nf4: "
      f"{torch.equal(out.view(torch.int32), expected.view(torch.int32))}")

# %% [markdown]
# ## Check your work

# %%
from qlora_edu import check

check(nf4_dequantize_kernel)

# %% [markdown]
# ## Questions
#
# **Q1.** Why does one program handle 64 blocks of 64 weights, and not one weight (or one block)?

# %% [markdown] tags=["answer"]
# **Answer.** A program is the unit Triton schedules: its tile is spread over the threads of a few warps, and each
# program has a fixed cost (starting it, computing its indices, loading the constants). One weight per program would
# start 16.8 M programs for a 4096 × 4096 weight and leave each thread one element; one block (64 weights) per
# program is too little work for 128 threads to hide the latency of memory. 4,096 weights per program is 32 per
# thread, 4,096 programs for 4096 × 4096: about 30 per streaming multiprocessor of an H200, enough to keep all of
# them busy, and each block's constant is computed once, for 64 weights.

# %% [markdown]
# **Q2.** The launcher compiles with `enable_fp_fusion=False`. What would a fused multiply-add change, and why does
# the interpreter not show it?

# %% [markdown] tags=["answer"]
# **Answer.** `dmap[code] * absmax2 + offset` fused into one FMA rounds once instead of twice, so some constants
# change in their last bit, and with them every weight of their block: no longer bit-identical to bitsandbytes
# (whose CUDA path multiplies in one kernel and adds the offset in another). On a GPU the compiler fuses by default.
# The interpreter runs numpy operations one at a time, always rounding twice, so only the GPU case of the battery
# can catch it.

# %% [markdown]
# **Q3.** A kernel that loads `packed_ptr + i // 2` *without* a mask still passes every value check. Is it right?

# %% [markdown] tags=["answer"]
# **Answer.** Not quite. The lanes past the end read bytes that do not belong to the weight; their values are never
# stored, so no output shows it, but on a GPU a read past the end of an allocation can fault (an illegal memory
# access) when the weight ends near a page boundary. Keep the masks on loads as well as on stores.
