"""Notebook 03 executed headless as papermill runs it (small mode): what the executed notebook keeps.

`make test` runs every notebook through nbmake, which only checks that cells run; this test reads the
executed notebook back. Before the fix the live loss figure was appended at every logged step (42 stacked
copies, about 16,000 px to scroll, in a default run); now one figure is updated in place.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"  # (the HTML renderer also emits its plotly.js loader once)


def _figures(cell: dict) -> int:
    return sum(1 for out in cell.get("outputs", []) if out.get("output_type") in ("display_data", "execute_result")
               and PLOTLY in out.get("data", {}))


@pytest.mark.slow
def test_notebook_03_keeps_one_live_loss_figure(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("KAVA_LAB_SMALL", "1")
    target = tmp_path / "03.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / "03_distill.ipynb"), str(target), cwd=str(NOTEBOOKS),
                               parameters={"out_dir": str(tmp_path / "out")}, progress_bar=False)
    cells = json.loads(target.read_text())["cells"]
    training = [c for c in cells if c["cell_type"] == "code" and "loss_curves(history" in "".join(c["source"])]
    assert len(training) == 1
    logged = sum(1 for line in (tmp_path / "out" / "run" / "metrics.jsonl").read_text().splitlines() if line.strip())
    assert logged >= 2, logged  # several updates happened ...
    assert _figures(training[0]) == 1  # ... into one figure
