# %% [markdown]
# # Exercise 3: double quantization
#
# In [chapter 3](../notebooks/03_double_quant.ipynb) you saw how QLoRA stores the float32 block
# constants of NF4 in 8 bits. Now you write the three functions yourself:
#
# 1. `dynamic_map(signed=True) -> table`: the 256 values of the 8-bit dynamic map;
# 2. `double_quantize(absmax, blocksize=256, rounding="grid") -> (codes, offset, absmax2)`;
# 3. `double_dequantize(codes, offset, absmax2, blocksize=256) -> absmax`.
#
# They have the same names and signatures as in `qlora_edu`, and the check at the end runs **the same
# test battery** as the package's own tests against *your* functions: bit for bit against
# bitsandbytes' `create_dynamic_map` and against the quantization state of
# `bitsandbytes.functional.quantize_4bit(..., quant_type="nf4", compress_statistics=True)`. The argument
# checks at the top of each function are given; write the part marked `YOUR CODE HERE`.

# %% tags=["setup"]
import torch
import torch.nn.functional as F

from qlora_edu import GRID_POINTS, grid_lookup_table
from qlora_edu.ch03_double_quant.guards import (
    check_double_dequantize_args,
    check_double_quantize_args,
    check_dynamic_map_args,
)
from qlora_edu.common.guards import n_blocks

# %% [markdown]
# ## Exercise 3.1: the dynamic map
#
# Read a signed 8-bit code as `s | E zeros | 1 | 6 − E fraction bits`: the sign, a *decimal* exponent
# `E = 0 … 6` (the number of zeros before the first 1, the indicator bit), and a linear fraction that
# picks one of `2^(6−E)` equal slices of `[0.1, 1]` (the value is the slice's midpoint). So for each
# number of fraction bits `i = 6 − E`, the magnitudes are the `2^i` midpoints of
# `torch.linspace(0.1, 1, 2^i + 1)` times `10^(i−6)`; the signed map has them with both signs, and the
# two patterns without an indicator bit are 0 and 1.0. Sorted, that is 256 values from −0.99297 to 1.
#
# The unsigned map (`signed=False`, used for Adam's second moment in chapter 4) spends the sign bit on the
# fraction: `2^(i+1)` midpoints for each `i`, no negatives, plus 0 and 1.0.
#
# To be *bit for bit* equal to bitsandbytes, do it in float32 exactly in this order: `linspace`, then the
# midpoints `(edges[:-1] + edges[1:]) / 2`, then the product with `10.0 ** (i - 6)`.

# %%
# @solution qlora_edu.ch03_double_quant.double_quant.dynamic_map

# %%
# NBVAL_CHECK_OUTPUT
table = dynamic_map(signed=True)
print("256 values:", table.numel(), " first:", table[0].item(), " last:", table[-1].item())
print("index of 0.0:", int((table == 0).nonzero()), " values > 0.1:", int((table > 0.1).sum()))

# %% [markdown]
# ## Exercise 3.2: quantize the constants
#
# Given the `m` float32 block constants `absmax` of an NF4 weight:
#
# 1. `offset = absmax.mean()` (float32; the constants are all positive, centring them uses both halves of
#    the signed map);
# 2. cut `absmax − offset` into blocks of `blocksize` (256) constants, padding the last with zeros;
#    `absmax2` is each block's `max |absmax − offset|` (float32, shape `(ceil(m / blocksize),)`);
# 3. scale with a reciprocal, as bitsandbytes does: `v = (absmax − offset) * (1 / absmax2)`;
# 4. find each `v`'s code, an index into `dynamic_map(True)` (uint8, one per constant):
#    * `rounding="nearest"`: the exactly nearest map value; compare with the midpoints between
#      neighbouring values (`torch.bucketize(v, midpoints)`: a value on a midpoint goes to the lower code).
#      A block whose constants all equal the offset has `absmax2 = 0` and `v = 0 * (1/0) = NaN`; its true
#      centred values are exactly 0, so turn the NaN into 0.0 first: its code is 127, the map's 0.0
#      (`torch.bucketize` would put a NaN past the last midpoint, code 255);
#    * `rounding="grid"` (bitsandbytes on CPU, needed for byte parity): first snap `v` to one of
#      65,536 grid points, `g = (v + 1) * 0.5 * 65535 + 0.5` in float32, in this order, then truncated to
#      an integer; a NaN (from a block whose constants all equal the offset: `0 * (1/0)`) becomes grid
#      point 0; clamp to `[0, 65535]`. The code of grid point `g` is `grid_lookup_table(dynamic_map(True))[g]`
#      (given: a table of 65,536 codes, imported in the setup cell).
#
# Return `(codes, offset, absmax2)`.

