"""Plotly figures for the notebooks. Every function returns a ``plotly.graph_objects.Figure`` and does no
I/O (write figures with :func:`kava_lab.analysis.write_figures`); the numbers behind them come from
:mod:`kava_lab.analysis`.

Token axes use positions ``0..n-1`` with the token text as tick labels (repeated tokens stay distinct),
and the token text in the hover box. Pass ``tokenizer=`` to get text; without it ids are shown.

:func:`setup_renderer` picks a renderer that shows figures live in JupyterLab and also embeds them in
a notebook executed headless by papermill or nbmake, so the saved ``.ipynb`` shows them without re-running.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
import torch

from . import analysis as A

__all__ = [
    "setup_renderer",
    "show_live",
    "live_controls",
    "token_label",
    "trace_tokens_table",
    "kv_norm_heatmap",
    "attention_map",
    "kept_tokens_heatmap",
    "keep_frequency_heatmap",
    "method_overlap",
    "category_shares_bar",
    "cot_length_histogram",
    "retained_attention_bar",
    "retained_by_layer",
    "cache_size_bar",
]

RENDERER_ENV = "KAVA_LAB_PLOTLY_RENDERER"
DEFAULT_RENDERER = "plotly_mimetype+notebook"
SPAN_COLORS = {"question": "#e8eef7", "cot": "#fde9c9", "prompt": "#dff2e1", "answer": "#f6d5d5"}
CATEGORY_COLORS = {"digit": "#1f77b4", "operator": "#d62728", "punct": "#bcbd22", "space": "#c7c7c7",
                   "filler": "#9467bd", "content": "#2ca02c"}


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and hasattr(ip, "kernel")


def setup_renderer(renderer: str | None = None) -> str:
    """Set plotly's default renderer and return its name.

    In a Jupyter kernel the default is ``"plotly_mimetype+notebook"``: JupyterLab draws the
    ``application/vnd.plotly.v1+json`` output natively, and the HTML part (plotly.js embedded once per
    notebook) keeps the figures visible in an ``.ipynb`` executed headless by papermill/nbmake and opened
    anywhere, with no re-run and no internet. Override with ``renderer=`` or ``$KAVA_LAB_PLOTLY_RENDERER``
    (e.g. ``"notebook_connected"`` for smaller files, ``"browser"`` from a script). Outside a kernel the
    current default is kept unless one is given.
    """
    import plotly.io as pio

    chosen = renderer or os.environ.get(RENDERER_ENV)
    if not chosen:
        if not _in_kernel():
            return pio.renderers.default
        chosen = DEFAULT_RENDERER
    pio.renderers.default = chosen
    return chosen


def show_live(fig: go.Figure) -> None:
    """Show a figure from inside an ipywidgets callback (``interactive_output``): plotly's JSON mimetype
    only, which JupyterLab, Notebook 7 and VS Code draw natively.

    The HTML renderers are avoided there on purpose: when papermill/nbmake (nbclient) execute a notebook
    headless, a large HTML output inside an ``Output`` widget makes nbclient stall echoing the widget's
    state back to the kernel (observed with nbclient 0.11 and a 90x90 heatmap). Render the static figure
    with ``fig.show()`` outside the widget so the executed notebook still shows it, and build the controls
    with :func:`live_controls`.
    """
    fig.show(renderer="plotly_mimetype")


def live_controls(fn, controls: Mapping[str, Any], rows: Sequence[Sequence[str]] | None = None):
    """ipywidgets controls that call ``fn(**values)`` whenever a value changes, and its output area.

    Built on ``widgets.interactive_output``, except that the initial call is skipped: the notebook shows
    the default figures statically right above, and a headless run (papermill, nbmake) then produces no
    output inside the widget at all (nbclient can stall on large outputs there, see :func:`show_live`).
    ``fn`` should draw with :func:`show_live`. ``rows``: names of the controls per row (default one row).
    Returns a ``VBox`` to ``display``.
    """
    import ipywidgets as widgets

    state = {"initial": True}

    def redraw(**values):
        if state["initial"]:
            state["initial"] = False
            return
        fn(**values)

    out = widgets.interactive_output(redraw, dict(controls))
    rows = rows or [list(controls)]
    return widgets.VBox([widgets.HBox([controls[k] for k in row]) for row in rows] + [out])


# --------------------------------------------------------------------------------------------------------
# helpers


def token_label(text: str) -> str:
    """A short, visible tick label for one token's text (whitespace shown as ``␣``, newline as ``⏎``),
    HTML-escaped: plotly reads tick text as HTML, so a raw ``</s>`` would break the figure's layout."""
    import html

    s = text.replace("\n", "⏎").replace("\t", "⇥")
    stripped = s.strip()
    if not stripped:
        return "␣" * max(1, min(len(s), 3))
    return html.escape(stripped if len(stripped) <= 14 else stripped[:13] + "…", quote=False)


