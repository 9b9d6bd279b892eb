"""Chapter 8's task: read a customer's order message and reply with one JSON object (the data, the prompt, the
labels, the score).

**The task.** A message such as

    Could you ship half a dozen shelves to Cape Town? Thanks, Maya Novak. It's urgent.

must become exactly

    {"customer": "Maya Novak", "item": "shelf", "quantity": 6, "city": "Cape Town", "express": true}

Two fields are copied (``customer``, ``city``), two are normalized (``item``: the singular catalogue name of
a plural such as "shelves"; ``quantity``: an integer from "6", "six", "half a dozen", "a pair of", "a"), and one
is inferred (``express``: true when the message asks for urgent or express delivery, false otherwise, also when
it says "no rush"). The metric is exact: the reply must parse as JSON (the first ``{...}`` in it counts, so
prose around the object is forgiven) and equal the expected object, types included (``6``, not ``"6"``).

**The data** come from :func:`generate_dataset`, a deterministic generator (``random.Random(seed)``): 10
message templates, 12 catalogue items, 7 ways to write a quantity, urgent / calm / no remark. The held-out split
uses first names, last names and cities that never occur in the training split, so a model can only score there
by reading the message, not by remembering names. ``scripts/make_finetune_data.py`` writes the committed files
``qlora_edu/ch08_finetune/data/orders_{train,heldout}.jsonl``; :func:`load_dataset` reads them.

The held-out split shares the templates, the items and the remark phrasings with training: it tests new names and
cities in familiar sentences. A third split, ``heldout_templates`` (:func:`generate_heldout_templates`, file
``orders_heldout_templates.jsonl``), changes the sentences too: 8 templates, 6 catalogue items (2 with irregular
plurals) and 8 urgent/calm remarks that never occur in training, with the held-out names and cities. Only the
quantity forms (digits, number words, "a pair of", "half a dozen", "a dozen", "two dozen") are shared: a
model must still normalize them.

**The prompt** is the model's own chat template (:func:`build_messages`): the instruction as the system message,
the order as the user message, the JSON as the assistant's reply. For SmolLM2 that is::

    <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n{message}<|im_end|>\\n<|im_start|>assistant\\n
    {json}<|im_end|>

:func:`encode_example` tokenizes it; the *prompt* is everything up to and including ``<|im_start|>assistant\\n``
(what ``apply_chat_template(..., add_generation_prompt=True)`` gives), the *response* the JSON and the closing
``<|im_end|>``, which the model must learn to emit, or generation never stops.

**The labels.** A causal LM's loss is the mean cross-entropy over positions whose label is not ``-100``
(transformers shifts the labels by one inside the model: label ``t`` is predicted from tokens ``< t``). Training
on the responses only (the QLoRA paper's ``train_on_source=False``) means ``-100`` on every prompt position and
on the padding; :func:`mask_prompt_labels` does it for a right-padded batch ``(B, T)``::

    labels[b, t] = input_ids[b, t]   if prompt_lengths[b] <= t and attention_mask[b, t] == 1
                 = -100              otherwise

SmolLM2's pad token *is* its end token ``<|im_end|>``: masking "every pad token" by id would also mask the
response's last token, and the fine-tuned model would not learn to stop. The attention mask says which
positions are padding; the token id does not.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_edu.ch08_finetune.guards import (
    check_build_messages_args,
    check_collate_examples_args,
    check_encode_example_args,
    check_field_accuracy_args,
    check_generate_dataset_args,
    check_load_dataset_args,
    check_load_tokenizer_args,
    check_mask_prompt_labels_args,
    check_paired_bootstrap_args,
    check_parse_answer_args,
    check_score_answers_args,
    check_sign_test_p_value_args,
    check_write_dataset_args,
)

__all__ = [
    "DATA_DIR",
    "IGNORE_INDEX",
    "INSTRUCTION",
    "Example",
    "build_messages",
    "collate_examples",
    "encode_example",
    "field_accuracy",
    "generate_dataset",
    "generate_heldout_templates",
    "load_dataset",
    "load_tokenizer",
    "mask_prompt_labels",
    "paired_bootstrap_interval",
    "parse_answer",
    "score_answers",
    "sign_test_p_value",
    "write_dataset",
]

#: The label value cross-entropy ignores (``torch.nn.CrossEntropyLoss(ignore_index=-100)``, transformers' default).
IGNORE_INDEX = -100
#: Where the committed data files live (shipped with the package).
DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "heldout", "heldout_templates")

#: The system message: what the model is asked to do, with the five keys and their types.
INSTRUCTION = ('Reply with the order as one JSON object: "customer", "item" (singular), "quantity" (integer), '
               '"city", "express" (true only if urgent or express delivery is asked for).')

# ----------------------------------------------------------------------------------------------
# The vocabulary of the generator. Names and cities: disjoint pools for the two splits.

_TRAIN_FIRST = ("Priya", "Tom", "Aiko", "Lars", "Fatima", "Diego", "Chen", "Olga", "Kwame", "Sofia", "Ravi",
                "Emma", "Hugo", "Nadia", "Pablo", "Greta", "Samir", "Hana", "Luca", "Zoe")
_TRAIN_LAST = ("Shah", "Becker", "Tanaka", "Nilsen", "Haddad", "Ruiz", "Wei", "Petrova", "Mensah", "Rossi", "Iyer",
               "Clark", "Dubois", "Kowalski", "Moreau", "Sato", "Costa", "Jensen", "Ahmed", "Brown")
_TRAIN_CITIES = ("Oslo", "Lisbon", "Nairobi", "Kyoto", "Denver", "Porto", "Lyon", "Tallinn", "Austin", "Perth",
                 "San Diego", "Buenos Aires", "Hamburg", "Seoul", "Accra", "Krakow", "Dublin", "Toronto", "Lima",
                 "New Delhi")
_HELDOUT_FIRST = ("Maya", "Jonas", "Yuki", "Ingrid", "Omar", "Lena", "Tariq", "Freya", "Mateo", "Anya")
_HELDOUT_LAST = ("Novak", "Silva", "Kim", "Okafor", "Meyer", "Larsen", "Rahman", "Fischer", "Garcia", "Ito")
_HELDOUT_CITIES = ("Quito", "Riga", "Dakar", "Osaka", "Boston", "Malmo", "Cape Town", "Hanoi", "Bologna",
                   "Salt Lake City")

#: Catalogue items: (singular, plural); several plurals are irregular.
_ITEMS = (("lamp", "lamps"), ("chair", "chairs"), ("mug", "mugs"), ("desk", "desks"), ("kettle", "kettles"),
          ("rug", "rugs"), ("box", "boxes"), ("shelf", "shelves"), ("bench", "benches"), ("knife", "knives"),
          ("battery", "batteries"), ("brush", "brushes"))
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
#: Quantities written as phrases (the phrase takes the plural noun, except "a").
_QUANTITY_PHRASES = {2: "a pair of", 6: "half a dozen", 12: "a dozen", 24: "two dozen"}

_TEMPLATES = (
    "Hi, this is {name}. Please send {goods} to {city}.",
    "{name} here: I'd like {goods} delivered to our office in {city}.",
    "Order from {name} ({city}): {goods}, please.",
    "Could you ship {goods} to {city}? Thanks, {name}",
    "We need {goods} in {city}. Regards, {name}",
    "Please deliver {goods} to the {city} store. - {name}",
    "Hello! {name} from {city} would like to order {goods}.",
    "Ship to: {city}. Contact: {name}. Items: {goods}.",
    "Can I get {goods} sent to {city}? My name is {name}.",
    "For our {city} branch we want {goods}. Signed, {name}",
)
_URGENT = ("It's urgent.", "This is urgent!", "Express delivery, please.", "We need them as soon as possible.",
           "Please rush this order.", "Urgent:")
_CALM = ("No rush.", "Standard shipping is fine.", "Whenever it suits you.", "There is no hurry.")

#: The ``heldout_templates`` split's own vocabulary: sentences, items and remarks that never occur in training.
_NEW_TEMPLATES = (
    "Good morning. Kindly dispatch {goods} to {city} on behalf of {name}.",
    "{city} office, attention {name}: we are short of {goods}.",
    "Requesting {goods}. Destination: {city}. Requester: {name}.",
    "My team in {city} has run out, so please post {goods}. Cheers, {name}",
    "Add {goods} to my account ({name}) and deliver them in {city}.",
    "Dear shop, {name} would appreciate {goods} at the {city} address.",
    "Purchase request - {name} - {goods} - to {city}",
    "I'm {name}; {goods} should go to {city}, thanks.",
)
_NEW_ITEMS = (("vase", "vases"), ("pillow", "pillows"), ("clock", "clocks"), ("glass", "glasses"),
              ("candle", "candles"), ("dish", "dishes"))
_NEW_URGENT = ("Time-critical, please hurry.", "We need them tomorrow at the latest.",
               "Please use your fastest shipping.", "High priority:")
_NEW_CALM = ("Slow shipping is fine.", "No deadline on this one.", "Take your time.", "Any delivery date works.")


@dataclass(frozen=True)
class Example:
    """One item of the data set.

    Attributes:
        id: ``"train-0001"`` / ``"heldout-0042"`` / ``"heldout_templates-0007"``.
        message: the customer's message (the user turn).
        answer: the expected JSON object: ``customer`` (str), ``item`` (str), ``quantity`` (int), ``city`` (str),
            ``express`` (bool), in that key order.
    """

    id: str
    message: str
    answer: dict

    @property
    def response(self) -> str:
        """The assistant's reply the model is trained to write: the answer as one line of JSON."""
        return json.dumps(self.answer)


