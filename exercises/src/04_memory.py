# %% [markdown]
# # Exercise 4: the static memory of LoRA and QLoRA
#
# In [chapter 4](../notebooks/04_memory.ipynb) you saw where the memory of a training step goes. Part of it
# lives from the set-up to the end of every step: the frozen weights (with their quantization constants),
# the trainable weights, their gradients and the optimizer's states. Now you write that part yourself:
#
# `static_tensors(config, method, *, lora_r=64, lora_targets=(...seven projections...), optimizer="adamw",
# **settings) -> list[StaticTensor]`: one `StaticTensor(part, module, layer, what, nbytes)` for every such
# tensor.
#
# Full fine-tuning, the optimizer states and the gradients are given (the helper `trainable(...)` adds a
# trainable tensor with its gradient and states); you write the breakdown of **LoRA and QLoRA**: the
# frozen base (bf16 for LoRA, NF4 + double quantization for QLoRA), the norms, embeddings and head, and the
# adapters. The check at the end runs **the same test battery** as the package's tests against *your*
# function: byte for byte against the real tensors of small Llama models set up with transformers,
# bitsandbytes and peft after a real training step, and against the H100 measurements of `gpu-facts.md`.

# %% tags=["setup"]
import math

import torch
from transformers import LlamaConfig

from qlora_edu import DQ_BLOCK, LLAMA_TARGETS, MIN_8BIT_NUMEL, PAGED_MIN_NUMEL, STATE_BLOCK, StaticTensor
from qlora_edu.ch04_memory.guards import check_static_tensors_args

# %% [markdown]
# ## Exercise 4.1: every resident tensor
#
# For each decoder layer and each of its seven projections (`dims.linears()` maps a name to
# `(in_features, out_features)`; with grouped-query attention `k_proj` and `v_proj` are narrower), with
# `n = in × out`:
#
# * **QLoRA's frozen base** is what bitsandbytes' `Params4bit` and its `QuantState` hold: `ceil(n / 2)`
#   bytes of packed NF4 codes; the 16-value NF4 table in float32 (every weight's state has its own copy);
#   with double quantization (`s["double_quant"]`) one uint8 code per block of `s["blocksize"]` (64)
#   weights, one float32 `absmax2` per `DQ_BLOCK` (256) codes, a float32 offset, and its own copy of the
#   256-value dynamic map in float32; without it, one float32 absmax per block.
# * **LoRA's frozen base** is the weight itself: `n × base` bytes, where `base` is the element size of the
#   frozen unquantized weights (bf16 = 2; float32 = 4 after peft's `prepare_model_for_kbit_training`,
#   which upcasts every non-4-bit weight).
# * If the projection is in `targets`, the adapters `lora_A (r × in)` and `lora_B (out × r)` are
#   trainable, `ad` bytes an element (peft keeps them in float32): call `trainable(name, layer, "lora_A",
#   numel, ad)`, which adds the gradient and the optimizer states too.
#
# Each layer also has two RMSNorm weights (`h × base` bytes, frozen); outside the layers come the embedding
# (`V × h × base`), the final norm (`h × base`) and `lm_head` (`V × h × base`), unless the embeddings are
# tied (`dims.tied`): then `lm_head` *is* the embedding and adds nothing.

# %%
# @solution qlora_edu.ch04_memory.memory.static_tensors

# %% [markdown]
# Try it on Llama-7B, the model `gpu-facts.md` measured on an H100: QLoRA with r = 64 on all seven
# projections and a paged fp32 AdamW. The measured figures: NF4 weights with bf16 embeddings and head
# **3,687 MiB** (before `prepare`), **4,798 MiB** after `prepare` with the adapters, optimizer states
# **1,220 MiB**.

# %%
# NBVAL_CHECK_OUTPUT
llama7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
MiB = 2**20


