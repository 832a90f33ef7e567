"""Figures of notebook 04 (probing the latents): decoded slots, KV alignment, trajectories, linear probes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go
import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..probe import KVAlignment, LatentDecoding, ProbeResult, TrajectoryProjection


def fig_decoded(dec: LatentDecoding, tokenizer, example: int = 0, slot_mask: Tensor | None = None,
                title: str | None = None):
    """Heatmap iteration x slot of the top-1 probability, each cell labelled with its top-1 token (``*``:
    the token occurs in the teacher's CoT); hover shows the top-k."""
    I, _, M, k = dec.token_ids.shape
    text, hover = [], []
    for i in range(I):
        toks = dec.tokens(tokenizer, example, i)
        row_t, row_h = [], []
        for j in range(M):
            star = "*" if dec.in_trace is not None and bool(dec.in_trace[i, example, j]) else ""
            row_t.append(toks[j][0] + star)
            row_h.append("<br>".join(f"{t!r}: {p:.2f}" for t, p in zip(toks[j], dec.probs[i, example, j].tolist())))
        text.append(row_t)
        hover.append(row_h)
    fig = go.Figure(go.Heatmap(z=dec.probs[:, example, :, 0].numpy(), x=[f"slot {j + 1}" for j in range(M)],
                               y=dec.iteration_labels, text=text, texttemplate="%{text}", customdata=hover,
                               hovertemplate="%{y}, %{x}<br>%{customdata}<extra></extra>", colorscale="Blues",
                               zmin=0, zmax=1, colorbar=dict(title="top-1 p")))
    if slot_mask is not None:
        invalid = [f"slot {j + 1}" for j in range(M) if not bool(slot_mask[example, j])]
        if invalid:
            fig.add_annotation(text=f"slots past the CoT length: {', '.join(invalid)}", showarrow=False,
                               xref="paper", yref="paper", x=0, y=-0.25, xanchor="left")
    fig.update_layout(title=title or f"decoded latents, example {example} (* = token in the teacher's CoT)",
                      yaxis=dict(autorange="reversed"), height=160 + 40 * I)
    return fig


def fig_match_rate(dec: LatentDecoding, slot_mask: Tensor | None = None, title: str = ""):
    rates = dec.match_rate(slot_mask)
    names = {"top1": "top-1 in own CoT", "topk": f"any top-{dec.token_ids.shape[-1]} in own CoT",
             "control": "top-1 in another problem's CoT"}
    fig = go.Figure([go.Bar(name=names[k], x=dec.iteration_labels, y=v.numpy()) for k, v in rates.items()])
    fig.update_layout(barmode="group", yaxis=dict(range=[0, 1], title="fraction of latent slots"),
                      title=title or "decoded latent tokens found in the teacher's trace")
    return fig


def fig_alignment(align: KVAlignment, layer: int = 0, kind: str = "keys", example: int | None = None):
    """``M x M`` cosine matrix (student slot i vs teacher slot j) of one layer, mean or one example."""
    mat = align.mean(kind)[layer] if example is None else getattr(align, kind)[example, layer]
    M = mat.shape[-1]
    score = (align.key_score if kind == "keys" else align.value_score)[layer]
    who = "mean over examples" if example is None else f"example {example}"
    fig = go.Figure(go.Heatmap(z=mat.numpy(), x=[str(j + 1) for j in range(M)], y=[str(i + 1) for i in range(M)],
                               colorscale="RdBu", zmid=0, colorbar=dict(title="cos")))
    fig.update_layout(title=f"{kind[:-1]} cosine, layer {layer} ({who}); diagonal score {float(score):.3f}",
                      xaxis=dict(title="teacher slot (compressed CoT entry)"),
                      yaxis=dict(title="student latent slot", autorange="reversed"), width=520, height=480)
    return fig


def fig_alignment_scores(align: KVAlignment, title: str = ""):
    layers = [f"layer {i}" for i in range(len(align.key_score))]
    fig = go.Figure([
        go.Bar(name="K", x=layers, y=align.key_score.numpy()),
        go.Bar(name="V", x=layers, y=align.value_score.numpy()),
        go.Bar(name="K, other problem's teacher", x=layers, y=align.key_control.numpy()),
        go.Bar(name="V, other problem's teacher", x=layers, y=align.value_control.numpy()),
    ])
    fig.update_layout(barmode="group", yaxis=dict(title="mean diagonal - mean off-diagonal cos"),
                      title=title or "student vs compressed teacher cache: diagonal score per layer")
    return fig


def fig_trajectory(proj: TrajectoryProjection, example: int = 0, dims: int = 2, slot_mask: Tensor | None = None):
    """One example's latents in PC space: a line through the slots for each iteration (colour), and grey lines
    joining each slot across iterations (legend: "one slot across iterations"); marker labels are slot numbers."""
    c = proj.coords[:, example]  # [I, M, k]
    I, M, k = c.shape
    dims = min(dims, k)
    scatter = go.Scatter3d if dims == 3 else go.Scatter
    mode_kw = {} if dims == 3 else {"textposition": "top center"}
    axes = lambda pts: dict(zip("xyz", [pts[..., a].numpy() for a in range(dims)]))  # noqa: E731
    traces = []
    if I > 1:  # grey: each slot's own path across iterations (one legend entry for all of them)
        for j in range(M):
            traces.append(scatter(**axes(c[:, j]), mode="lines", line=dict(color="lightgrey"), hoverinfo="skip",
                                  name="one slot across iterations", legendgroup="paths", showlegend=j == 0))
    for i in range(I):
        traces.append(scatter(**axes(c[i]), mode="lines+markers+text", name=proj.iteration_labels[i],
                              text=[str(j + 1) for j in range(M)], **mode_kw))
    fig = go.Figure(traces)
    ev = ", ".join(f"PC{a + 1} {float(proj.explained[a]):.0%}" for a in range(dims))
    fig.update_layout(title=f"latent trajectory, example {example}<br><sup>{ev} of variance; numbers: slots; grey: "
                            "each slot's path across iterations</sup>", margin=dict(t=90), height=500)
    if dims == 2:
        fig.update_layout(xaxis_title="PC1", yaxis_title="PC2")
    return fig


def fig_trajectory_cloud(proj: TrajectoryProjection, max_examples: int = 200):
    """All examples: every slot at every iteration as a point, coloured by slot, one panel-free legend entry
    per iteration (marker symbol)."""
    c = proj.coords[:, :max_examples]
    I, B, M, _ = c.shape
    symbols = ["circle", "diamond", "square", "x", "cross", "triangle-up"]
    traces = []
    for i in range(I):
        slots = torch.arange(M).repeat(B) + 1
        traces.append(go.Scatter(x=c[i, ..., 0].flatten().numpy(), y=c[i, ..., 1].flatten().numpy(), mode="markers",
                                 name=proj.iteration_labels[i], marker=dict(color=slots.numpy(), colorscale="Viridis",
                                 size=5, opacity=0.6, symbol=symbols[i % len(symbols)],
                                 colorbar=dict(title="slot") if i == 0 else None)))
    fig = go.Figure(traces)
    fig.update_layout(title=f"all latents of {B} problems in PC space (colour: slot, symbol: iteration)",
                      xaxis_title="PC1", yaxis_title="PC2", height=500)
    return fig


def fig_deltas(deltas: Tensor, iteration_labels: list[str]):
    M = deltas.shape[1]
    fig = go.Figure([go.Scatter(x=[f"{j + 1}" for j in range(M)], y=deltas[t].numpy(), mode="lines+markers",
                                name=f"{iteration_labels[t]} -> {iteration_labels[t + 1]}")
                     for t in range(deltas.shape[0])])
    fig.update_layout(title="relative change of each slot's hidden state per iteration",
                      xaxis_title="slot", yaxis_title="||h_t - h_t-1|| / ||h_t-1||")
    return fig


def fig_probe(result: ProbeResult, step: int = -1, control: bool = False):
    """Layer x slot heatmap of held-out probe scores for one target step (or its shuffled control)."""
    k = step % len(result.step_names)
    z = (result.control if control else result.score)[k]
    L1, M = z.shape
    metric = result.metric
    majority = float(result.chance[k])
    # colours span the data and the majority-class rate (probe accuracies of 0.03-0.14 on a 0-1 scale all
    # looked alike); the colour bar marks the majority rate, which a probe must beat to mean anything
    finite = z[torch.isfinite(z)]
    lo = min(float(finite.min()), majority) if metric == "accuracy" and finite.numel() else None
    hi = max(float(finite.max()), majority) if metric == "accuracy" and finite.numel() else None
    bar = dict(title=metric)
    if lo is not None and hi is not None and hi > lo:
        bar.update(tickvals=[lo, majority, hi], ticktext=[f"{lo:.2f}", f"majority {majority:.2f}", f"{hi:.2f}"])
    fig = go.Figure(go.Heatmap(z=z.numpy(), x=[str(j + 1) for j in range(M)],
                               y=["embedding"] + [f"layer {i}" for i in range(1, L1)], colorscale="Viridis",
                               zmin=lo, zmax=hi, colorbar=bar, texttemplate="%{z:.2f}",
                               hovertemplate="%{y}, slot %{x}: %{z:.3f}<extra></extra>"))
    what = "shuffled-label control" if control else "held-out"
    base = f"; majority-class rate {majority:.2f}" if metric == "accuracy" else ""
    fig.update_layout(title=f"linear probe {metric} ({what}), {result.step_names[k]} ({result.target}){base}",
                      xaxis_title="latent slot", yaxis_title="hidden state", height=180 + 30 * L1)
    return fig


def fig_probe_summary(result: ProbeResult):
    """Per target step: best held-out probe, best shuffled control, and the majority-class rate (the accuracy of
    always answering the training problems' most frequent label)."""
    rows = result.best()
    x = [r["step"] for r in rows]
    fig = go.Figure([
        go.Bar(name="probe at the site chosen on training problems (held-out)", x=x,
               y=[r[result.metric] for r in rows],  # the chosen site in the hover (as bar text it was unreadable)
               hovertext=[f"layer {r['layer']}, slot {r['slot'] + 1}" for r in rows]),
        go.Bar(name="max over sites (held-out, optimistic)", x=x, y=[r["max_over_sites"] for r in rows]),
        go.Bar(name="shuffled labels (same site)", x=x, y=[r["control"] for r in rows]),
        go.Bar(name="shuffled labels (max over sites)", x=x, y=[r["control_max"] for r in rows]),
        go.Bar(name="majority-class rate", x=x, y=[r["chance"] for r in rows]),
    ])
    fig.update_layout(barmode="group", title=f"linear probes on latent hidden states: {result.target}",
                      yaxis_title=result.metric)
    return fig
