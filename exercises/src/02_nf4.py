# %% [markdown]
# # Exercise 2: NF4, the lookup table
#
# In [chapter 2](../notebooks/02_nf4.ipynb) you followed a tensor through NF4 quantization step by step.
# Now you write the five functions yourself:
#
# 1. `nf4_code() -> table`: the 16 NF4 levels, built from normal quantiles;
# 2. `pack_4bit(codes, pad=0) -> packed` and `unpack_4bit(packed, numel) -> codes`: two 4-bit codes a byte;
# 3. `quantize_4bit(x, code, blocksize=64) -> (packed, absmax)`: blockwise absmax, nearest level, packed;
# 4. `dequantize_4bit(packed, absmax, code, shape, blocksize=64, dtype=torch.float32) -> x_hat`.
#
# They have the same names and signatures as in `qlora_edu`, and the check at the end runs **the same
# test battery** as the package's own tests against *your* functions: the table bit for bit against
# bitsandbytes' `get_4bit_type("nf4")`, and the packed bytes and constants against
# `bitsandbytes.functional.quantize_4bit` on CPU (it prints the first byte that differs, its block and
# both nibbles). The argument checks at the top of each function are given; write the part marked
# `YOUR CODE HERE`. Then you quantize the real model with your own functions and measure its perplexity.

# %% tags=["setup"]
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qlora_edu import MIN_ABSMAX, NF4_OFFSET
from qlora_edu.ch02_nf4.guards import (
    check_dequantize_4bit_args,
    check_finite_absmax,
    check_pack_4bit_args,
    check_quantize_4bit_args,
    check_unpack_4bit_args,
)

# %% [markdown]
# ## Exercise 2.1: the NF4 table
#
# `NF4_OFFSET = 0.9677083` is imported above. The recipe of bitsandbytes' `create_normal_map`:
#
# 1. `torch.linspace(NF4_OFFSET, 0.5, 9)` gives 9 probabilities; drop the last (0.5, whose quantile is
#    0) and take the normal quantiles `Φ⁻¹(p)` (`torch.special.ndtri`) of the other 8: the positive levels;
# 2. `torch.linspace(NF4_OFFSET, 0.5, 8)` minus its last gives 7 probabilities; their quantiles, negated,
#    are the negative levels;
# 3. add one exact 0.0, round to float32, sort, divide by the largest value.
#
# To be *bit for bit* equal to bitsandbytes, make the probabilities in **float32** (`torch.linspace`'s
# default) and only the quantiles in **float64** (`ndtri(p.double())`).

# %%
# @solution qlora_edu.ch02_nf4.nf4.nf4_code

# %%
# NBVAL_CHECK_OUTPUT
table = nf4_code()
print("16 values:", table.numel(), " zero at index:", int((table == 0).nonzero()),
      " ends:", table[0].item(), table[-1].item())
print(" ".join(f"{v:+.4f}" for v in table.tolist()))

# %% [markdown]
# ## Exercise 2.2: packing two codes a byte
#
# PyTorch has no 4-bit dtype, so codes 0 … 15 are stored two to a `uint8`, in bitsandbytes' layout: the
# **first** element of each pair in the **high** nibble (bits 7–4), the second in the low nibble:
# `byte = (codes[0::2] << 4) | codes[1::2]`. Codes are taken in row-major order; an odd count gets
# `pad` as the last low nibble. `unpack_4bit` reverses it and returns exactly `numel` codes.

# %%
# @solution qlora_edu.ch02_nf4.packing.pack_4bit
# @solution qlora_edu.ch02_nf4.packing.unpack_4bit

# %%
# NBVAL_CHECK_OUTPUT
packed = pack_4bit(torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8), pad=7)
print("pack [1, 2, 3, 4, 5] with pad 7:", [f"0x{b:02X}" for b in packed.tolist()], "(expected 0x12 0x34 0x57)")
print("unpack them again:", unpack_4bit(packed, 5).tolist())

