# %% [markdown]
# # Exercise 5: AdamW and its 8-bit states
#
# In [chapter 5](../notebooks/05_optimizers.ipynb) you saw AdamW's update, how 8-bit AdamW stores its two
# states in one byte per element, and what paging does with them. Now you write the three functions that
# an 8-bit AdamW step is made of:
#
# 1. `adamw_step(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay)`: one
#    AdamW update, in place;
# 2. `quantize_blockwise_8bit(x, code, blocksize=256, *, lookup=None) -> (codes, absmax)`: a state to one
#    byte per element plus one float32 per block of 256;
# 3. `dequantize_blockwise_8bit(codes, absmax, code, blocksize=256, shape=None) -> x`: back to float32.
#
# They have the same names and signatures as in `qlora_edu`, and the check runs **the same test battery**
# as the package's tests against *your* functions: `adamw_step` against the formula in float64 and against
# `torch.optim.AdamW` over 30 steps; the quantizer against `bitsandbytes.functional.quantize_blockwise`
# byte for byte; and, a stretch goal, all three inside an 8-bit AdamW next to `bitsandbytes.optim.AdamW8bit`,
# bit for bit, reporting the first step and element where they part. The argument checks at the top of each function are
# given; write the part marked `YOUR CODE HERE`.

# %% tags=["setup"]
import math

import torch
import torch.nn.functional as F

from qlora_edu import STATE_BLOCKSIZE
from qlora_edu.ch03_double_quant.double_quant import GRID_POINTS, grid_lookup_table
from qlora_edu.ch05_optimizers.guards import (
    check_adamw_step_args,
    check_dequantize_blockwise_8bit_args,
    check_quantize_blockwise_8bit_args,
)
from qlora_edu.common.guards import n_blocks

# %% [markdown]
# ## Exercise 5.1: the AdamW update
#
# For a parameter `p` with gradient `g` at step `t = 1, 2, ...`:
#
# $$p \leftarrow p\,(1 - \text{lr}\cdot\text{wd}), \qquad m \leftarrow \beta_1 m + (1-\beta_1)\,g, \qquad
#   v \leftarrow \beta_2 v + (1-\beta_2)\,g^2,$$
#
# $$p \leftarrow p - \text{lr}\cdot\frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}.$$
#
# Everything in place: `param`, `exp_avg` (m) and `exp_avg_sq` (v) are the optimizer's own tensors, so
# `exp_avg = beta1 * exp_avg + ...` (a new tensor under the old name) would lose the update. The formula
# alone is what the check grades: float64 to 1e-14 and torch to 1e-6. Matching bitsandbytes **bit for bit**
# is a stretch goal, a case of its own: the float32 operations must also be arranged as its kernel does
# (the check shows the arrangement once that case has failed twice).

# %%
# @solution qlora_edu.ch05_optimizers.optim.adamw_step

# %% [markdown]
# Try it: one step from zero states on `p = [1, -2]` with `g = [0.5, 0.5]`. At step 1 the bias corrections
# make `m_hat = g` and `v_hat = g²`, so each element moves by almost exactly `lr` against its gradient's
# sign, after the decay shrinks it by `lr · wd`.