# %%
# @solution qlora_edu.ch03_double_quant.double_quant.double_quantize

# %% [markdown]
# ## Exercise 3.3: read them back
#
# `absmax ≈ dynamic_map(True)[codes] * absmax2[i // blocksize] + offset`, in float32: the product first,
# then the sum (two roundings, as bitsandbytes does).

# %%
# @solution qlora_edu.ch03_double_quant.double_quant.double_dequantize

# %% [markdown]
# Try them on the constants of a random matrix. How close should they come back? A centred
# constant is rounded to a map value at most half a map step away (plus one grid cell, 2/65535, with the
# CPU grid); the widest step (between 0.1 and 1) is 0.9/64, so no constant moves by more than
# `(0.9/128 + 1/65535) * absmax2` of its block. Relative to the constant itself that bound is largest for
# the smallest constants; the cell prints the worst constant's error next to its own bound.

# %%
from qlora_edu import nf4_code, quantize_4bit

g = torch.Generator().manual_seed(0)
x = torch.randn(512, 1024, generator=g) * 0.02
_, absmax = quantize_4bit(x, nf4_code(), blocksize=64)
codes, offset, absmax2 = double_quantize(absmax)
back = double_dequantize(codes, offset, absmax2)
print(f"{absmax.numel()} constants -> {codes.dtype} codes, offset {offset.item():.6f}, {absmax2.numel()} absmax2")
relative = ((back - absmax) / absmax).abs()
bound = (0.9 / 128 + 1 / 65535) * absmax2.repeat_interleave(256)[: absmax.numel()] / absmax
worst = int(relative.argmax())
print(f"relative error of all the constants, ||back - absmax|| / ||absmax||: "
      f"{((back - absmax).norm() / absmax.norm()).item():.4f}")
print(f"worst constant: relative error {relative[worst].item():.4f}, its bound {bound[worst].item():.4f}; "
      f"every constant within its bound: {bool((relative <= bound).all())}")

# %% [markdown]
# ## Check your work
#
# This runs every case of the course's battery that uses your three functions: both dynamic maps bit
# for bit, the grid lookup built on your map, your codes / offset / absmax2 against bitsandbytes' quantization
# state (including 2^20 constants packed densely where the order of the float32 steps decides the grid
# point), nearest rounding against a brute-force search, reading back against bitsandbytes, and bad
# inputs. It prints the first failure with what was expected, what came back and a hint.

# %%
from qlora_edu import check

check(dynamic_map, double_quantize, double_dequantize)

# %% [markdown]
# ## Exercise 3.4: the savings for LLaMA-65B, by hand
#
# LLaMA-65B has 80 decoder layers with hidden size 8,192 and MLP size 22,016. QLoRA quantizes, in each
# layer, the attention projections q, k, v, o (hidden × hidden each) and the MLP's gate, up and down
# (hidden × MLP size each). Compute, without the package's `storage` functions: the number of quantized
# parameters, the bits per parameter with float32 constants and with double quantization (block sizes 64
# and 256), and the bytes double quantization saves, in GB (10⁹ bytes). The QLoRA paper says
# "approximately 3 GB"; one study note says "~0.5 GB". Which is right?

# %%
# NBVAL_CHECK_OUTPUT
hidden, mlp, n_layers = 8192, 22016, 80
# BEGIN SOLUTION
# Hint: per layer 4 * hidden**2 + 3 * hidden * mlp parameters; the bits per parameter are in chapter 3, section 2.
params = n_layers * (4 * hidden**2 + 3 * hidden * mlp)
bits_fp32 = 4 + 32 / 64
bits_dq = 4 + 8 / 64 + 32 / (64 * 256)
saved_gb = params * (bits_fp32 - bits_dq) / 8 / 1e9
print(f"{params:,} quantized parameters")
print(f"{bits_fp32} bits/param with float32 constants, {bits_dq:.6f} with double quantization")
print(f"double quantization saves {bits_fp32 - bits_dq:.6f} bits/param = {saved_gb:.2f} GB")
# END SOLUTION

