"""qlora_edu.common.perplexity on tiny models: the number's meaning, windows, determinism, weight replacement."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from qlora_edu.common.perplexity import perplexity, reference_text, replace_linear_weights, windows

WORDS = ["<unk>", "a", "b", "c", "d", "e", "f", "g", "h"]
TEXT = " ".join(WORDS[1:] * 40)  # a b c ... h a b c ...: 320 tokens, each determined by the previous one


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


class BigramModel(nn.Module):
    """Logits that depend only on the current token: ``confidence`` on the next letter of the cycle.

    confidence 0 gives uniform logits (perplexity = vocab size exactly); a large one, the right answer.
    """

    def __init__(self, confidence: float):
        super().__init__()
        vocab = len(WORDS)
        table = torch.zeros(vocab, vocab)
        for i in range(1, vocab):
            table[i, i % (vocab - 1) + 1] = confidence  # a->b, ..., h->a
        self.table = nn.Parameter(table)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_reference_text_is_long_deterministic_english():
    text = reference_text()
    assert text == reference_text()
    assert len(text) > 300_000
    assert "The \"if\" statement is used for conditional execution" in text


def test_non_overlapping_windows_skip_only_each_window_start():
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert windows(9, 4, 4) == [(0, 4, 1), (4, 8, 5)]  # window [8, 9) would predict nothing


def test_strided_windows_score_every_token_after_the_first_once():
    for n, window, stride in [(10, 4, 2), (10, 4, 3), (7, 7, 1), (5, 8, 3), (100, 16, 5), (100, 16, 15)]:
        spans = windows(n, window, stride)
        scored = [t for begin, end, score_from in spans for t in range(score_from, end)]
        assert scored == list(range(1, n)), (n, window, stride)
        assert all(end - begin <= window and begin < score_from for begin, end, score_from in spans)


def test_random_model_perplexity_is_finite_and_above_one(tok):
    ppl = perplexity(tiny_llama(), tok, TEXT, window=64, progress=False)
    assert math.isfinite(ppl) and ppl > 1


def test_uniform_model_scores_vocab_size(tok):
    ppl = perplexity(BigramModel(0.0), tok, TEXT, window=32, progress=False)
    assert ppl == pytest.approx(len(WORDS), rel=1e-6)


def test_model_favouring_the_right_token_scores_lower(tok):
    ppls = [perplexity(BigramModel(c), tok, TEXT, window=32, progress=False) for c in (0.0, 2.0, 20.0)]
    assert ppls[0] > ppls[1] > ppls[2]
    assert ppls[2] == pytest.approx(1.0, abs=1e-6)


def test_settings_that_only_change_speed_do_not_change_the_result(tok):
    model = tiny_llama()
    ref = perplexity(model, tok, TEXT, window=64, batch_size=1, progress=False)
    batched = perplexity(model, tok, TEXT, window=64, batch_size=3, progress=False)
    assert batched == pytest.approx(ref, rel=1e-5)
    assert perplexity(model, tok, TEXT, window=64, batch_size=1, progress=False) == ref  # deterministic


def test_bigram_model_ignores_window_and_stride(tok):
    # Every prediction of this model has the same loss, so any set of scored tokens averages the same.
    model = BigramModel(2.0)
    ref = perplexity(model, tok, TEXT, window=32, progress=False)
    for window, stride in [(7, None), (32, 5), (320, 100)]:
        ppl = perplexity(model, tok, TEXT, window=window, stride=stride, progress=False)
        assert ppl == pytest.approx(ref)


def test_max_tokens_caps_the_text(tok):
    model = tiny_llama()
    head = " ".join(TEXT.split()[:50])
    assert perplexity(model, tok, TEXT, max_tokens=50, window=64, progress=False) == pytest.approx(
        perplexity(model, tok, head, window=64, progress=False), rel=1e-6)


def test_model_mode_is_restored(tok):
    model = tiny_llama().train()
    perplexity(model, tok, TEXT, window=64, progress=False)
    assert model.training


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 1}, "window"),
    ({"stride": 0}, "stride"),
    ({"window": 8, "stride": 9}, "stride"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_tokens": 1}, "max_tokens"),
])
def test_bad_arguments_are_named(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(BigramModel(1.0), tok, TEXT, progress=False, **kwargs)


def test_text_too_short(tok):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(BigramModel(1.0), tok, "a", progress=False)
    with pytest.raises(TypeError, match="text must be a str"):
        perplexity(BigramModel(1.0), tok, ["a", "b"], progress=False)


# ----- replace_linear_weights


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5]])).logits


def test_identity_changes_nothing_and_reports_every_decoder_projection():
    model = tiny_llama()
    before = logits(model)
    stats = replace_linear_weights(model, lambda w: w, progress=False)
    assert torch.equal(logits(model), before)
    assert len(stats) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert "lm_head" not in stats and all(".layers." in name for name in stats)
    assert stats["model.layers.0.self_attn.k_proj"]["shape"] == (16, 32)  # 2 KV heads x head_dim 8
    assert all(s["mse"] == 0.0 for s in stats.values())


def test_zeroing_changes_outputs_but_not_embeddings():
    model = tiny_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    before = logits(model)
    stats = replace_linear_weights(model, torch.zeros_like, progress=False)
    assert not torch.allclose(logits(model), before)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(model.lm_head.weight, embedding)  # tied head untouched too
    assert all(torch.count_nonzero(m.weight) == 0 for n, m in model.named_modules() if n in stats)
    assert all(s["mse"] > 0 for s in stats.values())


def test_mse_is_the_mean_squared_change():
    model = tiny_llama()
    w = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    stats = replace_linear_weights(model, lambda x: x + 0.5, include=lambda n: n.endswith("down_proj"),
                                   progress=False)
    assert list(stats) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert stats["model.layers.1.mlp.down_proj"]["mse"] == pytest.approx(0.25)
    assert torch.allclose(model.model.layers[1].mlp.down_proj.weight, w + 0.5)


def test_untied_lm_head_is_also_skipped():
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    stats = replace_linear_weights(model, lambda w: w, progress=False)
    assert "lm_head" not in stats and len(stats) == 14


def test_transform_must_keep_the_shape():
    with pytest.raises(ValueError, match="shape"):
        replace_linear_weights(tiny_llama(), lambda w: w.flatten(), progress=False)
    with pytest.raises(TypeError, match="transform"):
        replace_linear_weights(tiny_llama(), "nf4", progress=False)
