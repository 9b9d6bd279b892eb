"""Battery for chapter 8: ``mask_prompt_labels``, the labels that train a chat model on its responses only.

Expected labels come from hand-written batches, from a plain Python loop over the positions (a reference that
shares no code with a vectorized solution), and from the real tokenizer: the prompt tokenized alone through the
chat template, the response alone, never from the package's own encoding.
"""

from __future__ import annotations

import functools

import torch
from hypothesis import given
from hypothesis import strategies as st

from qlora_edu.checks import (
    CheckFailure,
    case,
    expect_equal,
    expect_true,
    mistake,
    property_settings,
)

IGNORE = -100
PAD = EOS = 2  # as in SmolLM2: the pad token is the end token


def _batch(rows: list[tuple[list[int], int]], width: int, mask_dtype=torch.long):
    """A right-padded batch from ``(token ids, prompt length)`` rows, padded with the end token's id."""
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=mask_dtype)
    for r, (tokens, _) in enumerate(rows):
        ids[r, :len(tokens)] = torch.tensor(tokens)
        mask[r, :len(tokens)] = 1
    return ids, torch.tensor([p for _, p in rows], dtype=torch.long), mask


def reference_labels(ids: torch.Tensor, prompt_lengths: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Position by position, in plain Python: keep a token only after its row's prompt and inside its row."""
    out = [[tok if (t >= int(p) and int(m) == 1) else IGNORE for t, (tok, m) in enumerate(zip(row, mrow, strict=True))]
           for row, p, mrow in zip(ids.tolist(), prompt_lengths, mask.tolist(), strict=True)]
    return torch.tensor(out, dtype=torch.long)


#: The hint for labels that lost the response's end token: padding found by the pad id, not by the mask.
PAD_BY_MASK = ("padding is where attention_mask == 0, not where input_ids == pad_token_id: SmolLM2 pads with its "
               "end token <|im_end|>, and the response's own end token must keep its label (or the model never "
               "learns to stop)")


def _expect_labels(what: str, got: torch.Tensor, expected: torch.Tensor, hint: str = "") -> None:
    """``got == expected``; first, the diagnosis of one mistake: labels right but for the end tokens the
    response keeps, masked as if they were padding."""
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype:
        lost_end = (expected == EOS) & (got == IGNORE)
        if bool(lost_end.any()) and bool(((got == expected) | lost_end).all()):
            raise CheckFailure(f"{what}: the response's end token (id {EOS}) lost its label at {int(lost_end.sum())} "
                               "position(s); every other label is right", expected, got, PAD_BY_MASK)
    expect_equal(what, got, expected, hint)


# ----------------------------------------------------------------------------------------------


@case("mask_prompt_labels", hint="a label is -100 where the loss must ignore the position: the prompt, "
      "positions t < prompt_lengths[b]. The labels are not shifted (the model shifts them), so the first "
      "response token keeps its own id at its own position",
      code_hint="positions = torch.arange(T); prompt = positions[None, :] < prompt_lengths[:, None]; "
      "input_ids.masked_fill(prompt | (attention_mask == 0), -100)")
def prompt_positions_are_ignored(impl):
    """Two rows without padding: prompts of 3 and 2 tokens, then the response and its end token."""
    ids, plen, mask = _batch([([11, 12, 13, 21, 22, 23, EOS], 3), ([11, 12, 21, 22, 23, 24, EOS], 2)], 7)
    got = impl.mask_prompt_labels(ids, plen, mask)
    expected = torch.tensor([[IGNORE, IGNORE, IGNORE, 21, 22, 23, EOS],
                             [IGNORE, IGNORE, 21, 22, 23, 24, EOS]])
    _expect_labels("labels of two unpadded rows (prompt lengths 3 and 2)", got, expected)


@mistake("mask_prompt_labels", caught_by=prompt_positions_are_ignored)
def mask_prompt_labels_one_too_many(input_ids, prompt_lengths, attention_mask):
    """Masks the first response token too (``<=`` for ``<``)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    drop = (positions[None, :] <= prompt_lengths[:, None]) | (attention_mask == 0)
    return input_ids.masked_fill(drop, IGNORE)


@mistake("mask_prompt_labels", caught_by=prompt_positions_are_ignored)
def mask_prompt_labels_one_too_few(input_ids, prompt_lengths, attention_mask):
    """Leaves the prompt's last token (``<|im_start|>assistant\\n``'s newline) in the loss."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    drop = (positions[None, :] < prompt_lengths[:, None] - 1) | (attention_mask == 0)
    return input_ids.masked_fill(drop, IGNORE)