def _quantity_text(rng: random.Random, quantity: int, singular: str, plural: str) -> str:
    """How the message writes ``quantity`` items: ``"7 mugs"``, ``"seven mugs"``, ``"a dozen mugs"``, ``"a mug"``."""
    if quantity == 1:
        return f"{rng.choice(('a', 'one', '1'))} {singular}"
    forms = [str(quantity)]
    if quantity <= len(_NUMBER_WORDS):
        forms.append(_NUMBER_WORDS[quantity - 1])
    if quantity in _QUANTITY_PHRASES:
        forms += [_QUANTITY_PHRASES[quantity]] * 2  # the phrases are the hard cases: show them more often
    return f"{rng.choice(forms)} {plural}"


def _make_example(rng: random.Random, split: str, index: int) -> Example:
    new_sentences = split == "heldout_templates"
    templates, items, urgent, calm = ((_NEW_TEMPLATES, _NEW_ITEMS, _NEW_URGENT, _NEW_CALM) if new_sentences
                                      else (_TEMPLATES, _ITEMS, _URGENT, _CALM))
    first, last, cities = ((_TRAIN_FIRST, _TRAIN_LAST, _TRAIN_CITIES) if split == "train"
                           else (_HELDOUT_FIRST, _HELDOUT_LAST, _HELDOUT_CITIES))
    name, city = f"{rng.choice(first)} {rng.choice(last)}", rng.choice(cities)
    singular, plural = rng.choice(items)
    quantity = rng.choice([*range(1, 21), *_QUANTITY_PHRASES])  # 1..20, and 2, 6, 12, 24 once more
    order = rng.choice(templates).format(name=name, city=city, goods=_quantity_text(rng, quantity, singular, plural))
    remark = rng.choice(("urgent", "calm", "none", "none"))
    express = remark == "urgent"
    if remark != "none":
        phrase = rng.choice(urgent if express else calm)
        if phrase.endswith(":") or rng.random() < 0.3:
            order = f"{phrase} {order}"
        else:  # after a signature ("Thanks, Chen Wei") the remark needs its own sentence
            order = f"{order}{'' if order.endswith(('.', '!', '?')) else '.'} {phrase}"
    answer = {"customer": name, "item": singular, "quantity": quantity, "city": city, "express": express}
    return Example(f"{split}-{index:04d}", order, answer)


