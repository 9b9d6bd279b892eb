# %% [markdown]
# # Exercise 6: LoRA, written by you
#
# In [chapter 6](../notebooks/06_lora.ipynb) you saw a frozen linear layer get a trainable low-rank update.
# Now you write the layer yourself, `LoRALinear(base, r, alpha, dropout=0.0)`:
#
# $$y = W x + b + \frac{\alpha}{r}\, B A\, \mathrm{dropout}(x), \qquad A: (r, \text{in}), \quad
#   B: (\text{out}, r)$$
#
# * `.base` is the `nn.Linear` you are given, frozen; `.lora_A` and `.lora_B` are the only trainable
#   parameters, float32 (peft's default, whatever the base's dtype);
# * they start as peft starts them: `A` uniform in `±1/sqrt(in_features)`, `B = 0`, so the new layer
#   computes exactly the old one until training moves `B`;
# * the forward adds the scaled update to the base layer's output, with dropout on the adapter path's input
#   only;
# * `merge()` returns a **new** `nn.Linear` with weight `W + (alpha / r) B A`, and leaves `.base` as it was.
#
# The check at the end runs **the same test battery** as the package's tests: your layer next to peft's LoRA
# layer given the same `W`, `A` and `B` (outputs in float32 and bfloat16, dropout masks, gradients), peft's
# initialization, the merged weight against a float64 reference. The argument checks and the structure of
# the class are given; write the four parts marked `YOUR CODE HERE`.

# %% tags=["setup"]
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from qlora_edu.ch06_lora.guards import check_lora_forward_args, check_lora_linear_args

# %% [markdown]
# ## Exercise 6.1: the layer
#
# Four parts, in this order (each has its hints):
#
# 1. `__init__`: the two adapters as `nn.Parameter`s of the right shapes, dtype and device;
# 2. `reset_lora_parameters`: peft's initialization;
# 3. `forward`: the base output plus the scaled update. peft casts `x` to the adapters' dtype for the adapter
#    path and adds in float32, then casts the sum back to the base output's dtype; do the same and a
#    bfloat16 layer gives peft's bits;
# 4. `merge`: the new layer.
#
# `F.linear(h, M)` computes `h @ M.T` for any number of leading dimensions: `F.linear(h, A)` maps
# `(..., in)` to `(..., r)`, and `F.linear(·, B)` maps that to `(..., out)`.

# %%
# @solution qlora_edu.ch06_lora.lora.LoRALinear

# %% [markdown]
# Try it on a small layer: the shapes, what is trainable, and the output at initialization next to the base
# layer's (they should be *equal*, not just close).

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
base = nn.Linear(12, 10)
layer = LoRALinear(base, r=4, alpha=8)
x = torch.randn(3, 12)
print("lora_A", tuple(layer.lora_A.shape), " lora_B", tuple(layer.lora_B.shape), " scaling", layer.scaling)
print("trainable:", [name for name, p in layer.named_parameters() if p.requires_grad])
print("output at init == base output:", torch.equal(layer(x), base(x)))

# %% [markdown]
# ## Check your work
#
# Every case of the battery that uses `LoRALinear`: shapes and freezing, peft's initialization, the forward
# against peft's layer (three input shapes, with and without bias, float32 and bfloat16), dropout (where it
# goes, and that it is off in eval mode), the gradients against peft's (and exactly zero for `A` at
# initialization), the merge (a new layer, the base untouched, the weight against float64) and bad
# arguments. It prints the first failure with what was expected, what came back and a hint.

# %%
from qlora_edu import check

check(LoRALinear)

# %% [markdown]
# ## Exercise 6.2: count by hand
#
# LLaMA-7B has 32 decoder layers, hidden size 4,096 and MLP size 11,008; every projection of its attention
# (q, k, v, o) is 4,096 × 4,096, the MLP's gate and up are 4,096 → 11,008 and down is 11,008 → 4,096. In
# all it has 6,738,415,616 parameters. Without the package's counting functions, compute the trainable
# parameters of LoRA at `r = 16` on (a) `q_proj` and `v_proj` only (the LoRA paper's choice) and (b) all
# seven projections (QLoRA's choice), and each as a percentage of all parameters (frozen + adapters, as peft's
# `print_trainable_parameters` reports it). One study note says LoRA trains "1–2%" of the parameters,
# another "<1%". Which is right here?

# %%
# NBVAL_CHECK_OUTPUT
n_layers, hidden, mlp, total = 32, 4096, 11008, 6_738_415_616
r = 16
# BEGIN SOLUTION
# Hint: an (in -> out) projection gets A (r x in) and B (out x r): r * (in + out) parameters.
qv = n_layers * 2 * r * (hidden + hidden)
seven = n_layers * (4 * r * (hidden + hidden) + 3 * r * (hidden + mlp))
for name, n in (("q, v", qv), ("all seven", seven)):
    print(f"r = {r}, {name:9s}: {n:>12,} trainable = {100 * n / (total + n):.3f}% of all parameters")