# %% [markdown]
# ## Exercise 2.3: quantize
#
# The tensor is flattened row-major and cut into blocks of `blocksize` consecutive elements (blocks run
# across row ends; the last block may be shorter). For each block:
#
# 1. `absmax` = the block's largest `|x|`, float32 (one per block);
# 2. `v = x * (1 / absmax)` for full blocks, but `v = x / absmax` for the last, partial block (a quirk of
#    bitsandbytes on CPU; the two can differ in the last bit). Clamp `v` to `[-1, 1]`.
#
#    An all-zero block would divide 0 by 0. bitsandbytes divides by `max(absmax, 1e-38)` instead
#    (`MIN_ABSMAX`, imported above), so the block's values become 0. What it **stores** is not the same for
#    every block: a full block stores its true absmax (0 for an all-zero block), while the last, partial
#    block stores the clamped value (1e-38 for an all-zero tail). The check compares both with bitsandbytes;
# 3. the code of `v` is the index of the nearest table entry: compare with the 15 float32 midpoints
#    between neighbouring entries of the *sorted* table; a value exactly on a midpoint goes to the
#    **lower** entry (`torch.bucketize(v, midpoints)` does exactly that). FP4's table is not sorted, so map
#    the sorted position back to the table index through the sort order;
# 4. pack the codes two a byte (first element high), padding an odd count with the code of 0.0.
#
# Return `packed` as uint8 of shape `(ceil(n / 2), 1)`, as bitsandbytes does, and `absmax` as float32 of
# shape `(ceil(n / blocksize),)`. One vectorized pass over all blocks at once is all you need (no Python
# loop over blocks or elements). Use your own `pack_4bit` from 2.2 for the last step.
#
# *Speed, for later:* on a CPU the package's `quantize_nf4` calls this very function on slices of 2^18
# elements (`qlora_edu/ch02_nf4/fast4bit.py`): small temporaries are reused instead of page-faulting fresh memory.

# %%
# @solution qlora_edu.ch02_nf4.quant4bit.quantize_4bit

# %% [markdown]
# The small tensor of the lesson, one block of 32: your codes should match the lesson's and
# bitsandbytes' bytes.

# %%
# NBVAL_CHECK_OUTPUT
import logging

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its note about the optional `kernels` package
import bitsandbytes.functional as bnbf

x = torch.tensor([[0.21, -0.05, 0.00, 0.64, -0.33, 0.08, -0.80, 0.15],
                  [-0.12, 0.37, 0.02, -0.44, 0.55, -0.01, 0.29, -0.19],
                  [0.06, -0.27, 0.47, -0.09, 0.11, -0.60, 0.33, 0.04],
                  [-0.38, 0.18, -0.02, 0.25, -0.15, 0.71, -0.07, 0.40]])
packed, absmax = quantize_4bit(x, nf4_code(), blocksize=32)
packed_bnb, state = bnbf.quantize_4bit(x, blocksize=32, quant_type="nf4")
print("absmax:", [round(a, 4) for a in absmax.tolist()])
print("first row's codes:", unpack_4bit(packed, x.numel())[:8].tolist(), "(lesson: 10 6 7 14 3 8 0 9)")
print("same bytes as bitsandbytes:", torch.equal(packed, packed_bnb))

# %% [markdown]
# ## Exercise 2.4: dequantize
#
# Unpack the codes, look up their values in the table and multiply each by its block's absmax, in
# float32; then round to `dtype` and give the result `shape`. The argument checks are one call,
# `check_dequantize_4bit_args`, given to you (the package's fast version, below, shares it).
#
# *Speed, for later:* `dequantize_nf4` runs this computation as `dequantize_4bit_fast` in
# `qlora_edu/ch02_nf4/fast4bit.py`: on a CPU a table of the two values of every byte (256 rows) decodes two codes
# with one lookup, slice by slice; on CUDA `torch.compile` fuses this very computation into one kernel.
# The tests check both equal to this function and to bitsandbytes.