# %%
# NBVAL_CHECK_OUTPUT
p, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
m, v = torch.zeros(2), torch.zeros(2)
adamw_step(p, g, m, v, 1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
print("param:", [round(x, 6) for x in p.tolist()], " m:", [round(x, 6) for x in m.tolist()],
      " v:", [round(x, 8) for x in v.tolist()])

# %% [markdown]
# ## Exercise 5.2: quantize a state blockwise to 8 bits
#
# Cut `x.flatten()` into blocks of `blocksize` (the last may be partial); per block keep
# `absmax = max |x|` (float32) and turn each `x * (1 / absmax)`, a value in `[-1, 1]`, into the index of a
# code in `code` (256 sorted values: the signed dynamic map for Adam's m, the unsigned one for v). To store
# the bytes bitsandbytes' CPU kernel stores, round as chapter 3 did: snap to its 65,536-point grid in
# float32 and look the grid point's code up in `lookup` (built for you from `code`).
#
# An all-zero block has `absmax = 0` and `0 * (1 / 0) = NaN`: bitsandbytes sends it to grid point 0. Any
# code read back is multiplied by 0, so nothing is lost.

# %%
# @solution qlora_edu.ch05_optimizers.blockwise8bit.quantize_blockwise_8bit

# %% [markdown]
# ## Exercise 5.3: read it back

# %%
# @solution qlora_edu.ch05_optimizers.blockwise8bit.dequantize_blockwise_8bit

# %%
# NBVAL_CHECK_OUTPUT
from qlora_edu import dynamic_map

state = torch.tensor([3e-1, -2e-2, 1e-3, -4e-5, 0.0, 7e-7])
codes, absmax = quantize_blockwise_8bit(state, dynamic_map(signed=True))
back = dequantize_blockwise_8bit(codes, absmax, dynamic_map(signed=True))
print("codes :", codes.tolist(), " absmax:", absmax.tolist())
print("back  :", [f"{x:.3g}" for x in back.tolist()])

# %% [markdown]
# Five decades below the block's absmax, `-4e-5` still comes back within 20%. The last two do not: `0.0`
# and `7e-7` both come back as `6.37e-06`. The dynamic map has levels down to `5.5e-7 × absmax`, but the
# CPU grid snap (chapter 3) cannot tell apart scaled values closer than `2 / 65535 ≈ 3e-5`, so everything
# below about `2e-5 × absmax` lands on the same code. That is bitsandbytes' CPU behaviour, and the bytes you
# must match; its CUDA kernel rounds to the exactly nearest code instead.

# %% [markdown]
# ## Check your work
#
# This runs every case of the battery that uses one of your functions and prints the first failure with
# what was expected, what came back and a hint. The optimizer cases name the first step, parameter, tensor
# and element where your version and the reference (torch's or bitsandbytes' optimizer) part ways.

# %%
from qlora_edu import check

check(adamw_step, quantize_blockwise_8bit, dequantize_blockwise_8bit)

# %% [markdown]
# ## Exercise 5.4: your 8-bit AdamW next to bitsandbytes', on LoRA-shaped tensors
#
# The course's `AdamW8bit` calls three functions per parameter, and they are class attributes, so a
# subclass can use yours. Run it next to `bitsandbytes.optim.AdamW8bit` for 50 steps on the shapes of one
# LoRA layer of the course model at r = 16 (the A and B of `q_proj` and `k_proj`) and print the first
# difference (`qlora_edu.lockstep_mismatch`: `None` means every parameter bit, code and absmax agreed after
# every step). Which of the four tensors keeps float32 states, and why?

# %%
import logging

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a note about the optional `kernels` package
import bitsandbytes as bnb

from qlora_edu import MIN_8BIT_SIZE, AdamW8bit, lockstep_mismatch


class MyAdamW8bit(AdamW8bit):
    update = staticmethod(adamw_step)
    quantize = staticmethod(quantize_blockwise_8bit)
    dequantize = staticmethod(dequantize_blockwise_8bit)


lora_shapes = [(16, 576), (576, 16), (16, 576), (192, 16)]  # q_proj A, B; k_proj A, B
# BEGIN SOLUTION
mismatch = lockstep_mismatch(lambda ps: MyAdamW8bit(ps, lr=1e-3), lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3),
                             lora_shapes, steps=50)
print("first difference over 50 steps:", mismatch)
for shape in lora_shapes:
    n = math.prod(shape)
    print(f"{str(shape):>10}: {n:6,} elements -> {'8-bit' if n >= MIN_8BIT_SIZE else 'float32'} states")
# END SOLUTION

# %% [markdown] tags=["answer"]
# **Answer.** No difference in 50 steps. The B matrix of `k_proj` (192 × 16 = 3,072 elements) is under
# `MIN_8BIT_SIZE = 4,096`, so both optimizers keep its states in float32 (bitsandbytes' `min_8bit_size`):
# for a tensor that small the 8-bit saving is a few KiB and not worth a second code path per step. With LoRA
# this is not negligible: on the course model those tensors lift the average from 2.03 to 2.26 bytes per
# parameter (chapter 5, section 4).

# %% [markdown]
# ## Exercise 5.5: why a dynamic map? Measured with your quantizer
#
# Adam's second moment `v` is a running mean of `g²`, and gradients differ by orders of magnitude from one
# element to the next, so `v` spans many decades inside one block. Below, 50 steps of `torch.optim.AdamW`
# on a least-squares problem whose 64 input features have scales from 1e-3 to 1 give a real `v`. Quantize it
# with your functions twice: with the unsigned dynamic map, and with a *linear* map of 256 evenly spaced
# levels (`torch.linspace(0, 1, 256)`, a valid `code` too). For each, print, over the non-zero elements of
# `v`, the share that reads back as exactly 0, the share that reads back within 10% of its value, and the
# median relative error `|v̂ - v| / v`.