@mistake("mask_prompt_labels", caught_by=prompt_positions_are_ignored)
def mask_prompt_labels_shifted(input_ids, prompt_lengths, attention_mask):
    """Shifts the labels left by one itself (``labels[t] = input_ids[t + 1]``), as a hand-written loss would:
    transformers shifts again inside the model, so every label is one token off."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    drop = (positions[None, :] < prompt_lengths[:, None]) | (attention_mask == 0)
    labels = input_ids.masked_fill(drop, IGNORE)
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE)], dim=1)


@case("mask_prompt_labels", hint=PAD_BY_MASK)
def padding_is_ignored_end_token_kept(impl):
    """Right padding with the end token's id: the padding gets -100, the response's end token keeps its id."""
    ids, plen, mask = _batch([([11, 12, 13, 21, 22, EOS], 3), ([11, 12, 21, 22, 23, 24, 25, EOS], 2),
                              ([11, 21, EOS], 1)], 8)
    got = impl.mask_prompt_labels(ids, plen, mask)
    expected = torch.tensor([[IGNORE, IGNORE, IGNORE, 21, 22, EOS, IGNORE, IGNORE],
                             [IGNORE, IGNORE, 21, 22, 23, 24, 25, EOS],
                             [IGNORE, 21, EOS, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]])
    _expect_labels("labels of three right-padded rows (pad id = end id = 2)", got, expected)


@mistake("mask_prompt_labels", caught_by=padding_is_ignored_end_token_kept, shows=PAD_BY_MASK)
def mask_prompt_labels_by_pad_id(input_ids, prompt_lengths, attention_mask):
    """Finds the padding by its token id: with pad = end token, every response loses its end token."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    drop = (positions[None, :] < prompt_lengths[:, None]) | (input_ids == PAD)
    return input_ids.masked_fill(drop, IGNORE)


@mistake("mask_prompt_labels", caught_by=padding_is_ignored_end_token_kept)
def mask_prompt_labels_keeps_padding(input_ids, prompt_lengths, attention_mask):
    """Masks the prompt only: the padding positions stay in the loss (the model learns to emit <|im_end|> forever)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return input_ids.masked_fill(positions[None, :] < prompt_lengths[:, None], IGNORE)


@case("mask_prompt_labels", hint="return a new int64 tensor of input_ids' shape holding -100 (the value "
      "cross_entropy ignores by default) where masked, and leave input_ids as it was",
      code_hint="input_ids.masked_fill(drop, -100) (a new tensor), not masked_fill_ (writes into input_ids)")
def ignore_index_and_input_untouched(impl):
    """The output: int64, ``input_ids``' shape and device, -100 (not 0) where masked; the input is not modified."""
    ids, plen, mask = _batch([([5, 6, 7, 8, EOS], 2), ([5, 6, 7, EOS], 3)], 6)
    before = ids.clone()
    got = impl.mask_prompt_labels(ids, plen, mask)
    expect_true(isinstance(got, torch.Tensor), "mask_prompt_labels must return a tensor", "Tensor", type(got).__name__)
    expect_equal("input_ids after the call (it must not be modified)", ids, before)
    expect_true(got.dtype == torch.long, "labels dtype", torch.long, got.dtype)
    expect_true(got.device == ids.device, "labels device", ids.device, got.device)
    expect_equal("labels (masked positions hold -100)", got, reference_labels(ids, plen, mask))
    # the loss really ignores them: cross-entropy over the kept labels only
    logits = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    kept = got != IGNORE
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), got.reshape(-1).clamp(max=15))
    direct = torch.nn.functional.cross_entropy(logits[kept], got[kept].clamp(max=15))
    expect_true(bool(torch.isclose(loss, direct)), "cross_entropy with these labels averages the kept positions only",
                float(direct), float(loss))