# %%
# @solution qlora_edu.ch02_nf4.quant4bit.dequantize_4bit

# %%
# NBVAL_CHECK_OUTPUT
x_hat = dequantize_4bit(packed, absmax, nf4_code(), x.shape, blocksize=32)
print("first row back:", [round(v, 3) for v in x_hat[0].tolist()])
print("largest error:", round((x - x_hat).abs().max().item(), 3))
print("same values as bitsandbytes:", torch.equal(x_hat, bnbf.dequantize_4bit(packed_bnb, state)))

# %% [markdown]
# ## Check your work
#
# Every case of the course's battery that uses your functions: the table's structure and bits, packing
# examples and round trips, byte parity with bitsandbytes for NF4 and FP4 over odd shapes, partial and
# all-zero blocks, fp16/bf16 inputs and several block sizes, values chosen so that `x * (1 / absmax)` and
# `x / absmax` round differently, ties exactly on midpoints, dequantization against bitsandbytes and a
# float64 reference, and bad inputs.

# %%
from qlora_edu import check

check(nf4_code, pack_4bit, unpack_4bit, quantize_4bit, dequantize_4bit)

# %% [markdown]
# ## Exercise 2.5: the model, quantized with your code
#
# Now the real test: store every decoder linear weight of SmolLM2-135M in NF4 with *your* functions and
# measure the perplexity, as in section 5.3 of the lesson (fewer tokens, to keep it short). The next
# cell measures the unquantized model and the package's NF4 for comparison; if your functions are
# byte-exact, your number will equal the package's to the last digit.

# %%
import qlora_edu
from qlora_edu import load_base_model
from qlora_edu.common.perplexity import perplexity, replace_linear_weights
from qlora_edu.common.progress import progress_bar
from qlora_edu.common.settings import pick

n_tokens = pick(4096, 1024)
model, tokenizer = load_base_model(progress=False)
linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}
original = {name: m.weight.detach().clone() for name, m in linears.items()}


def restore():
    with torch.no_grad():
        for name, m in linears.items():
            m.weight.copy_(original[name])


nf4 = qlora_edu.nf4_code()
with progress_bar(desc="fp32 and the package's NF4", total=2, unit="perplexities") as bar:
    ppl_fp32 = perplexity(model, tokenizer, max_tokens=n_tokens, progress=False)
    bar.update()
    replace_linear_weights(model, lambda w: qlora_edu.dequantize_4bit(*qlora_edu.quantize_4bit(w, nf4), nf4, w.shape),
                           progress=False)
    ppl_package = perplexity(model, tokenizer, max_tokens=n_tokens, progress=False)
    bar.update()
restore()
print(f"{n_tokens:,} tokens: fp32 {ppl_fp32:.4f}, NF4 with qlora_edu {ppl_package:.4f}")

# %% [markdown]
# Your turn: replace the weights using your `nf4_code`, `quantize_4bit` and `dequantize_4bit` (block
# size 64), measure the perplexity into `ppl_mine`, and restore the weights afterwards.

# %%
# BEGIN SOLUTION
# Hint: replace_linear_weights(model, transform) applies transform(weight) -> new weight to every
# Hint: decoder linear layer; transform = quantize with your table, then dequantize to w.shape.
# Hint: Then ppl_mine = perplexity(model, tokenizer, max_tokens=n_tokens), and restore().
table = nf4_code()
replace_linear_weights(model, lambda w: dequantize_4bit(*quantize_4bit(w, table, 64), table, w.shape, 64),
                       progress=False)