# %%
g = torch.Generator().manual_seed(0)
features = torch.randn(512, 64, generator=g) * torch.logspace(-3, 0, 64)  # column scales 1e-3 .. 1
targets = features @ torch.randn(64, 32, generator=g)
weight = torch.nn.Parameter(torch.zeros(64, 32))
opt = torch.optim.AdamW([weight], lr=1e-2)
for _ in range(50):
    opt.zero_grad()
    ((features @ weight - targets) ** 2).mean().backward()
    opt.step()
v = opt.state[weight]["exp_avg_sq"]
print(f"v: {v.numel():,} values from {v[v > 0].min():.2e} to {v.max():.2e}")
# BEGIN SOLUTION
nonzero = v > 0
for name, table in (("dynamic (unsigned)", dynamic_map(signed=False)), ("linear", torch.linspace(0, 1, 256))):
    codes, absmax = quantize_blockwise_8bit(v, table)
    back = dequantize_blockwise_8bit(codes, absmax, table)
    rel = (back - v).abs()[nonzero] / v[nonzero]
    flushed, close = (back[nonzero] == 0).float().mean(), (rel < 0.1).float().mean()
    print(f"{name:>18} map: {flushed:6.1%} read back as 0, {close:6.1%} within 10%, median relative error "
          f"{rel.median():.3f}")
# END SOLUTION

# %% [markdown]
# ## Questions
#
# **Q1.** The second moment `v` is quantized with the *unsigned* dynamic map, the first moment `m` with the
# signed one. What does the unsigned map gain, and why can it be used for `v` but not for `m`?

# %% [markdown] tags=["answer"]
# **Answer.** `v` is a mean of squares, never negative, so a sign bit would be wasted on it. The unsigned
# map spends that bit on the fraction: twice as many levels in every decade (from 3.25e-7 to 1), so `v` is
# stored about twice as finely. `m` is a mean of gradients and has both signs, so it needs the signed map.

# %% [markdown]
# **Q2.** A Llama-7B QLoRA run at r = 64 trains 160 M adapter parameters. How many bytes do the optimizer
# states take with AdamW and with AdamW8bit, and what share of the measured 7B total of 6,996 MiB (H100,
# batch 1 × 512, paged fp32 AdamW; `qlora_edu/reference/gpu-facts.md`) would 8-bit states save?

# %% [markdown] tags=["answer"]
# **Answer.** AdamW: 160 M × 8 bytes = 1.28 GB (1,221 MiB, as measured). AdamW8bit: 160 M × 2.03 bytes =
# 0.325 GB (310 MiB; all the 7B adapters have far more than 4,096 elements). The saving, about 911 MiB, is
# 13% of 6,996 MiB: useful, but the 4-bit weights (3,687 MiB) stay the largest part. In full fine-tuning
# the same 6 bytes per parameter would be 40 GB of a 7B model's states.

# %% [markdown]
# **Q3.** Each step re-quantizes both states with a **new** absmax per block, taken after the update.
# What would go wrong if each block kept the absmax of the first step?

# %% [markdown] tags=["answer"]
# **Answer.** The states change scale as training goes on: `m` and `v` start at 0 and grow during the first
# steps (that is what bias correction compensates), and gradients shrink or grow later. With a frozen
# absmax, values above it would be clipped to ±absmax, and values that fell far below it would lose their
# precision or round to 0. Recomputing it costs one max per 256 elements.

# %% [markdown]
# **Q4.** `PagedAdamW8bit` holds the same bytes as `AdamW8bit`. What does paging add, and when does it cost
# time?

# %% [markdown] tags=["answer"]
# **Answer.** Paging allocates the states of tensors with at least 1e5 elements in CUDA unified memory, so
# when the GPU runs short the driver can move them to host memory instead of raising an out-of-memory
# error; before each update bitsandbytes prefetches them back. It costs nothing while the GPU has room.
# When states were evicted, each step pays one transfer of them over PCIe: ~26 ms for 1.2 GB of states on
# an H100 against a ~600 ms 7B QLoRA step (about 4%). It shrinks nothing: paged or not, AdamW states are
# 8 bytes per parameter and 8-bit ones about 2.