def generate_dataset(seed: int = 0, n_train: int = 2000, n_heldout: int = 200) -> dict[str, list[Example]]:
    """Generate both splits deterministically (the same ``seed`` gives the same examples on every machine).

    Args:
        seed: seeds one ``random.Random`` per split (``seed`` for train, ``seed + 1`` for held-out).
        n_train, n_heldout: number of examples in each split.

    Returns:
        ``{"train": [...], "heldout": [...]}``, lists of :class:`Example`. Held-out names and cities never occur
        in the training split.
    """
    check_generate_dataset_args(seed, n_train, n_heldout)
    out = {}
    for offset, (split, n) in enumerate((("train", n_train), ("heldout", n_heldout))):
        rng = random.Random(seed + offset)
        out[split] = [_make_example(rng, split, i) for i in range(n)]
    return out


def generate_heldout_templates(seed: int = 0, n: int = 200) -> list[Example]:
    """The ``heldout_templates`` split: ``n`` examples written with the templates, items and remarks that never
    occur in training (``_NEW_TEMPLATES``, ``_NEW_ITEMS``, ``_NEW_URGENT``, ``_NEW_CALM``) and the held-out names
    and cities, from ``random.Random(seed + 2)`` (the other two splits use ``seed`` and ``seed + 1``: their files
    do not change). Ids ``"heldout_templates-0000"`` ...

    It tells a model that learned the task from one that learned the training sentences: the ``heldout`` split
    changes only the names and cities."""
    check_generate_dataset_args(seed, 1, n)
    rng = random.Random(seed + 2)
    return [_make_example(rng, "heldout_templates", i) for i in range(n)]


