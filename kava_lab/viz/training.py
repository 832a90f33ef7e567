"""Figures of training and evaluation (notebooks 03, 04): loss curves and intervention accuracies."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import plotly.graph_objects as go


# --------------------------------------------------------------------------------------------------------
# training (notebook 03)

LOSS_TERMS = ("loss", "teacher_ce", "student_ce", "codi", "kv", "step_ce")
DIAGNOSTICS = ("kv_floor",)  # logged beside the terms, not part of the loss: dotted lines


def loss_curves(history: Sequence[Mapping[str, Any]], title: str = "loss terms") -> go.Figure:
    """One line per logged loss term against the optimizer step (log scale), from ``metrics.jsonl`` records."""
    fig = go.Figure(layout=dict(title=title, xaxis_title="step", yaxis_title="value", yaxis_type="log",
                                height=380, legend=dict(orientation="h")))
    steps = [r["step"] for r in history]
    for term in LOSS_TERMS:
        if history and term in history[-1]:
            fig.add_scatter(x=steps, y=[r.get(term) for r in history], mode="lines", name=term)
    for term in DIAGNOSTICS:
        if history and term in history[-1]:
            fig.add_scatter(x=steps, y=[r.get(term) for r in history], mode="lines", name=f"{term} (not in loss)",
                            line=dict(dash="dot"))
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
        name = {"plain": "untouched", "target": "KV target (oracle: reads the CoT)"}.get(kind, kind)
        fig.add_bar(name=name, x=labels, y=values,
                    hovertemplate="%{x}: %{y:.1f}%<extra>" + kind + "</extra>")
    fig.update_layout(barmode="group", height=420, margin=dict(t=60, l=60, r=20, b=40),
                      title="Do the answers read the latents? Accuracy with the latent cache intervened on",
                      yaxis=dict(title="accuracy (%)", range=[0, 100]), legend_title_text="latent cache")
    return fig
