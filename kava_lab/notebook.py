"""Notebook-job hygiene: undeclared papermill parameters are errors; a live figure stays one figure.

Papermill injects ``-p NAME VALUE`` as assignments in a cell after the ``parameters`` cell and only warns about
a name the notebook does not declare, so ``-p methd pccot`` silently runs the defaults. Each notebook snapshots
its globals before the parameters cell and calls :func:`check_parameters` after the injected cell.

:class:`LiveFigure` shows a plotly figure once and redraws that same output (a display id), so a training
cell that redraws its loss curves every logged step leaves one figure in the executed notebook, not one per
step (``display(fig, display_id=True)`` does not work for plotly figures: they display themselves through
plotly's renderer, without the id, and every update added another output).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def check_parameters(namespace: Mapping[str, object], before: Iterable[str], declared: Iterable[str]) -> None:
    """Raise if a public name appeared after ``before`` that is not one of the ``declared`` parameters."""
    declared = set(declared)
    unknown = {name for name in namespace if not name.startswith("_")} - set(before) - declared
    if unknown:
        raise NameError(f"unknown notebook parameter(s) {sorted(unknown)} (misspelled -p?); this notebook takes "
                        f"{sorted(declared)}")


class LiveFigure:
    """One output that :meth:`update` redraws in place (plotly's current renderer bundle, with a display id)."""

    def __init__(self, fig: Any):
        from IPython.display import display

        self._handle = display(self._bundle(fig), raw=True, display_id=True)

    @staticmethod
    def _bundle(fig: Any) -> dict:
        import plotly.io as pio

        # what fig.show() would display with the current default renderer (viz.setup_renderer), as a bundle
        return pio.renderers._build_mime_bundle(fig.to_dict())

    def update(self, fig: Any) -> None:
        self._handle.update(self._bundle(fig), raw=True)
