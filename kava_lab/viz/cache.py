"""Figures of notebooks 01 and 02: the teacher's trace and KV cache, and what compression keeps."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
import torch

from .. import analysis as A
from .common import (CATEGORY_COLORS, SPAN_COLORS, _cot_labels, _empty, _layer_rows, _row_labels, _rows_height,
                     _token_axis, token_label)


# --------------------------------------------------------------------------------------------------------
# notebook 01: the teacher's trace and cache


def trace_tokens_table(tokenizer, encoded, max_rows: int | None = None, title: str | None = None) -> go.Figure:
    """The teacher sequence of one example token by token (position, span, token text, id), coloured by
    span: question, CoT (drop-last applied), answer prompt, answer (ending with eos)."""
    rows = A.trace_rows(tokenizer, encoded)
    if max_rows is not None:
        rows = rows[:max_rows]
    colors = [SPAN_COLORS[r["span"]] for r in rows]
    fig = go.Figure(go.Table(
        columnwidth=[40, 70, 160, 60],
        header=dict(values=["pos", "span", "token", "id"], fill_color="#d0d7e2", align="left"),
        cells=dict(values=[[r["pos"] for r in rows], [r["span"] for r in rows],
                           [repr(r["text"])[1:-1] for r in rows], [r["id"] for r in rows]],
                   fill_color=[colors] * 4, align="left", height=22),
    ))
    counts = {s: sum(r["span"] == s for r in rows) for s in SPAN_COLORS}
    fig.update_layout(
        title=title or ("Teacher trace token by token: " + ", ".join(f"{s} {c}" for s, c in counts.items())),
        height=min(700, 120 + 22 * len(rows)), margin=dict(l=10, r=10, t=50, b=10))
    return fig


def kv_norm_heatmap(ext, example: int = 0, layer: int | None = None, kind: str = "key", tokenizer=None,
                    title: str | None = None) -> go.Figure:
    """L2 norm of the cached key (``kind="key"``) or value of every CoT token, per layer and KV head.

    Rows are ``L{layer} h{kv head}`` (all layers when ``layer`` is None, else that layer's heads), columns
    the example's CoT tokens with their text on the axis."""
    norms = A.kv_norms(ext, example, kind)  # [L, H, n]
    n_layers, n_heads, n = norms.shape
    if n == 0:
        return _empty(title or f"{kind} norms", f"example {example} has no CoT tokens")
    z = _layer_rows(norms, layer)
    rows = _row_labels(n_layers, n_heads, layer)
    labels = _cot_labels(ext, example, tokenizer)
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=list(range(n)), y=list(range(len(rows))), colorscale="Viridis",
        colorbar=dict(title=f"‖{kind[0]}‖"),
        text=[labels] * len(rows), customdata=[[r] * n for r in rows],
        hovertemplate="%{customdata}<br>token %{x}: %{text}<br>norm %{z:.3g}<extra></extra>",
    ))
    _token_axis(fig, labels)
    fig.update_yaxes(tickmode="array", tickvals=list(range(0, len(rows), max(1, len(rows) // 40))),
                     ticktext=[rows[i] for i in range(0, len(rows), max(1, len(rows) // 40))],
                     autorange="reversed", title="layer / KV head")
    where = "all layers" if layer is None else f"layer {layer}"
    fig.update_layout(title=title or f"{kind.capitalize()} norms over the CoT, example {example}, {where}",
                      height=_rows_height(len(rows)))
    return fig


def attention_map(ext, example: int = 0, layer: int = 0, head: int = 0, tokenizer=None, encoded=None,
                  kept: Sequence[int] | torch.Tensor | None = None, title: str | None = None) -> go.Figure:
    """Attention of each answer-span token (answer prompt, answer, eos) on the CoT tokens for one layer
    and query head, softmax over the CoT only (so each row sums to 1: the share of CoT attention).

    ``encoded`` (the example's :class:`~kava_lab.encoding.Encoded`) labels the rows with token text;
    ``kept``: CoT positions a compressor kept, marked with triangles above the map."""
    probs = A.answer_attention(ext, example, layer, head)  # [A, n]
    a, n = probs.shape
    if n == 0 or a == 0:
        return _empty(title or "answer → CoT attention", f"example {example} has no CoT or answer tokens")
    labels = _cot_labels(ext, example, tokenizer)
    if encoded is not None and tokenizer is not None:
        rows = [token_label(t) for t in A.token_texts(tokenizer, list(encoded.prompt) + list(encoded.answer))][:a]
    else:
        rows = [f"a{j}" for j in range(a)]
    fig = go.Figure(go.Heatmap(
        z=probs.tolist(), x=list(range(n)), y=list(range(a)), colorscale="Blues", zmin=0, zmax=1,
        colorbar=dict(title="share of CoT attention"),  # fixed 0-1: near-uniform attention stays pale text=[labels] * a, customdata=[[r] * n for r in rows],
        hovertemplate="answer token %{customdata}<br>CoT token %{x}: %{text}<br>p = %{z:.3f}<extra></extra>",
    ))
    if kept is not None:
        kept = [int(i) for i in (kept.tolist() if isinstance(kept, torch.Tensor) else kept)]
        fig.add_trace(go.Scatter(x=kept, y=[-0.9] * len(kept), mode="markers", name="kept",
                                 marker=dict(symbol="triangle-down", size=9, color="#d62728"),
                                 hovertemplate="kept CoT token %{x}<extra></extra>"))
        fig.update_layout(showlegend=False)
    _token_axis(fig, labels)
    fig.update_yaxes(tickmode="array", tickvals=list(range(a)), ticktext=rows, autorange="reversed",
                     title="answer span")
    h_q, h_kv = ext.answer_logits.shape[2], ext.cot_keys.shape[2]
    fig.update_layout(
        title=title or (f"Answer → CoT attention, example {example}, layer {layer}, query head {head} "
                        f"(KV head {head // (h_q // h_kv)})"),
        height=max(300, 160 + 22 * a))
    return fig


def cache_size_bar(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> go.Figure:
    """Per example: bytes of the CoT K/V cache against the bytes of M latent slots
    (rows from :func:`kava_lab.analysis.cache_size_rows`)."""
    if not rows:
        return _empty(title or "cache size", "no examples")
    ex = [f"ex {r['example']}" for r in rows]
    m = rows[0]["latent_slots"]
    fig = go.Figure([
        go.Bar(x=ex, y=[r["cot_bytes"] for r in rows], name="CoT cache",
               customdata=[[r["cot_tokens"], A.format_bytes(r["cot_bytes"]), r["ratio"]] for r in rows],
               hovertemplate="%{x}: %{customdata[0]} CoT tokens<br>%{customdata[1]} "
                             "(%{customdata[2]:.2f}× the latent cache)<extra></extra>"),
        go.Bar(x=ex, y=[r["latent_bytes"] for r in rows], name=f"{m} latent slots",
               hovertemplate=f"{m} latent slots: {A.format_bytes(rows[0]['latent_bytes'])}<extra></extra>"),
    ])
    fig.update_layout(barmode="group", yaxis_title="bytes (K and V, all layers and KV heads)",
                      title=title or f"CoT KV cache vs {m} latent slots, per example", height=380)
    return fig


# --------------------------------------------------------------------------------------------------------
# notebook 02: what compression keeps


def kept_tokens_heatmap(comp, ext, example: int = 0, tokenizer=None, layer: int | None = None,
                        method: str = "", title: str | None = None) -> go.Figure:
    """Which CoT tokens each layer / KV head keeps (1 = kept) for one example: rows ``L{layer} h{head}``,
    columns the CoT tokens with their text. The hover shows the compressor's score when it was kept."""
    n = int(ext.cot_mask[example].sum())
    if n == 0:
        return _empty(title or "kept tokens", f"example {example} has no CoT tokens")
    mem = A.membership(comp, n)[example].float()  # [L, H, n]
    n_layers, n_heads, _ = mem.shape
    z = _layer_rows(mem, layer)
    rows = _row_labels(n_layers, n_heads, layer)
    labels = _cot_labels(ext, example, tokenizer)
    custom = [[r] * n for r in rows]
    hover = "%{customdata}<br>token %{x}: %{text}<br>kept %{z:.0f}"
    if comp.scores is not None:
        sc = _layer_rows(comp.scores[example, :, :, :n].float(), layer)
        custom = [[[r, f"{float(s):.3g}"] for s in srow] for r, srow in zip(rows, sc)]
        hover = "%{customdata[0]}<br>token %{x}: %{text}<br>kept %{z:.0f}, score %{customdata[1]}"
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=list(range(n)), y=list(range(len(rows))), zmin=0, zmax=1,
        colorscale=[[0, "#f2f2f2"], [1, "#08519c"]], showscale=False, text=[labels] * len(rows),
        customdata=custom, hovertemplate=hover + "<extra></extra>",
    ))
    _token_axis(fig, labels)
    step = max(1, len(rows) // 40)
    fig.update_yaxes(tickmode="array", tickvals=list(range(0, len(rows), step)),
                     ticktext=[rows[i] for i in range(0, len(rows), step)], autorange="reversed",
                     title="layer / KV head")
    m = comp.indices.shape[-1]
    where = "all layers" if layer is None else f"layer {layer}"
    fig.update_layout(title=title or f"Kept CoT tokens ({method or 'method'}, M={m}), example {example}, "
                                     f"{where}: {n} CoT tokens", height=_rows_height(len(rows)))
    return fig


def keep_frequency_heatmap(comps: Mapping[str, Any], ext, example: int = 0, tokenizer=None,
                           title: str | None = None) -> go.Figure:
    """For each method (row) and CoT token (column) of one example, the share of (layer, KV head) pairs
    that keep the token: where the methods agree and where they differ."""
    n = int(ext.cot_mask[example].sum())
    if n == 0 or not comps:
        return _empty(title or "keep frequency", f"example {example} has no CoT tokens")
    names = list(comps)
    z = [A.keep_frequency(comps[k], example, n).tolist() for k in names]
    labels = _cot_labels(ext, example, tokenizer)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n)), y=names, zmin=0, zmax=1, colorscale="Blues",
        colorbar=dict(title="share of<br>heads"), text=[labels] * len(names),
        hovertemplate="%{y}<br>token %{x}: %{text}<br>kept by %{z:.0%} of layer-heads<extra></extra>",
    ))
    _token_axis(fig, labels)
    fig.update_yaxes(autorange="reversed", title="method")
    m = next(iter(comps.values())).indices.shape[-1]
    fig.update_layout(title=title or f"Share of layer/heads keeping each CoT token, M={m}, example {example}",
                      height=max(280, 200 + 30 * len(names)))
    return fig


def method_overlap(names: Sequence[str], matrix, title: str | None = None) -> go.Figure:
    """Mean Jaccard overlap of the methods' kept sets (from :func:`kava_lab.analysis.overlap_matrix`)."""
    z = matrix.tolist() if hasattr(matrix, "tolist") else [list(r) for r in matrix]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(names), y=list(names), zmin=0, zmax=1, colorscale="Purples", texttemplate="%{z:.2f}",
        colorbar=dict(title="Jaccard"), hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_xaxes(automargin=True)
    # the title used to run past a 420 px wide figure and was clipped: two short lines, room above the plot
    fig.update_layout(title=dict(text=title or "Overlap of kept sets<br><sup>mean Jaccard over examples, layers, "
                                 "heads</sup>", x=0.02, xanchor="left"), margin=dict(t=90),
                      height=max(360, 180 + 45 * len(names)), width=max(560, 240 + 60 * len(names)))
    return fig


def category_shares_bar(shares: Mapping[str, Mapping[str, float]], title: str | None = None) -> go.Figure:
    """Stacked bars: for each label (e.g. ``"nl · rkv"``, ``"nl · all CoT tokens"``) the share of tokens
    per category (from :func:`kava_lab.analysis.category_shares`)."""
    labels = list(shares)
    fig = go.Figure([
        go.Bar(y=labels, x=[shares[l].get(c, 0.0) for l in labels], name=c, orientation="h",
               marker_color=CATEGORY_COLORS.get(c), hovertemplate="%{y}<br>" + c + ": %{x:.1%}<extra></extra>")
        for c in A.CATEGORIES
    ])
    fig.update_layout(barmode="stack", xaxis=dict(title="share of tokens", tickformat=".0%", range=[0, 1]),
                      yaxis=dict(autorange="reversed"), legend_title="category",
                      title=title or "What kind of tokens are kept", height=max(300, 120 + 26 * len(labels)))
    return fig


def cot_length_histogram(lengths: Mapping[str, Sequence[int]], M: int, title: str | None = None) -> go.Figure:
    """Distribution of teacher CoT lengths (tokens, after drop-last) per trace view, with the latent
    budget M marked: everything left of the line leaves latent slots unused."""
    fig = go.Figure()
    for name, ls in lengths.items():
        ls = list(ls)
        short = sum(x < M for x in ls) / len(ls) if ls else 0.0
        fig.add_trace(go.Histogram(x=ls, name=f"{name} ({short:.0%} < M)", opacity=0.6, nbinsx=40))
    fig.add_vline(x=M, line_dash="dash", line_color="black", annotation_text=f"M = {M}",
                  annotation_position="top right")
    fig.update_layout(barmode="overlay", xaxis_title="CoT tokens", yaxis_title="problems",
                      title=title or f"CoT length vs M = {M}", height=380)
    return fig


def retained_attention_bar(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], stat: str = "mean",
                           title: str | None = None) -> go.Figure:
    """Grouped bars: per method (x) and group (colour, e.g. trace view), the share of the answer span's
    attention mass over the CoT that the kept set retains (``stat`` of
    :func:`kava_lab.analysis.retained_summary`: ``"mean"`` or ``"mean_long"``). The hover adds the share
    of tokens kept (what a random choice would retain on average)."""
    fig = go.Figure()
    for group, summary in summaries.items():
        methods = list(summary)
        kept = "kept_fraction_long" if stat == "mean_long" else "kept_fraction"
        fig.add_trace(go.Bar(x=methods, y=[summary[m][stat] for m in methods], name=str(group),
                             customdata=[summary[m].get(kept, float("nan")) for m in methods],
                             hovertemplate="%{x}: %{y:.1%} of attention kept<br>"
                                           "%{customdata:.1%} of tokens kept<extra>" + str(group) + "</extra>"))
    fig.update_layout(barmode="group", yaxis=dict(title="attention mass retained", tickformat=".0%", range=[0, 1]),
                      title=title or "Share of the answer span's CoT attention held by the kept set",
                      height=380, legend_title="")
    return fig


def retained_by_layer(summary: Mapping[str, Mapping[str, Any]], title: str | None = None) -> go.Figure:
    """Per layer, the retained attention share of each method (mean over examples and heads)."""
    fig = go.Figure()
    for method, s in summary.items():
        fig.add_trace(go.Scatter(y=s["per_layer"], x=list(range(len(s["per_layer"]))), mode="lines+markers",
                                 name=method))
    # values often differ only in the first decimal of a percent (e.g. 70.4% vs 70.9%): ".0%" ticks all read
    # "70%"/"71%", so ticks and hover carry one decimal
    for trace in fig.data:
        trace.hovertemplate = "layer %{x}: %{y:.2%}<extra>%{fullData.name}</extra>"
    fig.update_layout(xaxis=dict(title="layer", dtick=1),
                      yaxis=dict(title="attention mass retained", tickformat=".1%"),
                      title=title or "Retained answer→CoT attention per layer", height=360)
    return fig
