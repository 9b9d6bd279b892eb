# %% [markdown]
# # Exercise 7: QLoRA's 4-bit matmul, with your own autograd function
#
# In [chapter 7](../notebooks/07_qlora.ipynb) you saw QLoRA's frozen path: the weight `W` stays in NF4, is
# dequantized to the compute dtype (bf16) for one matmul, and the dequantized copy is thrown away. Training
# needs more than that: autograd must not keep the dequantized `W` alive until backward, or the 4-bit storage
# buys nothing while training. Here you write the two pieces that make it work:
#
# 1. `NF4Matmul`, a `torch.autograd.Function`: `forward` dequantizes and multiplies, keeping **only the NF4
#    storage** for backward; `backward` dequantizes **again** and returns `dL/dx` (and no gradient for the
#    frozen weight). `nf4_matmul(x, weight, bias)`, which checks its arguments and calls
#    `NF4Matmul.apply`, is given.
# 2. `nf4_linear(x, weight, bias, compute_dtype)`: QLoRA's frozen path around it, in the compute dtype, the
#    result back in `x`'s dtype.
#
# They have the same names and signatures as in `qlora_edu`, and the check at the end runs **the same test
# battery** as the package's own tests against *your* code: against a float64 product with bitsandbytes'
# dequantization of the same bytes, against autograd through `F.linear`, against bitsandbytes' `Linear4bit`
# bit for bit, against peft's LoRA on that `Linear4bit` (output and gradients), and with
# `saved_tensors_hooks` watching what autograd keeps. Write the parts marked `YOUR CODE HERE`.

# %% tags=["setup"]
import dataclasses

import torch
import torch.nn.functional as F

from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4, quantize_nf4
from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.ch07_qlora.guards import check_nf4_linear_args, check_nf4_matmul_args

# %% [markdown]
# ## Exercise 7.1: the autograd function
#
# A `torch.autograd.Function` has two static methods. `forward(ctx, *inputs)` computes the output with
# autograd switched off (nothing inside it is recorded) and may leave on `ctx` whatever `backward` will need.
# `backward(ctx, grad_out)` gets `dL/dy` and returns one gradient per input of `forward` (`None` for an input
# that needs none).
#
# For `y = x Wᵀ + b` with `W` of shape `(out, in)` and `x` of shape `(..., in)`:
#
# * `dL/dx = dL/dy · W`, shape `(..., in)`: it needs `W`, not `x`;
# * `dL/dW = (dL/dy)ᵀ x` is **not** wanted: `W` is frozen (and stored as 4-bit codes, which cannot take a
#   gradient). So `x` need not be kept either;
# * `dL/db` is not wanted: the bias is frozen too.
#
# `ctx.save_for_backward(w)` would keep the dequantized `(out, in)` weight, 16 bits a weight, alive from forward
# to backward, for every layer of the model at once. Keep the `NF4Tensor` instead (`ctx.weight = weight`: the
# layer holds those bytes anyway) and dequantize a second time in `backward`. Mind the dtypes: the
# `NF4Tensor` dequantizes to its own `dtype`; cast to `x.dtype` in forward and to `grad_out.dtype` in backward.

# %%
# @solution qlora_edu.ch07_qlora.qlora.NF4Matmul
# @solution qlora_edu.ch07_qlora.qlora.nf4_matmul

# %% [markdown]
# Try it on a small weight: the output against `F.linear` with the dequantized weight, `dL/dx` against
# autograd's, and what autograd keeps. `SavedTensorLog` (from the lesson) records every tensor saved for
# backward; the plain `F.linear` keeps a `(in, out)` view of the weight (its transpose, for `dL/dx`), yours
# should keep nothing at all.

# %%
# NBVAL_CHECK_OUTPUT
g = torch.Generator().manual_seed(0)
from qlora_edu import SavedTensorLog  # the lesson's recorder of saved tensors

