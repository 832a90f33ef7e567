"""What every figure module shares: the notebook renderer, the one widget helper, token tick labels and
small layout helpers."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import plotly.graph_objects as go
import torch

from .. import analysis as A


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
    """ipywidgets controls that call ``fn(**values)`` whenever a value changes, above its output area: the one
    widget helper of the notebooks.

    ``controls`` maps ``fn``'s parameter names to ipywidgets widgets or to specs: ``(lo, hi)`` or
    ``(lo, hi, value)`` -> integer slider; a list (of values or ``(label, value)`` pairs) -> dropdown; a bool
    -> checkbox. A spec's initial value is ``fn``'s default for that parameter. Built on
    ``widgets.interactive_output``, except that the initial call is skipped: the notebook shows the default
    figures statically right above, and a headless run (papermill, nbmake) then produces no output inside
    the widget at all (nbclient can stall on large outputs there, see :func:`show_live`). ``rows``: names of
    the controls per row (default one row). Returns a ``VBox`` (display it, or make it the cell's last
    expression), or None with a message when ipywidgets is not installed.
    """
    import inspect

    try:
        import ipywidgets as widgets
    except ImportError:
        print("ipywidgets is not installed: the static figures are all there is")
        return None
    defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def make(name, spec):
        if isinstance(spec, widgets.Widget):
            return spec
        if isinstance(spec, bool):
            return widgets.Checkbox(value=defaults.get(name, spec), description=name)
        if isinstance(spec, tuple):
            lo, hi = spec[0], spec[1]
            value = spec[2] if len(spec) > 2 else defaults.get(name, lo)
            return widgets.IntSlider(min=lo, max=hi, value=min(max(value, lo), hi), description=name,
                                     continuous_update=False)
        options = list(spec)
        values = [o[1] if isinstance(o, tuple) else o for o in options]
        value = defaults.get(name, values[0])
        return widgets.Dropdown(options=options, value=value if value in values else values[0], description=name)

    made = {name: make(name, spec) for name, spec in controls.items()}
    state = {"initial": True}

    def redraw(**values):
        if state["initial"]:
            state["initial"] = False
            return
        fn(**values)

    out = widgets.interactive_output(redraw, made)
    rows = rows or [list(made)]
    return widgets.VBox([widgets.HBox([made[k] for k in row]) for row in rows] + [out])


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
