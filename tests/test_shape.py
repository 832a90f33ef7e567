"""The package's shape: one small-mode rule, and train.py imported only for training."""

import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "kava_lab"


@pytest.mark.parametrize("value,expected", [("1", True), ("on", True), ("TRUE", True), ("", False), ("0", False),
                                            ("off", False), ("no", False)])
def test_small_mode_is_one_rule_everywhere(monkeypatch, value, expected):
    from kava_lab import analysis, probe, runs

    monkeypatch.setenv("KAVA_LAB_SMALL", value)
    assert runs.small_mode() is analysis.small_mode() is expected
    assert not hasattr(probe, "small_mode")  # one home: runs (analysis re-exports it for notebooks 01/02)


def test_small_mode_rejects_a_value_it_cannot_read(monkeypatch):
    from kava_lab.runs import small_mode

    monkeypatch.setenv("KAVA_LAB_SMALL", "maybe")
    with pytest.raises(ValueError, match="KAVA_LAB_SMALL='maybe'"):
        small_mode()


def test_train_is_imported_only_for_training():
    """Run folders, checkpoints and caches live in runs.py; other modules import train.py only for train()."""
    for path in PKG.glob("*.py"):
        if path.name == "train.py":
            continue
        for names in re.findall(r"from \.train import ([^\n]+)", path.read_text()):
            assert [n.strip() for n in names.split("#")[0].split(",")] == ["train"], (path.name, names)


def test_notebooks_reject_undeclared_papermill_parameters():
    import ast
    import json

    from kava_lab.notebook import check_parameters

    for path in sorted((PKG.parent / "notebooks").glob("0*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        i = next(k for k, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
        declared = [t.id for node in ast.parse("".join(cells[i]["source"])).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)]
        assert "_before_parameters = set(globals())" in "".join(cells[i - 1]["source"]), path.name
        check = "".join(cells[i + 1]["source"])
        assert check.startswith("check_parameters(") and repr(tuple(declared)) in check, path.name
    with pytest.raises(NameError, match=r"\['methd'\]"):
        check_parameters({"method": 1, "methd": 2, "_i2": 3}, before=set(), declared=["method"])
    check_parameters({"method": 1, "json": 2}, before={"json"}, declared=["method"])


def test_tick_labels_are_html_escaped_and_attention_uses_a_fixed_scale():
    from kava_lab.viz import token_label

    assert token_label("</s>") == "&lt;/s&gt;"
    assert token_label(" apples") == "apples" and token_label("\n") == "⏎"


def test_every_module_is_under_500_lines_and_every_figure_lives_in_viz():
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert max(sizes.values()) < 500, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    for path in PKG.rglob("*.py"):
        if path.parent.name != "viz":
            assert "plotly.graph_objects" not in path.read_text(), path  # figures are built in viz only