weight = quantize_nf4(torch.randn(192, 128, generator=g) * 0.02)
x = torch.randn(4, 128, generator=g).requires_grad_()
x_ref = x.detach().clone().requires_grad_()
w_dense = dequantize_nf4(weight)
with SavedTensorLog() as mine:
    y = nf4_matmul(x, weight)
with SavedTensorLog() as plain:
    y_ref = F.linear(x_ref, w_dense)
y.sum().backward()
y_ref.sum().backward()
print("same output as F.linear:", torch.allclose(y, y_ref, atol=1e-6), " same dL/dx:",
      torch.allclose(x.grad, x_ref.grad, atol=1e-6))
print("saved by nf4_matmul:", mine.records)
print("saved by F.linear:  ", [(shape, dtype) for shape, dtype, _ in plain.records])

# %% [markdown]
# ## Exercise 7.2: the frozen path
#
# QLoRA computes the frozen layer in the **compute dtype** (bf16) whatever dtype the activations arrive in,
# and hands the result back in the activations' dtype, exactly as bitsandbytes' `Linear4bit` does:
#
# `y = nf4_matmul(x.to(cd), W dequantized to cd, b.to(cd)).to(x.dtype)`
#
# `dataclasses.replace(weight, dtype=cd)` is the same `NF4Tensor` told to dequantize into `cd`: the same
# bits as dequantizing to its own dtype and casting, without the float32 copy.

# %%
# @solution qlora_edu.ch07_qlora.qlora.nf4_linear

# %%
# NBVAL_CHECK_OUTPUT
for x_dtype in (torch.float32, torch.bfloat16):
    y = nf4_linear(torch.randn(2, 128, generator=g).to(x_dtype), weight, None, torch.bfloat16)
    print(f"x {x_dtype} -> y {y.dtype}, shape {tuple(y.shape)}")

# %% [markdown]
# ## Check your work
#
# This runs every case of the course's battery that uses your functions: the product against float64 (four
# dtype combinations, square and non-square weights), `dL/dx` against autograd through the dequantized weight,
# what autograd keeps between forward and backward (through `saved_tensors_hooks` *and* the attributes of
# `ctx`), your frozen path against bitsandbytes' `Linear4bit` bit for bit, and your frozen path plus LoRA
# adapters against peft's LoRA on that `Linear4bit`: output, `dL/dx`, `dL/dA`, `dL/dB`. It prints the first
# failure with what was expected, what came back and a hint.

# %%
from qlora_edu import check

check(nf4_matmul, nf4_linear)

# %% [markdown]
# ## Exercise 7.3: what your function saves on a real layer
#
# Load the course's model and take the `up_proj` of decoder layer 15 (576 → 1536). Quantize its weight with
# `quantize_nf4`, and for a batch `x` of 4 × 64 tokens (float32, requiring grad) measure with
# `SavedTensorLog` the peak bytes autograd holds for backward after one forward of
#
# * the plain bf16 path: `F.linear(x.to(torch.bfloat16), dequantize_nf4(w4).to(torch.bfloat16))`;
# * your `nf4_linear(x, w4, None, torch.bfloat16)`.
#
# How do they compare with the size of the bf16 weight (576 × 1536 × 2 bytes) and of the NF4 storage
# (`w4.nbytes`)?

# %%
from qlora_edu import load_base_model

model, tokenizer = load_base_model(progress=False)
layer = model.model.layers[15].mlp.up_proj
x = torch.randn(4, 64, 576, generator=g).requires_grad_()
w4 = quantize_nf4(layer.weight.detach())
# BEGIN SOLUTION
# Hint: with SavedTensorLog() as log: y = ...; then log.peak_bytes. Divide by 2**20 for MiB.
with SavedTensorLog() as plain_log:
    F.linear(x.to(torch.bfloat16), dequantize_nf4(w4).to(torch.bfloat16))
