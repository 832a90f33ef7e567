"""Render the experiment log (results/*.json, written by scripts/experiment.py) as markdown tables.

    python scripts/render_results.py                 # print every table
    python scripts/render_results.py --readme README.md   # replace the block between the README's markers

Tables: every run (the ablation log, negative results included), accuracy by number of steps, the
main comparison as mean ± std over seeds on the test split, and each latent setting's share of the
CoT - No-CoT gap (the issue's measure of a recipe). Every README number of the latent-reasoning
study comes from these files, so nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin (scripts/render_results.py) -->", "<!-- results:end -->"
INTERVENTIONS = ("donor", "zero", "mean", "shuffle-slots", "hide")


def load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _settings(r: dict) -> str:
    skip = ("data.train=", "data.eval=")
    # no overrides: the preset as it was when the run was made (its defaults change; the record keeps the steps)
    return ", ".join(o for o in r.get("overrides", []) if not o.startswith(skip)) or \
        (f"preset, {r['steps']} steps" if r.get("steps") else "preset")


def build(r: dict) -> str:
    """Which stage-0 build a run started from: its weights' fingerprint, else the record's label up to ':'.
    Rebuilds of one cached stage 0 differ (92.0% vs 78.3% CoT for the tiny preset), so only runs of one build
    compare cleanly."""
    return r.get("stage0_sha") or (r.get("stage0_build") or "?").split(":")[0]


def log_table(records: list[dict], split: str = "val") -> str:
    head = (f"| run | method | trace | seed | task | settings | stage 0 | train min | {split} acc | "
            + " | ".join(INTERVENTIONS) + " | counterfactual | KV target (oracle) | question |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(records, key=lambda r: r.get("date", "")):
        ev = r["evals"].get(split)
        if ev is None:
            continue
        iv = ev.get("interventions", {})
        lines.append("| " + " | ".join([
            r["name"], r["method"], r["trace"], str(r["seed"]), r.get("task", ""), _settings(r), build(r),
            f"{r['train_minutes']:.1f}", pct(ev["plain"]["accuracy"]),
            *[pct(iv[k]["accuracy"]) if k in iv else "–" for k in INTERVENTIONS],
            pct(iv.get("donor", {}).get("counterfactual_rate")), pct(iv.get("target", {}).get("accuracy")),
            r.get("why", "").replace("|", "/")]) + " |")
    return "\n".join(lines)


def by_steps_table(records: list[dict], split: str = "val") -> str:
    rows = [r for r in records if split in r["evals"]]
    steps = sorted({int(k) for r in rows for k in r["evals"][split]["plain"]["accuracy_by_steps"]})
    head = "| run | " + " | ".join(f"{s} steps" for s in steps) + " | all |"
    lines = [head, "|" + "---|" * (len(steps) + 2)]
    for r in sorted(rows, key=lambda r: r.get("date", "")):
        plain = r["evals"][split]["plain"]
        lines.append(f"| {r['name']} | " + " | ".join(pct(plain["accuracy_by_steps"].get(str(s))) for s in steps)
                     + f" | {pct(plain['accuracy'])} |")
    return "\n".join(lines)


def ms(values) -> str:
    """Mean ± std in percent of the values that are not None; one value alone, or "–" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return pct(values[0])
    return f"{pct(statistics.mean(values))} ± {100 * statistics.stdev(values):.1f}"


