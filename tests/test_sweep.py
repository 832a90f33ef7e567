"""scripts/sweep.py: a plan is checked line by line before anything runs, and runs on several workers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def plan(tmp_path, text: str) -> Path:
    path = tmp_path / "plan.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("line, expected", [
    ("r1 --method kava --set optim.stepz=3", "OptimConfig has no field 'stepz'"),
    ("r1 --method kava --set optim.steps=many", "expected a int, found 'many'"),
    ("r1 --trace latex", "invalid choice"),
    ("r1 --threads 2", "--threads belongs to the sweep's command line"),
    ("r1 'unclosed", "cannot split the line"),
    ("bad/name --method nocot", "run name 'bad/name'"),
])
def test_a_bad_line_is_named_by_file_and_line_before_anything_runs(sweep, tmp_path, line, expected):
    path = plan(tmp_path, "# comment\n\nok --method nocot\n" + line + "\n")
    with pytest.raises(sweep.PlanError) as err:
        sweep.read_plan(path)
    assert f"{path}:4:" in str(err.value) and expected in str(err.value)


def test_duplicate_names_and_empty_plans_are_refused(sweep, tmp_path):
    with pytest.raises(sweep.PlanError, match=r"plan.txt:2: run name 'a' already used on line 1"):
        sweep.read_plan(plan(tmp_path, "a --method kava\na --method nocot\n"))
    with pytest.raises(sweep.PlanError, match="no experiment lines"):
        sweep.read_plan(plan(tmp_path, "# only a comment\n\n"))


def test_the_shipped_plans_parse(sweep):
    for path in sorted((ROOT / "sweeps").glob("*.txt")):
        assert sweep.read_plan(path), path


def test_a_line_is_done_when_its_record_holds_every_split_it_asks_for(sweep, tmp_path):
    lines = sweep.read_plan(plan(tmp_path, "a --method kava --test\nb --method nocot\n# c\n"))
    assert [(ln.name, ln.number, ln.splits) for ln in lines] == [("a", 1, ("val", "test")), ("b", 2, ("val",))]
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.json").write_text(json.dumps({"evals": {"val": {}}}))
    (results / "b.json").write_text(json.dumps({"evals": {"val": {}}}))
    assert not sweep.is_done(lines[0], results)  # asks for test too
    assert sweep.is_done(lines[1], results)
    (results / "a.json").write_text('{"evals": {"val"')  # torn write: run it again
    assert not sweep.is_done(lines[0], results)


def test_a_sweep_runs_lines_on_two_workers_skips_recorded_ones_and_names_a_failure(sweep, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("KAVA_LAB_CACHE", str(tmp_path / "cache"))  # the runs are subprocesses: they inherit it
    small = "--set stage0_steps=0 --set optim.steps=2 --set max_new_tokens=4 --val-limit 4 --set data.train_limit=64"
    path = plan(tmp_path, f"n1 --method nocot {small}\n"
                          f"k1 --method kava {small}\n"
                          f"broken --method nocot {small} --existing {tmp_path / 'no-such-run'}\n")
    folders = ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), "--logs", str(tmp_path / "logs")]
    rc = sweep.main([str(path), "--workers", "2", *folders])
    out, err = capsys.readouterr()
    assert rc == 1 and "broken (line 3" in err
    for name, method in (("n1", "nocot"), ("k1", "kava")):
        record = json.loads((tmp_path / "results" / f"{name}.json").read_text())
        assert record["method"] == method and record["steps"] == 2 and 0 <= record["evals"]["val"]["plain"]["accuracy"] <= 1
    assert "interventions" in json.loads((tmp_path / "results" / "k1.json").read_text())["evals"]["val"]
    assert (tmp_path / "logs" / "broken.log").read_text().strip()  # the failure's traceback is kept
    rc = sweep.main([str(path), "--only", "^(n1|k1)$", *folders])  # already recorded: nothing runs
    out, _ = capsys.readouterr()
    assert rc == 0 and "n1: done (recorded)" in out and "k1: done (recorded)" in out and "sweep:" not in out


def test_only_checks_the_selected_lines_and_keeps_names_unique(sweep, tmp_path):
    """--only runs a plan whose other lines need settings this code lacks (a line written for newer code must
    not stop the rest); the selected lines are still checked, and names stay unique across the whole plan."""
    text = "old --method nocot\nnew --method kava --set latent.T_next=2\n--method pccot later\n"
    with pytest.raises(sweep.PlanError, match=r"plan.txt:2: .*no field 'T_next'"):
        sweep.read_plan(plan(tmp_path, text))  # without --only every line is checked
    assert [ln.name for ln in sweep.read_plan(plan(tmp_path, text), only="^old$")] == ["old"]
    assert [ln.name for ln in sweep.read_plan(plan(tmp_path, text), only="later")] == ["later"]
    with pytest.raises(sweep.PlanError, match=r"plan.txt:2: .*no field 'T_next'"):
        sweep.read_plan(plan(tmp_path, text), only="new")  # a selected line is checked
    with pytest.raises(sweep.PlanError, match=r"plan.txt:2: run name 'old' already used on line 1"):
        sweep.read_plan(plan(tmp_path, "old --method nocot\nold --set bad\n"), only="^x$")
    with pytest.raises(sweep.PlanError, match="no experiment lines whose name matches 'nothing'"):
        sweep.read_plan(plan(tmp_path, text), only="nothing")
