# %% [markdown]
# # Exercise 1: absmax block quantization
#
# In [chapter 1](../notebooks/01_absmax.ipynb) you saw how a block of weights becomes
# small integers plus one constant. Now you write the two functions yourself:
#
# 1. `absmax_quantize(x, bits=4, blocksize=64) -> (codes, scales)`
# 2. `absmax_dequantize(codes, scales, blocksize=64) -> x_hat`
#
# They have the same names and signatures as `qlora_edu.absmax_quantize` and
# `qlora_edu.absmax_dequantize`, and the check at the end runs **the same test battery** as the
# package's own tests against *your* functions. The argument checks at the top of each function are
# given; write the part marked `YOUR CODE HERE`.
#
# **The contract.** Blocks are `blocksize` consecutive elements of `x.flatten()` (the last block may be
# shorter, and blocks run across row ends). With `qmax = 2**(bits-1) - 1`:
#
# $$\text{scale}_b = \frac{\max_{i \in b} |x_i|}{q_{max}}, \qquad
#   \text{code}_i = \operatorname{round}\!\left(\frac{x_i}{\text{scale}_b}\right) \in [-q_{max}, q_{max}],
#   \qquad \hat{x}_i = \text{code}_i \cdot \text{scale}_b$$
#
# `codes` are `int8` with `x`'s shape; `scales` are `float32` with one entry per block. An all-zero
# block gets scale 0 and codes 0 (not NaN).

# %% tags=["setup"]
import torch
import torch.nn.functional as F

from qlora_edu.ch01_absmax.guards import check_absmax_dequantize_args, check_absmax_quantize_args
from qlora_edu.common.guards import n_blocks

# %% [markdown]
# ## Exercise 1.1: quantize
#
# Vectorize: no Python loop over elements or blocks. Padding the flat tensor to a whole number of
# blocks lets you `view` it as a `(n_blocks, blocksize)` matrix and work row by row.

# %%
# @solution qlora_edu.ch01_absmax.absmax.absmax_quantize

# %% [markdown]
# Try it on the worked example from the seed notes: the block `[0.1, 2.5, -1.5]` should give the
# constant 2.5 / 7 ≈ 0.357 and the codes `[0, 7, -4]`.

# %%
codes, scales = absmax_quantize(torch.tensor([0.1, 2.5, -1.5]), bits=4, blocksize=3)
print("codes:", codes.tolist(), " scale:", round(scales.item(), 4))

# %% [markdown]
# ## Exercise 1.2: dequantize

# %%
# @solution qlora_edu.ch01_absmax.absmax.absmax_dequantize

# %%
print("dequantized:", absmax_dequantize(codes, scales, blocksize=3).tolist())

# %% [markdown]
# ## Check your work
#
# This runs every case of the course's battery that uses your two functions (the seed example, the
# outlier block, shapes and partial blocks, rounding at 2 to 8 bits, zero blocks, a property test of
# the error bound `|x - x_hat| <= scale / 2` over random shapes, block sizes and dtypes, and bad
# inputs) and prints the first failure with what was expected, what came back and a hint.

# %%
from qlora_edu import check

check(absmax_quantize, absmax_dequantize)

# %% [markdown]
# ## Exercise 1.3: the outlier, measured with your code
#
# Quantize 4,096 Gaussian weights with one outlier of 100.0 at block sizes 16, 64, 256 and 4,096
# (the whole tensor). For each, print the fraction of the *small* weights that become code 0 and the
# mean squared reconstruction error of the small weights.

# %%
g = torch.Generator().manual_seed(0)
w = torch.randn(4096, generator=g) * 0.02
w[1234] = 100.0
small = torch.ones_like(w, dtype=torch.bool)
small[1234] = False
# BEGIN SOLUTION
for bs in (16, 64, 256, 4096):
    c, s = absmax_quantize(w, bits=4, blocksize=bs)
    err = (absmax_dequantize(c, s, blocksize=bs) - w)[small].pow(2).mean()
    zero = (c[small] == 0).float().mean()
    print(f"blocksize {bs:5d}: {zero:6.1%} of the small weights are code 0, MSE {err:.2e}")
# END SOLUTION

# %% [markdown]
# ## Questions
#
# **Q1.** A 4-bit signed integer holds -8 … 7, yet the codes stop at -7. Why is the symmetric range
# `[-7, 7]` used?

# %% [markdown] tags=["answer"]
# **Answer.** With `scale = absmax / 7` the largest weight maps exactly to ±7 whatever its sign, and
# zero maps exactly to code 0. Using -8 as well would need an asymmetric scale (absmax / 8 for
# negatives only) or a zero point; the symmetric scheme gives up one of the 16 levels for simplicity.
# NF4 (chapter 2) uses all 16 levels: 7 negative, 8 positive and an exact zero.

# %% [markdown]
# **Q2.** Each block stores one float32 constant. How many extra bits per parameter does that cost at
# block sizes 16, 64 and 256? What does it cost at block size 64 for a 7B-parameter model, in GB?

# %% [markdown] tags=["answer"]
# **Answer.** 32 / blocksize bits: 2, 0.5 and 0.125 bits per parameter. At block size 64:
# 7e9 × 0.5 / 8 bytes = 0.4375 GB (about 0.41 GiB) of constants, on top of 3.5 GB of 4-bit codes.
# Chapter 3 shrinks it with double quantization.

# %% [markdown]
# **Q3.** In Exercise 1.3, the MSE of the small weights falls as the block shrinks. Which block
# size would you choose, and what decides it?

# %% [markdown] tags=["answer"]
# **Answer.** It is a trade between error and the constants' memory: smaller blocks isolate the
# outlier (only its own block loses precision) but cost 32 / blocksize bits per parameter. At 16 the
# constants cost half as much as the 4-bit codes themselves; at 4,096 one outlier wipes out the whole
# tensor. QLoRA uses 64: 0.5 bits of constants, reduced to 0.127 by double quantization.