def parts_mib(tensors):
    parts = {}
    for t in tensors:
        parts[t.part] = parts.get(t.part, 0) + t.nbytes
    return {k: round(v / MiB) for k, v in parts.items()}


print("QLoRA, no prepare:", parts_mib(static_tensors(llama7b, "qlora", optimizer="paged_adamw", prepare_kbit=False)))
print("QLoRA, prepare:   ", parts_mib(static_tensors(llama7b, "qlora", optimizer="paged_adamw")))
print("LoRA (bf16 base): ", parts_mib(static_tensors(llama7b, "lora", optimizer="paged_adamw")))

# %% [markdown]
# Where does the QLoRA figure differ from "0.5 bytes a weight"? Sum your tensors by what they are:

# %%
by_what = {}
for t in static_tensors(llama7b, "qlora", prepare_kbit=False):
    if t.part == "frozen_weights":
        key = t.what if t.layer is not None else t.module
        by_what[key] = by_what.get(key, 0) + t.nbytes
for what, nbytes in sorted(by_what.items(), key=lambda kv: -kv[1]):
    print(f"{what:24} {nbytes / MiB:9.1f} MiB")

# %% [markdown]
# ## Check your work
#
# This runs every case of the course's battery that uses `static_tensors`: QLoRA (grouped-query attention,
# `prepare`, untied head), LoRA (bf16 base, tied embeddings) and 8-bit AdamW states, each part byte for byte
# against the real tensors after one step; the gradients labelled with their layer and module; the H100
# figures of `gpu-facts.md`; and a bad argument.

# %%
from qlora_edu import check

check(static_tensors)

# %% [markdown]
# ## Questions
#
# **Q1.** The seed notes say "7B → 3.5 GB" in 4 bits. Your function gives about 3,687 MiB for the frozen
# QLoRA model. What is in the difference?

# %% [markdown] tags=["answer"]
# **Answer.** 3.5 GB is 7 × 10⁹ × 0.5 bytes. The decoder linears hold 6.48 G weights: 3,088 MiB of packed
# codes plus ~99 MiB of constants (one uint8 code per 64 weights, one float32 per 16,384, the small tables):
# 4.127 bits a weight. The rest, ~500 MiB, is the 262 M embedding and head weights, which QLoRA does not
# quantize (bf16, 2 bytes each) — and after `prepare_model_for_kbit_training` they become float32, another
# +500 MiB. "0.5N" counts only the quantized part at exactly 4 bits.

# %% [markdown]
# **Q2.** The notes write LoRA's memory as `4N + 16M` bytes. What does your breakdown say the `16` counts,
# and is `4N` right for a bf16 base?

# %% [markdown] tags=["answer"]
# **Answer.** Per trainable (adapter) parameter: 4 bytes of float32 weight + 4 of gradient + 8 of AdamW's
# two float32 moments = 16 bytes, which is what peft's float32 adapters really cost (with bf16 adapters it
# would be 2 + 2 + 8 = 12). But a bf16 base is **2** bytes a weight, not 4: `2N + 16M`. Neither formula has
# the activations, which decide whether a batch fits.

# %% [markdown]
# **Q3.** At r = 64 the 7B adapters have 160 M parameters. Why are the optimizer states 1,220 MiB, and what
# would `optimizer="adamw8bit"` make of them?

# %% [markdown] tags=["answer"]
# **Answer.** 159.9 M × 8 bytes = 1,279 MB = 1,220 MiB. With 8-bit AdamW each state is one byte plus one
# float32 absmax per 256 values: 2 × (1 + 4/256) = 2.03 bytes a parameter, about 310 MiB, a saving of
# ~910 MiB. Compared with the 3,687 MiB (3.87 GB) of frozen weights and the activations that is useful but not decisive;
# it matters much more for full fine-tuning, where the states are 8 bytes for *every* weight (of the
# 12 bytes a parameter of chapter 4's baseline, bf16 weights and gradients plus fp32 states).
