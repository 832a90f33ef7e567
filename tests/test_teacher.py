import pytest
import torch

from kava_lab.backbone import forward_cached
from kava_lab.encoding import Collator, encode
from kava_lab.synthetic import make_synthetic
from kava_lab.teacher import TeacherOutput, capture_queries, extract_teacher


@pytest.fixture(scope="module")
def batch_and_items(family_backbone):
    b = family_backbone
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl")]
    return b, items, Collator.for_backbone(b)(items, "teacher")


def test_shapes_and_masks(batch_and_items):
    b, items, batch = batch_and_items
    out = extract_teacher(b.model, batch)
    c = b.config
    L, Hkv, d = b.num_layers, b.num_kv_heads, b.head_dim
    Hq = c.num_attention_heads
    N = max(len(it.cot) for it in items)
    A = max(len(it.prompt) + len(it.answer) for it in items)
    assert out.cot_keys.shape == out.cot_values.shape == (4, L, Hkv, N, d)
    assert out.cot_mask.tolist() == [[j < len(it.cot) for j in range(N)] for it in items]
    assert out.answer_queries.shape == (4, L, Hq, A, d)
    assert out.answer_logits.shape == (4, L, Hq, A, N)
    assert out.anchor_hidden.shape == (4, L, c.hidden_size)
    assert not out.cot_keys.requires_grad and torch.isfinite(out.cot_keys).all()
    assert out.ce.ndim == 0 and torch.isfinite(out.ce)
    # the CoT span ids are the CoT tokens
    assert out.cot_ids[0, :len(items[0].cot)].tolist() == list(items[0].cot)
    assert b.config._attn_implementation != "kava_capture"  # restored after the context


def test_cache_keys_match_cache(batch_and_items):
    b, items, batch = batch_and_items
    out = extract_teacher(b.model, batch)
    with torch.no_grad():
        _, ref = forward_cached(b.model, None, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids)
    k0 = ref.layers[0].keys[:, :, batch.P:batch.P + out.cot_keys.shape[3]]
    torch.testing.assert_close(out.cot_keys[:, 0], k0)


def test_padding_invariance(batch_and_items):
    b, items, batch = batch_and_items
    out = extract_teacher(b.model, batch)
    collate = Collator.for_backbone(b)
    for i, it in enumerate(items):
        one = extract_teacher(b.model, collate([it], "teacher"))
        n, a = len(it.cot), len(it.prompt) + len(it.answer)
        torch.testing.assert_close(one.cot_keys[0, ..., :n, :], out.cot_keys[i, ..., :n, :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one.cot_values[0, ..., :n, :], out.cot_values[i, ..., :n, :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one.answer_logits[0, ..., :a, :n], out.answer_logits[i, ..., :a, :n],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(one.anchor_hidden[0], out.anchor_hidden[i], atol=1e-4, rtol=1e-4)


def test_logits_match_eager_attention(batch_and_items):
    """Captured queries reproduce the model's own attention: softmax of our logits over all keys = eager probs."""
    b, items, batch = batch_and_items
    model = b.model
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad(), capture_queries(model) as q:
            out, cache = forward_cached(model, None, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                        position_ids=batch.position_ids, output_attentions=True)
    finally:
        model.config._attn_implementation = previous
    keys = cache.layers[0].keys
    rep = q[0].shape[1] // keys.shape[1]
    logits = q[0] @ keys.repeat_interleave(rep, 1).transpose(-1, -2) * q["scaling"]
    S = logits.shape[-1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    allowed = causal[None, None] & batch.attention_mask.bool()[:, None, None, :]
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    i = 0
    rows = slice(int(batch.P), int(batch.answer_end[i]))
    torch.testing.assert_close(probs[i, :, rows], out.attentions[0][i, :, rows], atol=1e-5, rtol=1e-4)


def test_save_and_reload(batch_and_items, tmp_path):
    b, items, batch = batch_and_items
    out = extract_teacher(b.model, batch)
    out.save(tmp_path / "ext.safetensors")
    back = TeacherOutput.load(tmp_path / "ext.safetensors")
    for name in TeacherOutput._SAVED:
        assert torch.equal(getattr(back, name), getattr(out, name)), name
    assert back.nbytes() == out.nbytes() > 0


def test_with_grad_gives_trainable_ce(tiny_backbone):
    b = tiny_backbone
    items = [encode(e, b.tokenizer) for e in make_synthetic(2)]
    batch = Collator.for_backbone(b)(items, "teacher")
    out = extract_teacher(b.model, batch, with_grad=True)
    out.ce.backward()
    assert b.model.get_input_embeddings().weight.grad is not None
    assert not out.cot_keys.requires_grad
    b.model.zero_grad()