ppl_mine = perplexity(model, tokenizer, max_tokens=n_tokens, progress=False)
restore()
# END SOLUTION
print(f"NF4 with your functions: {ppl_mine:.4f}  (package: {ppl_package:.4f}, fp32: {ppl_fp32:.4f})")
print(f"identical to the package: {ppl_mine == ppl_package}; "
      f"quantizing to NF4 costs {100 * (ppl_mine / ppl_fp32 - 1):+.1f}% perplexity")

# %% [markdown]
# ## Questions
#
# **Q1.** Why must the table contain an exact 0.0? Consider a symmetric 16-level table
# `±q1, …, ±q8` with no zero: what happens to a weight that is exactly 0, to an all-zero block and to
# the pad nibble of an odd count, given that a tie goes to the *lower* level?

# %% [markdown] tags=["answer"]
# **Answer.** In a symmetric table without 0, the value 0 lies exactly on the midpoint between `−q1`
# and `+q1`, so the tie rule sends every exact zero to `−q1`: zeros come back as `−q1 · absmax`, a
# systematic negative bias. An all-zero block has absmax 0 and would survive, but the pad element
# and every real zero weight (masked or pruned weights, zero-initialised rows, padding) would not. With
# an exact 0 in the table they come back as exactly 0, whatever the block's absmax.

# %% [markdown]
# **Q2.** NF4 has 7 negative levels, 8 positive levels and a zero. Why not 8 and 8, or 7 and 7? Does it
# matter which side gets the extra level?

# %% [markdown] tags=["answer"]
# **Answer.** 16 codes minus the exact zero leaves 15, an odd number, so the two sides cannot be equal.
# 7 and 7 would waste a code (as chapter 1's Int4 does, and FP4 with its two zeros); 8 and 8 would need
# 17 codes. Which side gets the eighth level is arbitrary (bitsandbytes chose the positive side): weights
# are about as often negative as positive, so on average it makes no difference. Both halves end at the
# same quantile `Φ⁻¹(0.9677083)`, so after the division the table still ends at exactly −1 and +1.

# %% [markdown]
# **Q3.** FP4 (bitsandbytes' *default* 4-bit type) has two codes for zero, 0 and 8. What does the second
# zero cost? Look at its other levels near zero too.

# %% [markdown] tags=["answer"]
# **Answer.** One of its 16 codes is spent on a value it can already represent: only 15 levels are
# distinct, as in Int4 (at most log2(15) = 3.91 bits of information instead of 4). Worse, its two
# subnormal levels ±0.0052 are almost zero as well, so near zero FP4 has four codes (three values: 0 twice
# and ±0.0052) and then a gap up to ±0.167, exactly where most block-normalised weights lie. The lesson
# measured the result:
# FP4's weight error is about 10% above Int4's and a third above NF4's, and its perplexity is close to Int4's.

# %% [markdown]
# **Q4.** Suppose you pack the first element of each pair into the **low** nibble instead. Your own
# `unpack_4bit(pack_4bit(codes))` still returns the codes. What goes wrong, and how would you notice?

# %% [markdown] tags=["answer"]
# **Answer.** Nothing goes wrong inside your own code, which is why a round-trip test cannot catch it.
# But every byte has its nibbles swapped relative to bitsandbytes, so a weight written by one and read
# by the other has each pair of neighbouring weights exchanged: a silently damaged model with no error
# message. You notice only by comparing bytes with the reference implementation, which is what the
# battery does (and why it prints the first differing byte and both nibbles).

# %% [markdown]
# **Q5.** How many bits per weight does NF4 at block size 64 take, counting the float32 constants? How
# many GB is that for a 7B-parameter model, against 14 GB in bf16?

# %% [markdown] tags=["answer"]
# **Answer.** 4 bits for the code plus 32 / 64 = 0.5 bits for the constant: 4.5 bits per weight.
# For 7e9 weights: 7e9 × 4.5 / 8 = 3.94 GB instead of 14 GB (about 28%). Chapter 3's double quantization
# brings the constants down to 0.127 bits, 4.127 in all (3.61 GB).