# %% [markdown]
# ## Exercise 3.5: your double quantization on a real layer
#
# Load the course's model, take the `up_proj` weight of decoder layer 15, and quantize it to NF4 with
# `quantize_4bit(w, nf4_code())` (float32 constants). Double-quantize its constants with **your**
# functions and measure:
#
# * the relative error of the constants, `‖absmax_dq − absmax‖ / ‖absmax‖`;
# * NF4's own relative error, `‖Ŵ − W‖ / ‖W‖` with the float32 constants;
# * the error double quantization adds, `‖Ŵ_dq − Ŵ‖ / ‖W‖`, where `Ŵ_dq` is dequantized with your
#   read-back constants (`dequantize_4bit(packed, absmax_dq, nf4_code(), w.shape)`).
#
# How does the added error compare with NF4's own?

# %%
from qlora_edu import dequantize_4bit, load_base_model

model, tokenizer = load_base_model(progress=False)
w = model.model.layers[15].mlp.up_proj.weight.detach()
packed, absmax = quantize_4bit(w, nf4_code())
# BEGIN SOLUTION
# Hint: double_dequantize takes what double_quantize returns; dequantize_4bit twice (absmax, then yours);
# Hint: relative error of a against b: ((a - b).norm() / b.norm()).item().
absmax_dq = double_dequantize(*double_quantize(absmax))
w_nf4 = dequantize_4bit(packed, absmax, nf4_code(), w.shape)
w_dq = dequantize_4bit(packed, absmax_dq, nf4_code(), w.shape)
const_err = ((absmax_dq - absmax).norm() / absmax.norm()).item()
nf4_err = ((w_nf4 - w).norm() / w.norm()).item()
added = ((w_dq - w_nf4).norm() / w.norm()).item()
print(f"constants: relative error {const_err:.5f}")
print(f"NF4's own error {nf4_err:.5f}; added by double quantization {added:.5f} ({added / nf4_err:.1%} of it)")
print(f"total with double quantization: {((w_dq - w).norm() / w.norm()).item():.5f}")
# END SOLUTION

# %% [markdown]
# ## Questions
#
# **Q1.** Why subtract the mean of the constants before quantizing them with the *signed* dynamic map?

# %% [markdown] tags=["answer"]
# **Answer.** The constants are maxima of absolute values, so they are all positive. Scaled by their
# block maximum they would all lie in `[0, 1]`, and the 128 negative codes of the signed map would never
# be used: half of the 8 bits wasted. Subtracting the mean centres them around 0, so both halves of the
# map are used; and since most constants lie near the mean, they land where the dynamic map is
# densest. On a layer of the course's model the error of the constants falls from about 1% to under 0.4%
# (chapter 3, section 2). The mean costs one float32 per tensor.

# %% [markdown]
# **Q2.** Why blocks of 256 constants for the second level, and not 32 or 4,096?

# %% [markdown] tags=["answer"]
# **Answer.** Each second-level block stores one float32 `absmax2`: `32 / (64 × blocksize2)` bits per
# parameter, 0.0156 at 32 but only 0.00195 at 256, under 2% of the 0.127 bits. Larger blocks would save
# almost nothing more (0.0001 bits at 4,096) but make one `absmax2` cover more constants, so a single large
# constant coarsens the step for more of them: on a real layer the error of the constants grows from
# about 0.0036 at 256 to 0.0047 at 4,096 (chapter 3, section 10 prints them), and falls to 0.0023 at 32 for eight times
# the second-level cost. 256 sits where the cost is already negligible and the error still small.

# %% [markdown]
# **Q3.** The paper writes "4.127 bits per parameter". What is the 0.127 made of?

# %% [markdown] tags=["answer"]
# **Answer.** `8/64 + 32/(64 × 256) = 0.125 + 0.00195 = 0.12695`: one 8-bit code for each block of 64
# weights, plus one float32 `absmax2` for each 256 constants, i.e. for each 16,384 weights. (The float32
# `offset`, one per tensor, is negligible and not counted.) Without double quantization the constants cost
# `32/64 = 0.5` bits, so the saving is 0.373 bits per parameter: about 3 GB on LLaMA-65B.

# %% [markdown]
# **Q4.** `rounding="grid"` and `rounding="nearest"` give different codes for about 0.2% of the constants.
# Which one is "right", and does the difference matter?

# %% [markdown] tags=["answer"]
# **Answer.** "Nearest" is the exact rounding (and what the CUDA kernel does); "grid" is what bitsandbytes'
# CPU kernel does, and only it reproduces bitsandbytes' bytes on the CPU. The grid point lies within half a
# grid cell (1/65535) of the value, so a grid code is never worse than the nearest code by more than one
# grid cell times `absmax2`; on the whole model the relative error of the constants is the same to four
# digits either way. It matters for byte parity, not for accuracy.
