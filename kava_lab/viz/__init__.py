"""Plotly figures for the notebooks (every figure of the kit lives here). Every function returns a ``plotly.graph_objects.Figure`` and does no
I/O (write figures with :func:`kava_lab.analysis.write_figures`); the numbers behind them come from
:mod:`kava_lab.analysis`.

Token axes use positions ``0..n-1`` with the token text as tick labels (repeated tokens stay distinct),
and the token text in the hover box. Pass ``tokenizer=`` to get text; without it ids are shown.

:func:`setup_renderer` picks a renderer that shows figures live in JupyterLab and also embeds them in
a notebook executed headless by papermill or nbmake, so the saved ``.ipynb`` shows them without re-running;
:func:`live_controls` is the one widget helper.

Modules: :mod:`.common` (renderer, widgets, token labels), :mod:`.cache` (notebooks 01-02), :mod:`.training`
(loss curves, interventions), :mod:`.latent` (notebook 04's ``fig_*``).
"""

from __future__ import annotations

from .cache import (attention_map, cache_size_bar, category_shares_bar, cot_length_histogram, keep_frequency_heatmap,
                    kept_tokens_heatmap, kv_norm_heatmap, method_overlap, retained_attention_bar, retained_by_layer,
                    trace_tokens_table)
from .common import (CATEGORY_COLORS, DEFAULT_RENDERER, RENDERER_ENV, SPAN_COLORS, live_controls, setup_renderer,
                     show_live, token_label)
from .latent import (fig_alignment, fig_alignment_scores, fig_decoded, fig_deltas, fig_match_rate, fig_probe,
                     fig_probe_summary, fig_trajectory, fig_trajectory_cloud)
from .training import fig_interventions, loss_curves

__all__ = [
    "setup_renderer", "show_live", "live_controls", "token_label", "RENDERER_ENV", "DEFAULT_RENDERER",
    "SPAN_COLORS", "CATEGORY_COLORS",
    "trace_tokens_table", "kv_norm_heatmap", "attention_map", "kept_tokens_heatmap", "keep_frequency_heatmap",
    "method_overlap", "category_shares_bar", "cot_length_histogram", "retained_attention_bar", "retained_by_layer",
    "cache_size_bar", "loss_curves", "fig_interventions",
    "fig_decoded", "fig_match_rate", "fig_alignment", "fig_alignment_scores", "fig_trajectory",
    "fig_trajectory_cloud", "fig_deltas", "fig_probe", "fig_probe_summary",
]