def _cot_labels(ext, example: int, tokenizer=None) -> list[str]:
    n = int(ext.cot_mask[example].sum())
    if tokenizer is None:
        return [str(int(i)) for i in ext.cot_ids[example, :n]]
    return [token_label(t) for t in A.cot_token_texts(tokenizer, ext, example)]


def _token_axis(fig: go.Figure, labels: Sequence[str], title: str = "CoT token", axis: str = "x") -> None:
    n = len(labels)
    step = max(1, -(-n // 120))  # at most ~120 tick labels
    vals = list(range(0, n, step))
    spec = dict(tickmode="array", tickvals=vals, ticktext=[labels[i] for i in vals], title=title)
    if axis == "x":
        spec["tickangle"] = -60 if n > 12 else 0
        fig.update_xaxes(**spec)
    else:
        fig.update_yaxes(autorange="reversed", **spec)


def _row_labels(n_layers: int, n_heads: int, layer: int | None) -> list[str]:
    if layer is not None:
        return [f"L{layer} h{h}" for h in range(n_heads)]
    return [f"L{l} h{h}" for l in range(n_layers) for h in range(n_heads)]


def _rows_height(rows: int, base: int = 180, per_row: int = 9, minimum: int = 320, maximum: int = 1100) -> int:
    return int(min(maximum, max(minimum, base + per_row * rows)))


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, height=240)
    return fig


def _layer_rows(x: torch.Tensor, layer: int | None) -> torch.Tensor:
    """[L, H, n] -> rows [L*H, n] (or [H, n] for one layer)."""
    if layer is not None:
        return x[layer]
    return x.reshape(-1, x.shape[-1])


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
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or "Overlap of kept sets (mean Jaccard over examples, layers, heads)",
                      height=max(320, 140 + 45 * len(names)), width=max(420, 200 + 60 * len(names)))
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
    fig.update_layout(xaxis_title="layer", yaxis=dict(title="attention mass retained", tickformat=".0%"),
                      title=title or "Retained answer→CoT attention per layer", height=360)
    return fig


# --------------------------------------------------------------------------------------------------------
# training (notebook 03)

LOSS_TERMS = ("loss", "teacher_ce", "student_ce", "codi", "kv")


def loss_curves(history: Sequence[Mapping[str, Any]], title: str = "loss terms") -> go.Figure:
    """One line per logged loss term against the optimizer step (log scale), from ``metrics.jsonl`` records."""
    fig = go.Figure(layout=dict(title=title, xaxis_title="step", yaxis_title="value", yaxis_type="log",
                                height=380, legend=dict(orientation="h")))
    steps = [r["step"] for r in history]
    for term in LOSS_TERMS:
        if history and term in history[-1]:
            fig.add_scatter(x=steps, y=[r.get(term) for r in history], mode="lines", name=term)
    return fig


def fig_interventions(results: dict) -> go.Figure:
    """Accuracy of the untouched run and under each latent intervention, by number of steps and overall.

    ``results``: :func:`kava_lab.evaluate.evaluate_interventions` output, ``{"plain": summary, kind: summary}``."""
    steps = sorted({int(k) for s in results.values() for k in s.get("accuracy_by_steps", {})})
    labels = [f"{n} steps" for n in steps] + ["all"]
    fig = go.Figure()
    for kind, summary in results.items():
        by = summary.get("accuracy_by_steps", {})
        values = [100 * by[str(n)] if str(n) in by else None for n in steps] + [100 * summary["accuracy"]]
        fig.add_bar(name="untouched" if kind == "plain" else kind, x=labels, y=values,
                    hovertemplate="%{x}: %{y:.1f}%<extra>" + kind + "</extra>")
    fig.update_layout(barmode="group", height=420, margin=dict(t=60, l=60, r=20, b=40),
                      title="Do the answers read the latents? Accuracy with the latent cache intervened on",
                      yaxis=dict(title="accuracy (%)", range=[0, 100]), legend_title_text="latent cache")
    return fig
