"""Chapter 2's yardstick: how much does quantizing the weights hurt the model?

Perplexity of a causal language model on a text of tokens ``t_0 .. t_{N-1}``:

    PPL = exp( mean over predicted tokens of  -log p(t_i | t_<i) )

i.e. the exponential of the average cross-entropy. A model that always put probability 1 on the
right next token would score 1; one that guessed uniformly among V tokens would score V. Lower is
better, and the *difference* between fp32 and a quantized copy of the same weights is what the
chapter compares.

The text is long (~100k tokens), the model's context is not, so the token stream is cut into
windows of ``window`` tokens, started every ``stride`` tokens. With ``stride == window`` (the
default) the windows do not overlap: fastest, but the first tokens of each window are predicted
with little context, and each window's very first token is not predicted at all (nothing precedes
it inside the window). With ``stride < window`` each window re-reads ``window - stride`` tokens of
context and scores only the tokens not scored before, so every token after the first is scored
once: slower, and a little lower. Compare perplexities only across identical settings.

The text: :func:`reference_text`, CPython's own language-reference help topics, which ship with
every Python and were not written by us (so no model in this course was tuned on "our" text).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from qlora_edu.common.guards import check_int

__all__ = ["perplexity", "reference_text", "replace_linear_weights"]


def reference_text() -> str:
    """English text that ships with Python: the values of ``pydoc_data.topics.topics``, sorted by key.

    These are the help texts of ``help("if")``, ``help("NUMBERS")`` ... taken from the CPython
    language reference (~465k characters on Python 3.11), joined by blank lines. Deterministic for
    a given Python minor version; other versions ship slightly different topics, so a perplexity
    is comparable only on the same Python version.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some Linux distributions strip pydoc_data from their Python
        raise ModuleNotFoundError("reference_text() needs the standard-library module pydoc_data, which "
                                  "this Python installation lacks; pass your own text= instead") from err
    return "\n\n".join(topics[key] for key in sorted(topics))


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The evaluation windows over a stream of ``n_tokens`` tokens, as ``(begin, end, score_from)``.

    Window ``k`` feeds tokens ``[begin, end)`` to the model and scores the predictions of tokens
    ``[score_from, end)``: each window scores only what earlier windows did not, and never its own
    first token (nothing before it inside the window to predict it from). Windows that would score
    nothing are dropped.
    """
    out, begin, scored_until = [], 0, 1  # token 0 can never be predicted
    while True:
        end = min(begin + window, n_tokens)
        score_from = max(begin + 1, scored_until)
        if end > score_from:
            out.append((begin, end, score_from))
            scored_until = end
        if end == n_tokens:
            return out
        begin += stride


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def perplexity(model: nn.Module, tokenizer, text: str | None = None, *, max_tokens: int | None = None,
               window: int = 512, stride: int | None = None, batch_size: int = 4,
               progress: bool = True) -> float:
    """Perplexity of ``model`` on ``text`` (default :func:`reference_text`): exp(mean next-token NLL).

    Args:
        model: a causal LM: ``model(input_ids).logits`` has shape ``(batch, seq, vocab)``.
        tokenizer: its tokenizer; the text is encoded once, without special tokens (it is one
            continuous stream, not a chat turn).
        text: the text to score; ``None`` for :func:`reference_text`.
        max_tokens: use only the first ``max_tokens`` tokens (``None``: all, 113k tokens for SmolLM2
            on Python 3.11). Cost grows linearly: SmolLM2-135M in float32 on two CPU cores takes
            ~37 s for 16384 tokens, so 16384 keeps a 4-format comparison near 2.5 minutes.
        window: tokens fed to the model at once (>= 2, at most the model's context).
        stride: tokens between window starts, ``1 <= stride <= window``; ``None`` means ``window``
            (non-overlapping windows).
        batch_size: windows per forward pass. Only changes speed and memory (logits take
            ``batch_size * window * vocab * 4`` bytes: 400 MB for 4 x 512 x 49152).
        progress: show a tqdm bar over the windows.

    Returns:
        The perplexity as a Python float (>= 1). Deterministic: same model, text and settings give
        the same number.
    """
    from tqdm.auto import tqdm

    check_int("window", window, low=2)
    stride = window if stride is None else check_int("stride", stride, low=1, high=window)
    check_int("batch_size", batch_size, low=1)
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, low=2)
    if text is None:
        text = reference_text()
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")

    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"text must encode to at least 2 tokens to predict one, got {ids.numel()}")
    spans = windows(ids.numel(), window, stride)

    device = _model_device(model)
    was_training = model.training
    model.eval()  # no dropout: deterministic
    total_nll, total_count = 0.0, 0
    try:
        bar = tqdm(total=len(spans), desc="perplexity", unit="window", disable=not progress)
        with torch.no_grad(), bar:
            for first in range(0, len(spans), batch_size):
                batch = spans[first:first + batch_size]
                # Right-pad the (at most one) short last window: a causal model never looks right,
                # so padding changes no real token's prediction; its positions are masked below.
                length = max(end - begin for begin, end, _ in batch)
                inputs = torch.zeros(len(batch), length, dtype=torch.long)
                # scored[b, j] is True where position j's logits predict a token we count.
                scored = torch.zeros(len(batch), length - 1, dtype=torch.bool)
                for row, (begin, end, score_from) in enumerate(batch):
                    inputs[row, : end - begin] = ids[begin:end]
                    scored[row, score_from - begin - 1: end - begin - 1] = True
                inputs = inputs.to(device)
                logits = model(input_ids=inputs).logits.float()  # (B, T, vocab)
                # Position j predicts token j+1. Rolling the inputs left gives those targets (the last
                # column wraps around and is dropped): one flat cross-entropy, no copy of the logits.
                targets = torch.roll(inputs, -1, dims=1)
                nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
                nll = nll.view(len(batch), length)[:, :-1]  # (B, T-1), as scored
                mask = scored.to(nll.device)
                total_nll += float(nll[mask].double().sum())
                total_count += int(mask.sum())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_count)


def _output_weights(model: nn.Module) -> set[int]:
    """ids of the embedding/LM-head weight tensors, which chapter 2 keeps in full precision."""
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            found.add(id(module.weight))
    return found


def replace_linear_weights(model: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor], *,
                           include: Callable[[str], bool] = lambda name: True,
                           progress: bool = True) -> dict[str, dict]:
    """Apply ``transform(weight) -> weight`` to the linear layers of the decoder, in place.

    Which layers: every ``nn.Linear`` of the model except the LM head and anything sharing its
    weight with the token embedding (SmolLM2 ties the two), filtered by ``include(name)``. In a
    Llama-style model that is the seven projections of every decoder layer (q, k, v, o, gate, up,
    down). QLoRA quantizes exactly those and keeps embeddings, head and norms in 16 bits.

    Typical use: ``transform = lambda w: dequantize(quantize(w))`` simulates storing the model in a
    4-bit format and measures what it costs, with the model's ordinary float forward pass.

    Args:
        model: a torch model, e.g. from :func:`qlora_edu.common.base_model.load_base_model`.
        transform: maps a float weight ``(out_features, in_features)`` to a tensor of the same shape
            (any float dtype; it is cast back to the weight's dtype).
        include: picks layers by qualified name, e.g. ``lambda n: "mlp" in n``.
        progress: show a tqdm bar over the layers.

    Returns:
        ``{name: {"shape": (out, in), "mse": mean squared change of the weights}}`` in model order.
    """
    from tqdm.auto import tqdm

    if not callable(transform):
        raise TypeError(f"transform must be callable (weight -> weight), got {type(transform).__name__}")
    if not callable(include):
        raise TypeError(f"include must be callable (name -> bool), got {type(include).__name__}")
    skip = _output_weights(model)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and id(module.weight) not in skip and include(name)]
    stats = {}
    with torch.no_grad():
        for name, module in tqdm(targets, desc="replacing weights", unit="layer", disable=not progress):
            weight = module.weight
            if not weight.dtype.is_floating_point:  # e.g. bitsandbytes' packed uint8 Linear4bit weights
                raise TypeError(f"layer {name} holds a {weight.dtype} weight (already quantized?); "
                                "replace_linear_weights needs a model loaded in float32/bf16/fp16")
            new = transform(weight.detach().clone())
            if not isinstance(new, torch.Tensor) or new.shape != weight.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError("transform must return a tensor of the weight's shape "
                                 f"{tuple(weight.shape)} (layer {name}), got {got}")
            new = new.to(device=weight.device, dtype=weight.dtype)
            mse = float((new.float() - weight.float()).pow(2).mean())
            weight.copy_(new)
            stats[name] = {"shape": tuple(weight.shape), "mse": mse}
    return stats
