"""scripts/experiment.py: a run's validation curve belongs to its run folder, not to an earlier record."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("experiment", ROOT / "scripts" / "experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["experiment"] = module
    spec.loader.exec_module(module)
    return module


def test_retrained_run_does_not_extend_an_old_records_curve(experiment, tmp_path, monkeypatch):
    """A record whose run folder is gone (a machine reset) and the same name trained again: the new record's
    curve is the new run's points only (it used to be the old curve with the new one appended)."""
    monkeypatch.setenv("KAVA_LAB_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    results.mkdir()
    stale = [{"step": 2, "val_accuracy": 0.9}, {"step": 4, "val_accuracy": 0.95}]
    (results / "r.json").write_text(json.dumps({"name": "r", "curve": stale}))
    args = ["r", "--method", "nocot", "--runs", str(tmp_path / "runs"), "--results", str(results), "--set",
            "stage0_steps=0", "--set", "optim.steps=4", "--set", "max_new_tokens=4", "--set", "log_every=1", "--set",
            "data.train_limit=64", "--val-limit", "4", "--eval-every", "2", "--threads", "1"]
    record = experiment.main(args)
    steps = [p["step"] for p in record["curve"]]
    assert steps == [2, 4] and record["curve"] != stale
    written = [json.loads(x) for x in (tmp_path / "runs" / "r" / experiment.CURVE_FILE).read_text().splitlines()]
    assert written == record["curve"]
    again = experiment.main(args)
    assert again["curve"] == record["curve"]  # the finished folder re-evaluated: its curve, not twice over


def test_resumed_run_keeps_its_points_up_to_the_checkpoint(experiment, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "step.json").write_text(json.dumps({"step": 4}))
    points = [{"step": 2, "val_accuracy": 0.1}, {"step": 4, "val_accuracy": 0.2}, {"step": 6, "val_accuracy": 0.3}]
    previous = {"curve": [{"step": 2, "val_accuracy": 0.5}]}
    # a folder older than the curve file: its record's curve, up to the checkpoint
    assert experiment.run_curve(run, {"curve": points}) == points[:2]
    (run / experiment.CURVE_FILE).write_text("".join(json.dumps(p) + "\n" for p in points + [points[0]]))
    assert experiment.run_curve(run, previous) == points[:2]  # step 6 came after the checkpoint: measured again
    assert experiment.run_curve(run, None) == []  # a fresh run starts empty


def test_terms_by_window_averages_equal_spans_of_the_logged_steps(experiment):
    """The record's training curve: 20 spans of the logged rows, each the mean of its terms with its first and
    last step; fewer rows than windows give one span per row; no rows, no windows."""
    rows = [{"step": s, "loss": float(s), "teacher_ce": 2.0 * s, "lr": 1.0, "step_time_s": 0.1}
            for s in range(10, 410, 10)]  # 40 rows logged every 10 steps
    windows = experiment.terms_by_window(rows)
    assert len(windows) == 20
    assert windows[0] == {"steps": [10, 20], "loss": 15.0, "teacher_ce": 30.0}  # lr, step time: not terms
    assert windows[-1] == {"steps": [390, 400], "loss": 395.0, "teacher_ce": 790.0}
    assert [w["steps"][0] for w in windows] == list(range(10, 410, 20))
    assert len(experiment.terms_by_window(rows[:3])) == 3 and experiment.terms_by_window([]) == []
    uneven = experiment.terms_by_window(rows[:7], windows=3)  # spans of 2, 2, 3 rows
    assert [w["steps"] for w in uneven] == [[10, 20], [30, 40], [50, 70]]