def main_table(records: list[dict], split: str = "test", min_seeds: int = 1) -> str:
    """One row per (method, trace, task, settings, stage-0 build): mean ± std over its seeds; groups run on
    fewer than ``min_seeds`` distinct seeds are left out. A row never averages two builds of one stage 0
    (they differ: 92.0% vs 78.3% CoT for the tiny preset), nor two runs of one seed on different builds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if split in r["evals"]:
            key = (r["method"], r["trace"], r.get("task", ""), _settings(r), build(r))
            groups.setdefault(key, []).append(r)

    head = ("| method | trace | task | settings | seeds | stage 0 | accuracy | donor swap | zero | mean | "
            "shuffle-slots | forward passes | train min |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (method, trace, task, settings, stage0), rs in sorted(groups.items()):
        if len({r["seed"] for r in rs}) < min_seeds:
            continue
        ev = [r["evals"][split] for r in rs]
        iv = lambda k: ms([e.get("interventions", {}).get(k, {}).get("accuracy") for e in ev])
        lines.append("| " + " | ".join([
            method, trace, task, settings, str(len(rs)), stage0,
            ms([e["plain"]["accuracy"] for e in ev]),
            *[iv(k) for k in INTERVENTIONS], f"{statistics.mean(e['plain']['forward_passes'] for e in ev):.1f}",
            f"{statistics.mean(r['train_minutes'] for r in rs):.1f}"]) + " |")
    return "\n".join(lines)


def _steps(r: dict):
    """The run's training budget: the record's ``steps``, else its ``optim.steps=`` override."""
    if r.get("steps") is not None:
        return int(r["steps"])
    for o in r.get("overrides", []):
        if o.startswith("optim.steps="):
            return int(o.split("=", 1)[1])
    return None


def gap_table(records: list[dict], split: str = "test") -> str:
    """Each latent setting's share of the CoT - No-CoT gap, the issue's measure of a recipe:
    share = (latent - No-CoT) / (CoT - No-CoT), from seed means, overall and by number of steps.

    CoT is the stage-0 record of the same build (the teacher every student starts from); No-CoT is the mean
    over seeds of the plain No-CoT runs (no settings beyond the stage-0 and step counts) of the same build and
    task at the **same step budget**. Both are matched whatever their trace label: No-CoT never reads a trace,
    and CoT evaluation gives the model no trace cue (it writes whatever follows the question), so each is one
    figure for both trace styles of a build; the trace matters to the students, through their KV targets.
    A setting with no such pair gets no row; builds named "?" (not fingerprinted, not kept) are left out, since
    two of them cannot be told apart. The donor cost is the seed mean of (untouched - donor swap)."""
    def base(r):  # what a setting shares with its CoT and No-CoT rows
        return (r.get("task", ""), build(r))

    def plain(r):
        keep = ("data.train=", "data.eval=", "stage0_steps=", "optim.steps=")
        return all(o.startswith(keep) for o in r.get("overrides", []))

    def acc(r, steps=None):
        p = r["evals"][split]["plain"]
        return p["accuracy"] if steps is None else p.get("accuracy_by_steps", {}).get(steps)

    rows = [r for r in records if split in r["evals"] and build(r) != "?"]
    cot = {}
    for r in rows:
        if r["method"] == "cot":
            cot.setdefault(base(r), []).append(r)
    nocot = {}
    for r in rows:
        if r["method"] == "nocot" and plain(r):
            nocot.setdefault(base(r) + (_steps(r),), []).append(r)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] not in ("cot", "nocot"):
            groups.setdefault((r["method"], r["trace"]) + base(r) + (_settings(r), _steps(r)), []).append(r)

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    def share(lat, no, co):
        if None in (lat, no, co) or co - no <= 0:
            return "–"
        return f"{100 * (lat - no) / (co - no):.0f}%"

    step_keys = sorted({k for r in rows for k in r["evals"][split]["plain"].get("accuracy_by_steps", {})}, key=int)
    head = ("| method | trace | task | settings | stage 0 | seeds (No-CoT seeds) | CoT | No-CoT | latent | "
            "gap share | donor cost | share by steps |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (method, trace, task, stage0, settings, steps), rs in sorted(groups.items(),
                                                                    key=lambda kv: tuple(map(str, kv[0]))):
        cs, ns = cot.get((task, stage0)), nocot.get((task, stage0, steps))
        if not cs or not ns:
            continue
        co, no, lat = mean([acc(r) for r in cs]), mean([acc(r) for r in ns]), [acc(r) for r in rs]
        donor = mean([acc(r) - r["evals"][split]["interventions"]["donor"]["accuracy"] for r in rs
                      if "donor" in r["evals"][split].get("interventions", {})])
        by = [f"{k}: " + share(mean([acc(r, k) for r in rs]), mean([acc(r, k) for r in ns]),
                               mean([acc(r, k) for r in cs])) for k in step_keys
              if any(acc(r, k) is not None for r in rs)]
        lines.append("| " + " | ".join([
            method, trace, task, settings, stage0, f"{len(rs)} ({len(ns)})", pct(co), pct(no), ms(lat),
            share(statistics.mean(lat), no, co), "–" if donor is None else f"{100 * donor:.1f}",
            ", ".join(by)]) + " |")
    return "\n".join(lines)


def render(records: list[dict]) -> str:
    parts = []
    if any("test" in r["evals"] for r in records):
        parts += ["**Share of the CoT - No-CoT gap, test split** (the issue's measure: (latent - No-CoT) / (CoT - "
                  "No-CoT) from seed means, No-CoT at the same step budget on the same stage-0 build, CoT that "
                  "build's teacher; donor cost in points):", "", gap_table(records, "test"), "",
                  "**Test split, mean ± std over seeds** (accuracy %, interventions applied to the latent cache):",
                  "", main_table(records, "test"), "", "Test accuracy by number of steps:", "",
                  by_steps_table(records, "test"), ""]
    seeds = main_table(records, "val", min_seeds=2)
    if seeds.count("\n") > 1:  # more than the header
        parts += ["**Validation split, mean ± std over seeds** (settings run on 2 or more seeds):", "", seeds, ""]
    gaps = gap_table(records, "val")
    if gaps.count("\n") > 1:
        parts += ["**Share of the CoT - No-CoT gap, validation split** (where recipes are chosen):", "", gaps, ""]
    parts += ["**Every run, validation split** (accuracy %; the recipe is chosen here, never on test):", "",
              log_table(records, "val"), "", "Validation accuracy by number of steps:", "",
              by_steps_table(records, "val")]
    return "\n".join(parts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--readme", default=None, help="replace the block between the markers in this file")
    args = ap.parse_args(argv)
    text = render(load(Path(args.results)))
    if args.readme is None:
        print(text)
        return
    path = Path(args.readme)
    readme = path.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{path}: markers not found; add the two lines\n{BEGIN}\n{END}\nwhere the tables go")
    before, rest = readme.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    path.write_text(before + BEGIN + "\n" + text + "\n" + END + after)
    print(f"{path}: results block rewritten from {args.results}")


if __name__ == "__main__":
    main()