def write_dataset(directory: str | Path = DATA_DIR, *, seed: int = 0, n_train: int = 2000,
                  n_heldout: int = 200) -> dict[str, Path]:
    """Write ``orders_train.jsonl``, ``orders_heldout.jsonl`` and ``orders_heldout_templates.jsonl`` (one JSON
    object a line; the third split has ``n_heldout`` examples too) into ``directory``.

    Returns:
        ``{"train": path, "heldout": path, "heldout_templates": path}``.
    """
    directory = check_write_dataset_args(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    splits = generate_dataset(seed, n_train, n_heldout) | {
        "heldout_templates": generate_heldout_templates(seed, n_heldout)}
    for split, examples in splits.items():
        paths[split] = directory / f"orders_{split}.jsonl"
        lines = [json.dumps({"id": e.id, "message": e.message, "answer": e.answer}) for e in examples]
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def load_dataset(split: str, directory: str | Path = DATA_DIR) -> list[Example]:
    """Read one split (``"train"``, ``"heldout"`` or ``"heldout_templates"``) of the committed data set.

    Returns:
        a list of :class:`Example`, in file order.
    """
    split, directory = check_load_dataset_args(split, directory, SPLITS)
    path = directory / f"orders_{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Example(r["id"], r["message"], r["answer"]) for r in rows]


# ----------------------------------------------------------------------------------------------
# Prompt formatting with the chat template


def load_tokenizer(name_or_path: str | Path | None = None):
    """The base model's tokenizer alone (with its chat template), without loading the weights.

    ``None`` takes what :func:`qlora_edu.common.base_model.load_base_model` would load: ``$QLORA_EDU_MODEL`` if set,
    else the bundled SmolLM2 (converted once into the cache).
    """
    check_load_tokenizer_args(name_or_path)
    from transformers import AutoTokenizer

    from qlora_edu.common import settings
    from qlora_edu.common.base_model import prepare_cache

    source = name_or_path if name_or_path is not None else settings.model_override()
    if source is None:
        source = prepare_cache(progress=False)
    return AutoTokenizer.from_pretrained(str(source))


def build_messages(example: Example, with_response: bool = False) -> list[dict[str, str]]:
    """The chat for ``example``: the instruction as the system message, the order as the user message, and
    (``with_response=True``) the expected JSON as the assistant's message."""
    check_build_messages_args(example, with_response)
    messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": example.message}]
    if with_response:
        messages.append({"role": "assistant", "content": example.response})
    return messages


def _as_ids(encoded) -> list[int]:
    """``apply_chat_template(..., tokenize=True)`` returns a list, or a BatchEncoding in some versions."""
    ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
    return [int(i) for i in ids]


def encode_example(tokenizer, example: Example) -> tuple[list[int], int]:
    """Token ids of the whole chat, ending with the response's end token, and the prompt's length.

    The prompt is ``apply_chat_template(messages, add_generation_prompt=True)``: everything the model sees before
    it starts to answer. The full chat (with the assistant's message) must start with exactly those tokens; it
    is cut right after the end token that closes the reply (the template adds a newline after it, which the
    model never needs to produce).

    Args:
        tokenizer: a tokenizer with a chat template and an ``eos_token_id`` (SmolLM2: ``<|im_end|>``).
        example: an :class:`Example`.

    Returns:
        ``(input_ids, prompt_length)``: ``input_ids[:prompt_length]`` is the prompt,
        ``input_ids[prompt_length:]`` the response tokens and the end token.
    """
    check_encode_example_args(tokenizer, example)
    prompt = _as_ids(tokenizer.apply_chat_template(build_messages(example), add_generation_prompt=True,
                                                   tokenize=True))
    full = _as_ids(tokenizer.apply_chat_template(build_messages(example, with_response=True), tokenize=True))
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template tokenizes the prompt differently inside the full chat; "
                         "cannot tell where the response starts")
    eos = tokenizer.eos_token_id
    ends = [i for i in range(len(prompt), len(full)) if full[i] == eos]
    if not ends:
        raise ValueError(f"the full chat has no end token (id {eos}) after the prompt")
    return full[:ends[0] + 1], len(prompt)