@mistake("mask_prompt_labels", caught_by=ignore_index_and_input_untouched)
def mask_prompt_labels_zero_fill(input_ids, prompt_lengths, attention_mask):
    """Fills with 0 instead of -100: token 0 becomes the target of every prompt and padding position."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    drop = (positions[None, :] < prompt_lengths[:, None]) | (attention_mask == 0)
    return input_ids.masked_fill(drop, 0)


@mistake("mask_prompt_labels", caught_by=ignore_index_and_input_untouched,
         shows="changed its argument 'input_ids' in place")
def mask_prompt_labels_in_place(input_ids, prompt_lengths, attention_mask):
    """Writes into input_ids (masked_fill_): the model's inputs become -100 too."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    drop = (positions[None, :] < prompt_lengths[:, None]) | (attention_mask == 0)
    return input_ids.masked_fill_(drop, IGNORE)


@functools.cache
def _tokenizer_and_examples(impl_load_tokenizer, impl_load_dataset):
    return impl_load_tokenizer(), impl_load_dataset("heldout")[:4]


@case("mask_prompt_labels", hint="the kept labels must decode to exactly the assistant's JSON followed by "
      "<|im_end|>; the prompt (everything up to '<|im_start|>assistant\\n') and the padding must be -100")
def chat_template_batch(impl):
    """Four held-out orders through the real tokenizer: the prompt tokenized alone with the chat template
    (``add_generation_prompt=True``), then the response and the end token; padded right with the pad token."""
    tokenizer, examples = _tokenizer_and_examples(impl.load_tokenizer, impl.load_dataset)
    rows = []
    for e in examples:
        prompt_text = tokenizer.apply_chat_template(impl.build_messages(e), add_generation_prompt=True,
                                                    tokenize=False)
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response = tokenizer(e.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, response))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (p, r) in enumerate(rows):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        mask[b, :len(p) + len(r)] = 1
    plen = torch.tensor([len(p) for p, _ in rows])
    labels = impl.mask_prompt_labels(ids, plen, mask)
    for b, (e, (p, _)) in enumerate(zip(examples, rows, strict=True)):
        kept = labels[b][labels[b] != IGNORE].tolist()
        decoded = tokenizer.decode(kept)
        if decoded != e.response + tokenizer.eos_token:
            raise CheckFailure(f"row {b}: the labels kept decode to the wrong text",
                               e.response + tokenizer.eos_token, decoded,
                               "keep exactly the positions prompt_length .. row length - 1")
        expect_true(bool((labels[b, :len(p)] == IGNORE).all()), f"row {b}: every prompt position must be -100",
                    "all -100", labels[b, :len(p)].tolist())


@case("mask_prompt_labels", hint="work for any batch: prompt length 0 (nothing masked but padding), prompt = the "
      "whole row (nothing kept), a bool attention mask, rows of any length",
      code_hint="compare the mask (attention_mask == 0) rather than compute with it (1 - attention_mask fails on "
      "a bool mask)")
def random_batches_match_reference(impl):
    """Random right-padded batches (1-6 rows, 1-40 positions, int64 or bool masks) against a position-by-position
    Python reference."""

    @property_settings(60)
    @given(st.data())
    def prop(data):
        width = data.draw(st.integers(1, 40), label="T")
        n_rows = data.draw(st.integers(1, 6), label="B")
        rows = []
        for _ in range(n_rows):
            length = data.draw(st.integers(1, width))
            prompt = data.draw(st.integers(0, length))
            rows.append((data.draw(st.lists(st.integers(0, 49151), min_size=length, max_size=length)), prompt))
        mask_dtype = data.draw(st.sampled_from([torch.long, torch.bool]), label="mask dtype")
        ids, plen, mask = _batch(rows, width, mask_dtype)
        got = impl.mask_prompt_labels(ids, plen, mask)
        expect_equal(f"labels of a random {n_rows} x {width} batch (prompt lengths {plen.tolist()}, lengths "
                     f"{mask.long().sum(1).tolist()}, mask {mask_dtype})", got, reference_labels(ids, plen, mask))

    prop()


@mistake("mask_prompt_labels", caught_by=random_batches_match_reference,
         shows="your code raised RuntimeError: Subtraction, the `-` operator, with a bool tensor is not supported")
def mask_prompt_labels_mask_as_int(input_ids, prompt_lengths, attention_mask):
    """Treats the mask as numbers (``1 - attention_mask``), which fails on a bool mask."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    pad = (1 - attention_mask).bool()
    return input_ids.masked_fill((positions[None, :] < prompt_lengths[:, None]) | pad, IGNORE)