with SavedTensorLog() as mine_log:
    nf4_linear(x, w4, None, torch.bfloat16)
print(f"plain bf16 path keeps {plain_log.peak_bytes / 2**20:.3f} MiB, nf4_linear keeps "
      f"{mine_log.peak_bytes / 2**20:.3f} MiB")
print(f"the bf16 weight is {576 * 1536 * 2 / 2**20:.3f} MiB, its NF4 storage {w4.nbytes / 2**20:.3f} MiB")
# END SOLUTION

# %% [markdown]
# ## Questions
#
# **Q1.** In 7.3 the plain path keeps exactly one tensor for backward, the dequantized bf16 weight (as big as
# the whole bf16 weight); yours keeps nothing. Why does neither keep `x`, and why does the full QLoRA layer
# (frozen path plus adapters) still keep `x` somewhere?

# %% [markdown] tags=["answer"]
# **Answer.** `x` would only be needed for `dL/dW = (dL/dy)ᵀ x`, and `W` is frozen: no gradient is computed
# for it. `dL/dx = dL/dy · W` needs only `W`, which is re-made from the 4-bit bytes. The adapter path is
# different: `dL/dA = scaling · Bᵀ (dL/dy)ᵀ x` needs `x` (and `dL/dB` needs `A x`), so the LoRA part of the layer
# saves its input, as any trainable linear layer does. That copy is an activation of size `batch × seq × in`,
# the same whether the base weight is 4-bit or not; the weight-sized tensor is what the custom function removes.

# %% [markdown]
# **Q2.** What would keeping the dequantized weight cost on LLaMA-7B?

# %% [markdown] tags=["answer"]
# **Answer.** Until backward reaches a layer, its dequantized weight would stay alive, so at the end of the
# forward pass all of them would be: the seven projections of 32 layers, 32 × (4 × 4096² + 3 × 4096 × 11008) =
# 6.48 billion weights, at 2 bytes each in bf16 about 12.1 GiB, on top of their 3.1 GiB of NF4 storage. The
# whole QLoRA step measured on an H100 (gpu-facts: batch 1 × 512, checkpointing on) peaks at 6,996 MiB
# including the optimizer states. (With gradient checkpointing the forward pass saves nothing and each
# layer's weight would be kept only while that layer is recomputed and differentiated, but without it the
# 12 GiB would be real.)

# %% [markdown]
# **Q3.** What does not keeping the weight cost instead?

# %% [markdown] tags=["answer"]
# **Answer.** One more dequantization per layer and step: forward dequantizes, backward dequantizes again (and
# with gradient checkpointing the forward is recomputed, so three dequantizations of each weight per step).
# Dequantizing is a read of 4.127 bits and a write of 16 bits per weight. Whether that is cheap depends on the
# tokens: on an H100 (gpu-facts, 2026-11-22) it takes 0.115 ms for a 4096 × 4096 weight, against 0.197 ms for
# its bf16 matmul of 4,096 tokens (a fraction of it), but about 0.025 ms for a matmul of the recipe's 512 tokens
# (an eighth, estimated): there the dequantization costs several times the matmul, three times a step. That is
# why QLoRA's tokens/s trail LoRA's; the lesson (section 6b) measures both sizes on the CPU. bitsandbytes'
# `MatMul4Bit` makes the same trade.

# %% [markdown]
# **Q4.** Why return the result in `x`'s dtype rather than in the compute dtype?

# %% [markdown] tags=["answer"]
# **Answer.** The layer is dropped into a model that was written for `nn.Linear`: the next operation (a
# residual add, a norm) expects the dtype it sent. With `prepare_model_for_kbit_training` the residual stream,
# norms and embeddings are float32; a bf16 result would make the next add silently change the stream's dtype,
# or fail. The compute dtype is a private detail of the matmul: bitsandbytes' `Linear4bit` casts back too, and
# the battery checks bit-for-bit equality with it, dtype included.
