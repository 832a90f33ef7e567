"""The experiment log: README tables are rendered from results/*.json, never typed by hand."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _render_module():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script_on_a_small_run(tmp_path, monkeypatch, name: str):
    """A 2-step KaVa run of the small test config (own stage-0 cache) and the script ``scripts/<name>.py``."""
    import sys

    from kava_lab.train import train

    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import small_cfg

    monkeypatch.setenv("KAVA_LAB_CACHE", str(tmp_path / "cache"))
    run = train(small_cfg(steps=2), tmp_path / "run", log=lambda s: None)
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return run, module


def test_readme_results_block_is_the_rendering_of_results_folder():
    rr = _render_module()
    readme = (ROOT / "README.md").read_text()
    block = readme.split(rr.BEGIN, 1)[1].split(rr.END, 1)[0].strip("\n")
    assert block == rr.render(rr.load(ROOT / "results")), \
        "README results block is stale: run python scripts/render_results.py --readme README.md"


def test_log_table_shows_each_intervention_the_counterfactual_rate_and_the_oracle():
    rr = _render_module()
    summary = lambda acc, **kw: {"accuracy": acc, "n": 10, "forward_passes": 7.0,
                                 "accuracy_by_steps": {"5": acc}, **kw}
    record = {"name": "r1", "method": "kava", "trace": "nl", "seed": 0, "task": "synthetic:5-8",
              "overrides": ["data.train=synthetic:5-8", "optim.steps=8"], "train_minutes": 1.5, "why": "a|b",
              "date": "2026-12-01", "evals": {"val": {"plain": summary(0.5), "interventions": {
                  "donor": summary(0.2, counterfactual_rate=0.25), "zero": summary(0.1), "mean": summary(0.3),
                  "shuffle-slots": summary(0.4), "hide": summary(0.45), "target": summary(0.9)}}}}
    row = rr.log_table([record]).splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["r1", "kava", "nl", "0", "synthetic:5-8", "optim.steps=8", "?", "1.5", "50.0", "20.0", "10.0",
                     "30.0", "40.0", "45.0", "25.0", "90.0", "a/b"]
    old = dict(record, evals={"val": {"plain": summary(0.5)}})  # a No-CoT-like record: no interventions
    assert rr.log_table([old]).splitlines()[-1].count("–") == 7


def test_seed_table_gives_mean_and_std_and_leaves_out_single_seed_settings():
    rr = _render_module()

    def rec(seed, acc, steps="800"):
        return {"name": f"r{seed}", "method": "nocot", "trace": "nl", "seed": seed, "task": "synthetic",
                "overrides": [f"optim.steps={steps}"], "train_minutes": 2.0,
                "evals": {"val": {"plain": {"accuracy": acc, "n": 10, "forward_passes": 7.0}}}}

    records = [rec(0, 0.5), rec(1, 0.7), rec(0, 0.9, steps="400")]
    table = rr.main_table(records, "val", min_seeds=2)
    rows = table.splitlines()[2:]
    assert len(rows) == 1 and "optim.steps=800" in rows[0] and "60.0 ± 14.1" in rows[0]
    assert len(rr.main_table(records, "val").splitlines()) == 4  # min_seeds=1 keeps the single-seed setting


def test_gap_table_shares_the_cot_nocot_gap_at_the_same_budget_and_build():
    """share = (latent - No-CoT) / (CoT - No-CoT) from seed means; No-CoT only at the latent runs' own step
    budget, build and task, and only plain No-CoT runs; CoT and No-CoT whatever their trace label; builds named
    "?" give no row."""
    rr = _render_module()

    def rec(name, method, seed, acc, by, steps=800, extra=(), sha="abc", donor=None):
        ev = {"plain": {"accuracy": acc, "n": 10, "forward_passes": 7.0, "accuracy_by_steps": by}}
        if donor is not None:
            ev["interventions"] = {"donor": {"accuracy": donor}}
        return {"name": name, "method": method, "trace": "nl", "seed": seed, "task": "synthetic:3-5",
                "overrides": ["data.train=synthetic:3-5", f"optim.steps={steps}", *extra], "steps": steps,
                "stage0_sha": sha, "train_minutes": 1.0, "evals": {"test": ev}}

    records = [rec("cot", "cot", 0, 0.9, {"3": 1.0, "5": 0.8}, steps=1000),
               rec("n0", "nocot", 0, 0.3, {"3": 0.4, "5": 0.2}), rec("n1", "nocot", 1, 0.5, {"3": 0.6, "5": 0.4}),
               rec("n400", "nocot", 0, 0.1, {"3": 0.1, "5": 0.1}, steps=400),      # another budget
               rec("nlr", "nocot", 0, 0.0, {"3": 0.0, "5": 0.0}, extra=["optim.lr=1"]),  # not plain
               rec("k0", "kava", 0, 0.6, {"3": 0.8, "5": 0.4}, donor=0.3),
               rec("k1", "kava", 1, 0.8, {"3": 1.0, "5": 0.6}, donor=0.4),
               rec("k400", "kava", 0, 0.5, {"3": 0.5, "5": 0.5}, steps=600),        # no No-CoT at 600: no row
               rec("q", "kava", 0, 0.9, {"3": 0.9}, sha=None)]                        # build "?": no row
    eq_kava = dict(rec("k-eq", "kava", 0, 0.55, {"3": 0.55}), trace="equation")
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in rr.gap_table(records + [eq_kava]).splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("kava", "equation"), ("kava", "nl")]
    # the equation row reads the build's CoT and No-CoT runs (labelled nl): (55 - 40) / (90 - 40) = 30%
    assert rows[0][6:10] == ["90.0", "40.0", "55.0", "30%"]
    row = rows[1]
    # CoT 90, No-CoT mean 40 (n0, n1), KaVa 70 +- 14.1: (70 - 40) / (90 - 40) = 60%; donor cost mean(30, 40)
    assert row[0] == "kava" and row[4] == "abc" and row[5] == "2 (2)"
    assert row[6:11] == ["90.0", "40.0", "70.0 ± 14.1", "60%", "35.0"]
    # by steps: 3 -> (0.9 - 0.5) / (1.0 - 0.5) = 80%; 5 -> (0.5 - 0.3) / (0.8 - 0.3) = 40%
    assert row[11] == "3: 80%, 5: 40%"


def test_target_oracle_script_reports_each_compressor_and_slot_count(tmp_path, monkeypatch):
    monkeypatch.setenv("KAVA_LAB_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("target_oracle", ROOT / "scripts" / "target_oracle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "oracle.json"
    record = module.main(["--task", "synthetic:2-3", "--set", "stage0_steps=0", "--set", "max_new_tokens=3",
                          "--set", "tiny.num_layers=1", "--limit", "4", "--grid", "rkv:4", "stride:6",
                          "--out", str(out)])
    assert [(r["compressor"], r["M"]) for r in record["rows"]] == [("rkv", 4), ("stride", 6)]
    assert all(0 <= r["teacher"] <= 1 and set(r["teacher_by_steps"]) <= {"2", "3"} for r in record["rows"])
    assert all("target" not in r for r in record["rows"])  # the student layout needs a trained run
    assert record["n"] == 4 and out.exists()
    import pytest

    with pytest.raises(SystemExit, match="compressor:M"):
        module.main(["--task", "synthetic:2-3", "--set", "stage0_steps=0", "--grid", "rkv"])


def test_tables_name_the_stage0_build_and_never_average_two_builds():
    """Rebuilds of a cached stage 0 differ, so runs of two builds are two rows, each naming its build."""
    rr = _render_module()
    summary = {"accuracy": 0.5, "n": 10, "forward_passes": 7.0, "accuracy_by_steps": {"3": 0.5}}
    base = {"method": "kava", "trace": "nl", "task": "synthetic", "overrides": ["optim.steps=8"],
            "train_minutes": 1.0, "date": "2026-12-01", "evals": {"val": {"plain": summary}}}
    runs = [dict(base, name="a", seed=0, stage0_sha="1edaedf62bee"),
            dict(base, name="b", seed=1, stage0_sha="1edaedf62bee"),
            dict(base, name="c", seed=2, stage0_sha=None, stage0_build="s8: not kept")]
    runs.append(dict(base, name="d", seed=0, stage0_sha=None, stage0_build="s8: not kept",
                     evals={"val": {"plain": dict(summary, accuracy=0.9)}}))
    rows = rr.main_table(runs, "val").splitlines()[2:]
    assert [(r.split("|")[5].strip(), r.split("|")[6].strip(), r.split("|")[7].strip()) for r in rows] == \
        [("2", "1edaedf62bee", "50.0 ± 0.0"), ("2", "s8", "70.0 ± 28.3")]
    assert rr.log_table(runs, "val").splitlines()[-1].split("|")[7].strip() == "s8"


def test_weights_fingerprint_tells_builds_apart(tmp_path):
    import torch
    from safetensors.torch import save_file

    from kava_lab.runs import weights_fingerprint

    assert weights_fingerprint(tmp_path) is None
    save_file({"w": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    first = weights_fingerprint(tmp_path)
    assert len(first) == 12 and weights_fingerprint(tmp_path) == first
    save_file({"w": torch.tensor([0.0, 0.0, 1e-7])}, str(tmp_path / "model.safetensors"))
    assert weights_fingerprint(tmp_path) != first


def test_kv_reach_script_reports_every_slot_and_layer(tmp_path, monkeypatch):
    run, module = _script_on_a_small_run(tmp_path, monkeypatch, "kv_reach")
    out = tmp_path / "reach.json"
    [row] = module.main([str(run), "--limit", "8", "--out", str(out)])
    assert row["n"] == 8 and row["M"] == 4 and len(row["ratio_by_slot"]) == 4 and len(row["ratio_by_layer"]) == 2
    assert row["ratio"] > 0 and all(c <= 8 for c in row["count"]) and out.exists()
    assert 0 <= row["same_token_across_cache"] <= row["same_token_across_heads"] <= 1 and row["scope"] == "head"
    other = dict(row, run="other-run")  # --merge keeps another run's row and replaces this run's
    out.write_text(json.dumps([other, dict(row, ratio=-1.0)]))
    module.main([str(run), "--limit", "8", "--out", str(out), "--merge"])
    assert [(r["run"], r["ratio"]) for r in json.loads(out.read_text())] == [("other-run", row["ratio"]),
                                                                           (row["run"], row["ratio"])]


def test_hop_probe_script_probes_each_step_at_four_sites(tmp_path, monkeypatch):
    import torch

    from kava_lab.loaders import load_examples
    from kava_lab.runs import load_run

    run, module = _script_on_a_small_run(tmp_path, monkeypatch, "hop_probe")
    out = tmp_path / "hops.json"
    [row] = module.main([str(run), "--limit", "40", "--out", str(out)])
    assert row["n"] == 40 and row["M"] == 4 and out.exists()
    for site in ("latents", "bot", "student_values", "target_values"):
        steps = [r["step"] for r in row[site]]
        assert steps[0] == "step 1" and steps[-1] == "answer", site
        assert all(0 <= r["accuracy"] <= 1 and 0 <= r["control"] <= 1 for r in row[site]), site
    # the <bot> column does not depend on how the batch is padded: one example alone = the same in a batch
    student, backbone, cfg = load_run(run)
    examples = load_examples(cfg.data.eval, split="val", trace=cfg.data.trace, limit=6)
    together = module.bot_hidden(student, backbone, cfg, examples)
    alone = torch.cat([module.bot_hidden(student, backbone, cfg, [e]) for e in examples])
    assert together.shape == alone.shape and together.shape[2] == 1
    assert torch.allclose(together, alone, atol=1e-4)
    bot = student.model.get_input_embeddings().weight[backbone.bot_id].detach()  # layer 0 is the <bot> embedding
    assert torch.allclose(together[:, 0, 0], bot.expand_as(together[:, 0, 0]))


def test_input_reach_script_fits_inputs_under_the_loop(tmp_path, monkeypatch):
    """scripts/input_reach.py: with no fitting steps the free causal pass of the loop's own inputs is the loop's
    final pass (the same ratio) and the forced figures agree; a few Adam steps on the inputs lower the ratio."""
    run, module = _script_on_a_small_run(tmp_path, monkeypatch, "input_reach")
    [still] = module.main([str(run), "--limit", "8", "--steps", "0"])
    assert abs(still["fitted"] - still["loop"]) < 1e-4 and abs(still["fitted_forced"] - still["loop_forced"]) < 1e-4
    assert still["loop"] > 0 and still["loop_forced"] > 0
    out = tmp_path / "reach.json"
    [fit] = module.main([str(run), "--limit", "8", "--steps", "20", "--out", str(out)])
    assert fit["fitted"] < 0.9 * fit["loop"] and fit["fitted_forced"] < 0.9 * fit["loop_forced"]
    assert json.loads(out.read_text())[0]["run"] == run.name


def test_step_decode_roles_and_donor_control(tmp_path, monkeypatch):
    """scripts/step_decode.py: token roles of both trace styles; on a shuffled-walk run, every decoded token is
    counted once per source, and a batch of one problem repeated decodes the same from its own and a donor's latent."""
    import dataclasses

    from kava_lab.loaders import load_examples
    from kava_lab.runs import load_run

    run, module = _script_on_a_small_run(tmp_path, monkeypatch, "step_decode")
    nl = ["Maria", " gives", " Nina", " +", " 5", ",", " and", " Nina", " has", " 1", "7", " +", " 5", " =", " 2",
          "2", " books", "."]
    assert module.token_roles(nl) == ["giver", "other", "receiver", "operator", "operand", "other", "other", "holder",
                                      "other", "previous value", "previous value", "operator copy", "operand copy",
                                      "other", "result", "result", "other", "other"]
    eq = ["<<", " Lily", " gives", " Ravi", " -", " 4", ":", " 19", "-", "4", "=", "15", ">>"]
    assert module.token_roles(eq) == ["other", "giver", "other", "receiver", "operator", "operand", "other",
                                      "previous value", "operator copy", "operand copy", "other", "result", "other"]
    with pytest.raises(ValueError, match="synthetic walks"):
        module.main([str(run), "--limit", "8"])  # the small run evaluates on in-order problems: no roles there

    student, backbone, cfg = load_run(run)
    walk = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval="synthetic:2-3:shuffled"))
    examples = load_examples(walk.data.eval, split="val", trace=walk.data.trace, limit=12)
    table = module.decode_steps(student, backbone, walk, examples, batch_size=6)
    for role, cell in table["own"].items():
        assert cell["n"] == table["donor"][role]["n"] and 0 <= cell["accuracy"] <= 1, role
    steps = sum(len(e.steps) - 1 for e in examples)  # drop-last: the latents replace all but the final step
    assert table["own"]["giver"]["n"] == table["own"]["receiver"]["n"] == steps
    same = module.decode_steps(student, backbone, walk, [examples[0]] * 4, batch_size=4)
    assert same["own"] == same["donor"]


def test_jacobi_passes_script_decodes_each_T_and_the_trained_one(tmp_path, monkeypatch):
    """Each T asked for plus the trained T (2 in the small config), in order; the trained T's row is the run's
    own evaluation on the same problems, and a T's row does not depend on which other Ts were decoded before."""
    from kava_lab.evaluate import evaluate
    from kava_lab.loaders import load_examples
    from kava_lab.runs import load_run

    run, module = _script_on_a_small_run(tmp_path, monkeypatch, "jacobi_passes")
    [row] = module.main([str(run), "--limit", "6", "--T", "1", "4", "--out", str(tmp_path / "p.json")])
    assert row["T_trained"] == 2 and list(row["by_T"]) == ["1", "2", "4"] and row["n"] == 6
    student, backbone, cfg = load_run(run)
    own = evaluate(student, backbone, cfg, load_examples(cfg.data.eval, split="val", trace="nl", limit=6))
    assert row["by_T"]["2"]["accuracy"] == own["accuracy"]
    assert row["by_T"]["2"]["forward_passes"] == own["forward_passes"]
    row_passes = module.passes(str(run), "val", 6, [1])
    assert row_passes["by_T"]["1"]["accuracy"] == row["by_T"]["1"]["accuracy"]
