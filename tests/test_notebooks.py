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
    # stage 0 shows its progress bar and one closing line, not every logged step (log=lambda s: None is silent;
    # the bar once replaced it with bar.write: 120 stream outputs in a default run)
    stage0 = [c for c in cells if c["cell_type"] == "code" and "ensure_stage0(cfg" in "".join(c["source"])]
    streams = [o for o in stage0[0]["outputs"] if o.get("output_type") == "stream" and "step=" in "".join(o["text"])]
    assert not streams, streams[:2]


def _kava_imports(source: str):
    """``from kava_lab[.x] import a, b`` statements of a cell (ast: multi-line and aliased forms too)."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics
        tree = ast.parse("\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!"))))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kava_lab":
            yield node.module, [a.name for a in node.names]


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("0*.ipynb")), ids=lambda p: p.stem)
def test_every_name_a_notebook_imports_from_kava_lab_exists(path):
    """A refactor that moves a function must move its notebook imports too (notebook 04's ``runs.demo_run``
    was once lost this way: the unit tests passed and only the 25-minute notebook run failed)."""
    import importlib

    missing = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        for module, names in _kava_imports("".join(cell["source"])):
            mod = importlib.import_module(module)
            missing += [f"{module}.{n}" for n in names if n != "*" and not hasattr(mod, n)
                        and importlib.util.find_spec(f"{module}.{n}") is None]
    assert not missing, f"{path.name} imports names kava_lab lacks: {missing}"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("0*.ipynb")), ids=lambda p: p.stem)
def test_papermill_sees_every_declared_parameter(path):
    """``papermill --help-notebook`` and papermill's own parsing list exactly the parameters a notebook declares
    to :func:`check_parameters` (a comment holding '=' once hid ``lam`` in notebook 02 behind a warning)."""
    import re

    papermill = pytest.importorskip("papermill")
    source = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    declared = re.search(r"check_parameters\(globals\(\), _before_parameters, declared=\(([^)]*)\)", source)
    assert declared, f"{path.name} does not check its parameters"
    names = set(re.findall(r"'(\w+)'", declared.group(1)))
    assert set(papermill.inspect_notebook(str(path))) == names
