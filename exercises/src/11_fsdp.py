# %% [markdown]
# # Exercise 11: what one GPU holds when FSDP shards the model
#
# In [chapter 11](../notebooks/11_fsdp.ipynb) PyTorch's FSDP split a QLoRA model over two processes. Now you write
# the formula that says how many bytes each GPU keeps between steps:
#
# `per_gpu_static(tensors, world_size, *, cpu_offload=False) -> dict`: given chapter 4's list of resident tensors
# (`static_tensors(...)`: one `StaticTensor(part, module, layer, what, nbytes)` each) and the number of GPUs, return
# the bytes of `"frozen_weights"`, `"trainable_weights"`, `"gradients"`, `"optimizer_states"` on one GPU, and
# `"host"`, the bytes that GPU's process keeps in host memory with CPU offload.
#
# The check at the end runs the course's battery against *your* function: it starts two processes, shards a small
# QLoRA model (bitsandbytes NF4, peft LoRA) with `fully_shard`, takes a training step, and compares your bytes with
# what rank 0 really holds (about 20 seconds).

# %% tags=["setup"]
from qlora_edu.ch04_memory.memory import llama_config, static_tensors
from qlora_edu.ch07_qlora.tools import tiny_llama_config
from qlora_edu.ch11_fsdp.guards import PARAMETER_WHATS, check_per_gpu_static_args

# %% [markdown]
# ## Exercise 11.1: shard what FSDP shards
#
# FSDP shards **parameters** (and so their gradients and the optimizer states that follow them): each is cut into
# `world_size` equal pieces along its first dimension, and rank 0 holds `ceil(nbytes / world_size)` bytes of it.
# Everything that is not a parameter is held **whole** by every rank: bitsandbytes keeps the NF4 constants (the
# `absmax` codes, `absmax2`, the offset, the two code tables) in the layer's `QuantState`, a plain Python
# attribute, and the rotary embedding's tables are buffers.
#
# Among the frozen tensors (`part == "frozen_weights"`), the parameters are those whose `what` is in
# `PARAMETER_WHATS` (`"weight"`: an unquantized weight; `"packed NF4 codes"`: bitsandbytes' `Params4bit`). Every
# tensor of the other three parts is sharded.
#
# With `cpu_offload=True` (FSDP2's `CPUOffloadPolicy`) every sharded piece lives in host memory instead: add it to
# `parts["host"]`.

# %%
# @solution qlora_edu.ch11_fsdp.sharding.per_gpu_static

# %% [markdown]
# Try it on the tiny model the battery shards (hidden 128, 2 layers, LoRA r = 8) and on Llama-7B:

# %%
# NBVAL_CHECK_OUTPUT
tiny = static_tensors(tiny_llama_config(), "qlora", lora_r=8, prepare_kbit=False, device="cpu")
for n in (1, 2):
    print(f"tiny, {n} GPU(s):", per_gpu_static(tiny, n))
MiB = 2**20
llama7b = static_tensors(llama_config("7B"), "qlora", lora_r=64, prepare_kbit=False)
for n in (1, 2, 4, 8):
    print(f"7B, {n} GPU(s):", {k: round(v / MiB) for k, v in per_gpu_static(llama7b, n).items()}, "MiB")

# %% [markdown]
# ## Check your work

# %%
from qlora_edu import check

check(per_gpu_static)

# %% [markdown]
# ## Questions
#
# **Q1.** On 8 GPUs, 7B's frozen weights do not fall to an eighth. Which tensors stay, and how large are they?

# %% [markdown] tags=["answer"]
# **Answer.** The NF4 constants stay whole on every GPU: one uint8 code per 64 weights (6.48 G / 64 = 101 M bytes,
# 97 MiB), one float32 per 256 codes (1.5 MiB) and each layer's two code tables (about 1 KiB each, 224 of them):
# ~98 MiB a GPU, whatever the number of GPUs. FSDP shards only parameters, and bitsandbytes keeps these in the
# `QuantState`. The course's `ShardableNF4Linear` makes them parameters, and then they are sharded too.

# %% [markdown]
# **Q2.** `per_gpu_static` is what stays between steps. What must a GPU hold *during* a step on top of it?

# %% [markdown] tags=["answer"]
# **Answer.** The units being computed, whole: FSDP all-gathers a decoder layer's shards just before it runs
# (and prefetches the next one), and FSDP2 keeps the root (embedding, final norm, `lm_head`) gathered for the whole
# step; one layer's whole adapter gradients before their reduce-scatter; and the activations of this GPU's
# micro-batch, which sharding does not divide. `training_memory(..., world_size=N, sharding="fsdp")` adds all of it.
