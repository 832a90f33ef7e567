"""Non-plot logic behind the extraction and compression notebooks (01, 02), reachable from tests.

Shapes follow :mod:`kava_lab.teacher` and :mod:`kava_lab.compress`: an extraction holds
``cot_keys/cot_values [B, L, H_kv, N, d]``, ``cot_mask [B, N]``, ``answer_logits [B, L, H_q, A, N]`` and
``answer_mask [B, A]``; a :class:`~kava_lab.compress.Compressed` holds ``indices/slot_mask [B, L, H_kv, M]``.

What is here:

- (re-exported for the notebooks) what to run on, from :mod:`kava_lab.sources`, and batched extraction
  (:func:`extract_many`), from :mod:`kava_lab.teacher`;
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
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .encoding import Encoded, EncodingConfig, encode
from .scores import attention_mass
from .teacher import extract_many, merge_outputs  # noqa: F401  (batched extraction lives with the teacher)
from .sources import (SMALL_ENV, SourceChoice, load_notebook_backbone, paired_problems, pick_default_source,  # noqa: F401
                      pick_example, resolve_source, small_mode)

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
    return attention_mass(x, cot_mask.bool(), answer_mask.bool())  # the same last step as importance_scores


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


def write_figures(figures: Mapping[str, Any], out_dir: str | Path, plotlyjs: str = "shared") -> list[Path]:
    """Write plotly figures as ``<name>.html`` into ``out_dir`` (created). Returns the paths written.

    ``plotlyjs="shared"`` (default): one ``plotly.min.js`` in the parent of ``out_dir`` (written once, e.g.
    ``runs/lab/plotly.min.js`` for every notebook of a ``make lab`` run), referenced as ``../plotly.min.js``, so
    figure folders stay small and open offline side by side; ``"directory"``: a copy in ``out_dir`` itself
    (a self-contained folder); ``"inline"``: the library inside every HTML file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if plotlyjs == "shared":
        js = out.parent / "plotly.min.js"
        if not js.is_file():
            from plotly.offline import get_plotlyjs

            tmp = js.with_suffix(".tmp")
            tmp.write_text(get_plotlyjs(), encoding="utf-8")
            tmp.replace(js)  # never a half-written library beside finished figures
        include: str | bool = "../plotly.min.js"
    elif plotlyjs in ("directory", "inline"):
        include = "directory" if plotlyjs == "directory" else True
    else:
        raise ValueError(f"plotlyjs must be 'shared', 'directory' or 'inline', found {plotlyjs!r}")
    paths = []
    for name, fig in figures.items():
        path = out / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs=include, full_html=True)
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