def mask_prompt_labels(input_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for training on the responses only: the token ids, with ``-100`` on the prompt and the padding.

    Args:
        input_ids: ``(B, T)`` int64, right-padded: row ``b`` holds its tokens then padding.
        prompt_lengths: ``(B,)`` int64, the number of prompt tokens at the start of each row.
        attention_mask: ``(B, T)`` 0/1 (int64 or bool), 1 on real tokens, 0 on padding.

    Returns:
        ``(B, T)`` int64 labels on ``input_ids``' device: ``input_ids[b, t]`` where ``t >= prompt_lengths[b]``
        and ``attention_mask[b, t] == 1``, else ``-100``. Not shifted (the model shifts), ``input_ids`` unchanged.
    """
    check_mask_prompt_labels_args(input_ids, prompt_lengths, attention_mask)
    # BEGIN SOLUTION
    # Hint: a label is the token's own id, or -100 where the loss must ignore the position: the prompt (the
    # Hint: positions before its row's prompt length) and the padding (where the attention mask says so; not the
    # Hint: pad token's id: SmolLM2's pad token is also its end token, which must keep its label). One
    # Hint: vectorized expression over the whole batch, in a new tensor: input_ids stays as it was.
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    in_prompt = positions[None, :] < prompt_lengths[:, None]
    labels = input_ids.masked_fill(in_prompt | (attention_mask == 0), IGNORE_INDEX)
    # END SOLUTION
    return labels


def collate_examples(tokenizer, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """A right-padded training batch of ``examples``.

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each ``(B, T)`` int64 with ``T`` the longest example, and
        ``"prompt_lengths"`` ``(B,)``. Padding uses the tokenizer's pad token (its end token if it has none);
        ``labels`` come from :func:`mask_prompt_labels`.
    """
    check_collate_examples_args(tokenizer, examples)
    encoded = [encode_example(tokenizer, e) for e in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, _) in enumerate(encoded):  # one row a sequence: ragged lists, no per-element loop
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    prompt_lengths = torch.tensor([p for _, p in encoded], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_lengths": prompt_lengths,
            "labels": mask_prompt_labels(input_ids, prompt_lengths, attention_mask)}


# ----------------------------------------------------------------------------------------------
# Scoring


def parse_answer(text: str) -> dict | None:
    """The JSON object in a model's reply, or ``None`` when there is none.

    The whole reply is tried first; failing that, the first ``{`` up to each later ``}`` in turn (so a correct
    object inside prose or a code fence still counts). Only a JSON *object* counts.
    """
    check_parse_answer_args(text)
    candidates = [text.strip()]
    start = text.find("{")
    if start >= 0:
        candidates += [text[start:m.end()] for m in re.finditer("}", text) if m.start() > start]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _exactly_equal(got: object, expected: object) -> bool:
    """``==`` that also compares types: ``1 == True`` and ``6 == 6.0`` in Python, but not here."""
    if type(got) is not type(expected):
        return False
    if isinstance(expected, dict):
        return got.keys() == expected.keys() and all(_exactly_equal(got[k], expected[k]) for k in expected)
    return got == expected


def score_answers(replies: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """Exact-match correctness of each reply: its JSON object equals the example's answer, key for key, with the
    same types (``"quantity": "6"`` or ``6.0`` is wrong; key order does not matter).

    Returns:
        one bool a reply; ``sum(...) / len(...)`` is the score.
    """
    check_score_answers_args(replies, examples)
    return [(parsed := parse_answer(r)) is not None and _exactly_equal(parsed, e.answer)
            for r, e in zip(replies, examples, strict=True)]


def field_accuracy(replies: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
    """Where the errors are: the fraction of replies that parse to a JSON object (``"valid_json"``), and for each
    answer key the fraction whose value is exactly right (a reply that does not parse is wrong on every key)."""
    check_field_accuracy_args(replies, examples)
    parsed = [parse_answer(r) for r in replies]
    out = {"valid_json": sum(p is not None for p in parsed) / len(parsed)}
    for key in examples[0].answer:
        right = [p is not None and key in p and _exactly_equal(p[key], e.answer[key])
                 for p, e in zip(parsed, examples, strict=True)]
        out[key] = sum(right) / len(right)
    return out


def paired_bootstrap_interval(before: Sequence[bool], after: Sequence[bool], *, n_resamples: int = 10_000,
                              level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """The gain in score ``mean(after) - mean(before)`` on the same items, and a bootstrap interval for it.

    The two scores are paired (the same held-out items before and after training), so items are resampled
    together: ``n_resamples`` draws of ``n`` item indices with replacement, the gain on each, and the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles.

    Returns:
        ``(gain, low, high)``.
    """
    check_paired_bootstrap_args(before, after, n_resamples, level, seed)
    b = torch.tensor([bool(x) for x in before], dtype=torch.float64)
    a = torch.tensor([bool(x) for x in after], dtype=torch.float64)
    diff = a - b
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (n_resamples, len(diff)), generator=generator)
    gains = diff[idx].mean(dim=1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(gains, q).tolist()
    return float(diff.mean()), low, high


def sign_test_p_value(before: Sequence[bool], after: Sequence[bool]) -> float:
    """Two-sided exact McNemar (sign) test: the probability, if training changed nothing, of a split of the
    discordant items at least as lopsided as observed.

    Only items where the two disagree count: ``k`` fixed by training, ``m`` broken; under "no change" each is
    a fair coin, so ``p = min(1, 2 * P(Binomial(k + m, 1/2) <= min(k, m)))``.
    """
    check_sign_test_p_value_args(before, after)
    fixed = sum(1 for x, y in zip(before, after, strict=True) if y and not x)
    broken = sum(1 for x, y in zip(before, after, strict=True) if x and not y)
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
