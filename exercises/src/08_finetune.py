# %% [markdown]
# # Exercise 8: train on the responses only
#
# In [chapter 8](../notebooks/08_finetune.ipynb) the fine-tune's loss counts only the assistant's reply:
# every prompt token and every padding position gets the label `-100`, which `cross_entropy` ignores.
# One function does it; you write it:
#
# `mask_prompt_labels(input_ids, prompt_lengths, attention_mask) -> labels`
#
# **The contract.** `input_ids` is a right-padded batch `(B, T)` of int64 token ids: row `b` holds its
# `prompt_lengths[b]` prompt tokens (the chat template up to `<|im_start|>assistant\n`), then the response
# and its end token `<|im_end|>`, then padding; `attention_mask` `(B, T)` is 1 on the real tokens, 0 on the
# padding (int64 or bool). Return new int64 labels of the same shape:
#
# $$\text{labels}_{b,t} = \begin{cases} \text{input\_ids}_{b,t} & t \ge \text{prompt\_lengths}_b
#   \text{ and } \text{attention\_mask}_{b,t} = 1 \\ -100 & \text{otherwise} \end{cases}$$
#
# Do not shift the labels (the model does: the label at position `t` is predicted from the tokens before
# `t`), and do not find the padding by its token id: SmolLM2 pads with `<|im_end|>`, the very token that
# ends every response. The argument checks are given; write the part marked `YOUR CODE HERE`.

# %% tags=["setup"]
import torch

from qlora_edu import IGNORE_INDEX
from qlora_edu.ch08_finetune.guards import check_mask_prompt_labels_args

# %% [markdown]
# ## Exercise 8.1: the mask
#
# Vectorize: one comparison of a `(1, T)` row of positions with a `(B, 1)` column of prompt lengths gives
# every prompt position at once.

# %%
# @solution qlora_edu.ch08_finetune.instruct_data.mask_prompt_labels

# %% [markdown]
# Try it on a batch you can read: pad id = end id = 2; the first row has a 3-token prompt, a 2-token
# response, its end token and two padding positions. Expected:
# `[-100, -100, -100, 21, 22, 2, -100, -100]` and `[-100, -100, 21, 22, 23, 24, 25, 2]`.

# %%
# NBVAL_CHECK_OUTPUT
ids = torch.tensor([[11, 12, 13, 21, 22, 2, 2, 2], [11, 12, 21, 22, 23, 24, 25, 2]])
mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
print(mask_prompt_labels(ids, torch.tensor([3, 2]), mask).tolist())

# %% [markdown]
# ## Check your work
#
# The battery: unpadded rows (the prompt/response boundary, off by one either way, labels shifted by
# hand), padding with the end token's id (the end token must keep its label), the output's dtype and
# `-100` value with the input left untouched, four real orders through SmolLM2's chat template (the kept
# labels must decode to exactly the JSON reply plus `<|im_end|>`), and random batches against a
# position-by-position reference.

# %%
from qlora_edu import check

check(mask_prompt_labels)

# %% [markdown]
# ## Exercise 8.2: what the loss sees
#
# Encode eight training orders with the chat template (`encode_example` gives the token ids and the
# prompt's length), pad them on the right with the pad token, and build the labels with *your* function.
# Print: the decoded kept labels of the first row, the fraction of the batch's real tokens that are in the
# loss, and how many end tokens keep their label with your mask and with a mask that drops every token
# whose id is the pad id.

# %%
from qlora_edu import encode_example, load_dataset, load_tokenizer

tokenizer = load_tokenizer()
examples = load_dataset("train")[:8]
# BEGIN SOLUTION
encoded = [encode_example(tokenizer, e) for e in examples]
width = max(len(ids) for ids, _ in encoded)
input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
for row, (ids, _) in enumerate(encoded):
    input_ids[row, :len(ids)] = torch.tensor(ids)
    attention_mask[row, :len(ids)] = 1
prompt_lengths = torch.tensor([p for _, p in encoded])
labels = mask_prompt_labels(input_ids, prompt_lengths, attention_mask)
print("row 0 in the loss:", repr(tokenizer.decode(labels[0][labels[0] != IGNORE_INDEX])))
kept = int((labels != IGNORE_INDEX).sum())
print(f"{kept} of {int(attention_mask.sum())} real tokens are in the loss ({kept / int(attention_mask.sum()):.0%})")
by_id = input_ids.masked_fill(input_ids == tokenizer.pad_token_id, IGNORE_INDEX)
eos = tokenizer.eos_token_id
print(f"end tokens with a label: {int((labels == eos).sum())} of {len(examples)} with the attention mask, "
      f"{int((by_id == eos).sum())} when padding is found by its id (pad id {tokenizer.pad_token_id}, "
      f"end id {eos})")
# END SOLUTION

# %% [markdown]
# ## Exercise 8.3: the base model's loss, on the response and on everything
#
# Load the base model (full precision is fine here: no training) and compute its mean loss on the batch
# twice: with your labels (the response only) and with `labels = input_ids` where the attention mask is 1
# (every real token, as if training on the whole chat). Which one will the fine-tune bring down, and why is
# the other one not the target?

# %%
from qlora_edu.common.base_model import load_base_model

model, _ = load_base_model(progress=False)
# BEGIN SOLUTION
everything = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
with torch.no_grad():
    loss_response = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    loss_all = model(input_ids=input_ids, attention_mask=attention_mask, labels=everything).loss
print(f"base model loss on the responses only: {loss_response:.3f}; on every real token: {loss_all:.3f}")
# END SOLUTION

# %% [markdown]
# ## Questions
#
# **Q1.** The QLoRA paper's code trains with `train_on_source=False` by default: no loss on the prompt.
# What would training on the prompt spend the adapters' capacity on here, and what share of the loss would
# it take (use Exercise 8.2's fraction)?

# %% [markdown] tags=["answer"]
# **Answer.** On predicting text the model is *given* at inference: the system instruction (identical in
# every example, so it would be memorized within a few steps) and the customers' messages (random names
# and cities, unpredictable, so their loss stays high whatever the model does). The response is under a
# third of the real tokens (Exercise 8.2 prints the fraction), so most of the loss, and of the gradient,
# would be about the prompt; the JSON the model must learn to write would be a minority of the signal.

# %% [markdown]
# **Q2.** Your mask keeps the label of the response's `<|im_end|>`. What goes wrong at generation time if
# that label is `-100` (the pad-id mistake)?

# %% [markdown] tags=["answer"]
# **Answer.** The model is never trained to emit the end token after the JSON, so greedy generation keeps
# going after the closing brace (another object, prose, the next "turn") until `max_new_tokens`. The
# score's parser forgives trailing text, but generation costs up to `max_new_tokens` per answer instead of
# ~30 tokens, and a chat application would show the rambling. Exercise 8.2 counts the end tokens that lose
# their label this way: all of them.

# %% [markdown]
# **Q3.** Training batches are padded on the right, generation batches on the left. Why the difference?

# %% [markdown] tags=["answer"]
# **Answer.** Generation appends new tokens at the end of each row: with right padding the new tokens of a
# short prompt would come after its padding, and the model would continue from pad tokens. Left padding puts
# every prompt's last token in the last column. In training there is nothing to append; right padding keeps
# every row's prompt at positions `0 .. prompt_length - 1`, which is what `mask_prompt_labels` assumes.