# END SOLUTION

# %% [markdown]
# ## Exercise 6.3: can your layer learn a low-rank change?
#
# Make a frozen 64 → 64 layer and a *target* layer that differs from it by a rank-2 matrix. Wrap the frozen
# layer in your `LoRALinear` (`r = 2`, `alpha = 2`), train only `lora_A` and `lora_B` with
# `torch.optim.Adam(lr=1e-2)` for 300 steps of mean squared error between your layer's output and the
# target's on fresh random inputs (batch 64), and print the loss at the start and at the end. Then merge:
# how far is the merged weight from the target weight, relative to the size of the change
# (`‖W_merged − W_target‖ / ‖ΔW‖`)? Try `r = 1` too: what happens, and why?

# %%
import copy

torch.manual_seed(0)
frozen = nn.Linear(64, 64)
u, v = torch.randn(64, 2), torch.randn(2, 64)
delta_w = 0.05 * u @ v  # the change to learn: rank 2
target = nn.Linear(64, 64)
with torch.no_grad():
    target.weight.copy_(frozen.weight + delta_w)
    target.bias.copy_(frozen.bias)
# BEGIN SOLUTION
# Hint: the optimizer gets [layer.lora_A, layer.lora_B] only; the target's output under torch.no_grad().
for rank in (2, 1):
    layer = LoRALinear(copy.deepcopy(frozen), r=rank, alpha=2)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-2)
    losses = []
    for _ in range(300):
        x = torch.randn(64, 64)
        with torch.no_grad():
            y = target(x)
        loss = F.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    merged = layer.merge()
    gap = ((merged.weight - target.weight).norm() / delta_w.norm()).item()
    print(f"r = {rank}: loss {losses[0]:.5f} -> {losses[-1]:.2e}; ||W_merged - W_target|| / ||dW|| = {gap:.4f}")
sigma = torch.linalg.svdvals(delta_w)
print(f"best rank-1 approximation (Eckart-Young) leaves sigma_2 / ||dW|| = {(sigma[1] / sigma.norm()).item():.4f}")
# END SOLUTION

# %% [markdown]
# ## Questions
#
# **Q1.** peft starts `B` at zero and `A` at random. Why not the other way round, and why not both at zero?

# %% [markdown] tags=["answer"]
# **Answer.** Either way round starts the layer at the base model (`B A = 0`), and either trains: with
# `A = 0` and `B` random, `dL/dA = s Bᵀ g xᵀ` is not zero. The LoRA paper (and peft) chose `B = 0`; what
# matters is that *one* of them is random. With both at zero, `dL/dA = s Bᵀ g xᵀ = 0` and
# `dL/dB = s g (A x)ᵀ = 0`: no gradient ever reaches either, and the adapters stay at zero forever (the
# lesson shows it). At `B = 0` the first step moves only `B`; `A` starts moving from the second step.

# %% [markdown]
# **Q2.** Why scale the update by `alpha / r` and not by `alpha`?

# %% [markdown] tags=["answer"]
# **Answer.** With `A` initialized at a fixed scale, the update `B A x` is a sum over `r` directions, so its
# size (and the size of the gradients reaching `B`) grows with `r`. Dividing by `r` keeps the effect of a
# learning rate roughly the same when you change the rank, so `alpha` and the learning rate can be tuned once.
# (rsLoRA argues for `alpha / sqrt(r)` at large ranks; peft offers it as `use_rslora=True`, not by default.)
# Whatever the rule, the forward and `merge` must use the same factor.

# %% [markdown]
# **Q3.** In Exercise 6.3 a rank-1 adapter could not learn the rank-2 change. Which part of the change does
# it learn?

# %% [markdown] tags=["answer"]
# **Answer.** The best rank-1 approximation of `ΔW` in the least-squares sense (Eckart–Young): its largest
# singular direction, `σ₁ u₁ v₁ᵀ`. The error that remains is `σ₂`, so `‖W_merged − W_target‖ / ‖ΔW‖`
# settles near `σ₂ / sqrt(σ₁² + σ₂²)`, not at 0. That is the bet LoRA makes on a real model: the update a
# task needs has most of its energy in a few directions.

# %% [markdown]
# **Q4.** Why does dropout go on the adapter path's input, and not on the base layer's output?

# %% [markdown] tags=["answer"]
# **Answer.** The base model is frozen and was trained without dropout on this path: dropping parts of its
# output would perturb the very function we want to keep, and the adapters would spend their capacity
# compensating. Dropout is there to regularize the few trainable parameters, so it acts only on what they
# see: `B A dropout(x)`. In eval mode it is off, and `merge` ignores it (a merged layer has no dropout).
