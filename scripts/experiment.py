"""One recorded experiment: train a tiny-preset run, evaluate it with interventions, write results/NAME.json.

    python scripts/experiment.py NAME --method kava --trace nl --seed 0 \
        --task synthetic:3-6 --set latent.T=6 --set optim.steps=1600 --why "does T=6 beat T=3?" [--test]

Decide the question before the run (``--why``), change one factor at a time (``--set``), and choose recipes
on ``val`` (carved from the training problems); ``--test`` adds the held-out test split, for the numbers a
README reports. The run folder goes to ``runs/exp/NAME`` (not committed); the small JSON record goes to
``results/NAME.json`` (committed): config, overrides, train minutes, final loss terms, the validation
curve (``--eval-every``), and for each split the plain accuracy, accuracy by number of steps and every
intervention's accuracy (latent methods). ``scripts/render_results.py`` renders the README tables from it.
Re-running a finished NAME only re-evaluates (training resumes from its checkpoint, already complete).

``--procs N`` trains data-parallel in N processes of ``--threads`` threads each (torchrun, gloo on CPU) at the
same effective batch: the per-process batch becomes ``optim.effective_batch / N``, so the maths is one process's.
On the 2-core machine two 1-thread processes beat one 2-thread process (benchmarks/bench_vs_commit.py). The
stage 0 is built first, in this process; rank 0 evaluates (curve and record) while the other ranks wait.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kava_lab.config import apply_overrides, get_preset  # noqa: E402
from kava_lab.evaluate import evaluate, evaluate_interventions  # noqa: E402
from kava_lab.loaders import load_examples  # noqa: E402


# logged loss terms
TERMS = ("loss", "teacher_ce", "student_ce", "codi", "kv", "kv_floor", "step_ce", "target_ce", "kv_tf", "direct_ce")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _slim(summary: dict) -> dict:
    keep = ("accuracy", "n", "forward_passes", "kv_bytes", "accuracy_by_steps", "counterfactual_rate",
            "donor_answer_rate", "gold_rate_on_donor_rows", "donor_rows")
    return {k: summary[k] for k in keep if k in summary}


def evaluate_split(student, backbone, cfg, split: str, limit: int, interventions: bool) -> dict:
    examples = load_examples(cfg.data.eval, split=split, trace=cfg.data.trace, limit=limit)
    from kava_lab.runs import target_teacher

    results = evaluate_interventions(student, backbone, cfg, examples, kinds=None if interventions else (),
                                     teacher=target_teacher(cfg, student) if interventions else None)
    out = {"plain": _slim(results.pop("plain"))}
    if results:
        out["interventions"] = {kind: _slim(summary) for kind, summary in results.items()}
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of one experiment (scripts/sweep.py checks every line of a plan with it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--method", default="kava")
    ap.add_argument("--trace", default="nl", choices=("nl", "equation"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default=None, help="synthetic task for train and eval, e.g. synthetic:3-6")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--why", default="", help="the question this run answers (decided before the run)")
    ap.add_argument("--test", action="store_true", help="also evaluate on the held-out test split")
    ap.add_argument("--val-limit", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=0, help="validation accuracy every N steps (a curve)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (per process)")
    ap.add_argument("--procs", type=int, default=1, help="data-parallel training processes (torchrun, gloo on CPU)")
    ap.add_argument("--eval-set", dest="eval_overrides", action="append", default=[],
                    help="override applied at evaluation only, e.g. max_new_tokens=160")
    ap.add_argument("--existing", default=None, help="record an already trained run folder instead of "
                    "training; its own config is used. 'stage0': this config's cached CoT stage 0 (trained "
                    "first if missing), the CoT row of a table")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "exp"))
    ap.add_argument("--results", default=str(ROOT / "results"))
    return ap


def run_config(args: argparse.Namespace):
    """The run's config and the overrides that made it (``--task`` first): (RunConfig, list[str])."""
    overrides = ([f"data.train={args.task}", f"data.eval={args.task}"] if args.task else []) + list(args.overrides)
    cfg = apply_overrides(get_preset("tiny", args.method, trace=args.trace, seed=args.seed), overrides)
    if args.procs > 1:  # the same effective batch, split over the processes (a layout, not a new recipe)
        if cfg.optim.effective_batch % args.procs:
            raise ValueError(f"--procs {args.procs} does not divide optim.effective_batch={cfg.optim.effective_batch}")
        cfg = apply_overrides(cfg, [f"optim.batch_size={cfg.optim.effective_batch // args.procs}"])
    return cfg, overrides


def launch_processes(args, argv: list[str], cfg) -> dict:
    """Re-run this command under torchrun with ``args.procs`` processes; returns the record rank 0 wrote."""
    from kava_lab.runs import ensure_stage0
    from kava_lab.train import torchrun_command

    if args.existing:
        raise ValueError("--procs trains; --existing only evaluates: drop one of them")
    if cfg.stage0_steps:
        ensure_stage0(cfg)  # here, once: ranks building it side by side would deadlock on its lock
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1))
    subprocess.run([*torchrun_command(args.procs), __file__, *argv], env=env, cwd=ROOT, check=True)
    return json.loads((Path(args.results) / f"{args.name}.json").read_text())


def main(argv=None) -> dict:
    from kava_lab.runs import build_student
    from kava_lab.train import train

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.procs < 1:
        raise ValueError(f"--procs must be at least 1, found {args.procs}")

    cfg, overrides = run_config(args)
    rank = int(os.environ.get("RANK", "0"))
    if args.procs > 1 and "LOCAL_RANK" not in os.environ:
        return launch_processes(args, argv, cfg)
    run_dir = Path(args.runs) / args.name
    record_path = Path(args.results) / f"{args.name}.json"
    record_path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(record_path.read_text()) if record_path.exists() else {}

    from kava_lab.runs import stage0_dir

    args.stage0_model = stage0_dir(cfg) / "model" if cfg.stage0_steps else None  # this run's starting point
    if args.existing == "stage0":
        from kava_lab.runs import ensure_stage0

        ensure_stage0(cfg)
        args.existing = str(stage0_dir(cfg) / "run")
    elif args.existing:
        args.stage0_model = None  # an arbitrary run folder: its starting point is not known here
    if args.existing:  # re-evaluate (e.g. with --eval-set); keep what the earlier record says of the training
        run_dir = Path(args.existing)
        if previous.get("run_dir") in (None, str(run_dir)) and previous.get("overrides") is not None and \
                not overrides:
            overrides = previous["overrides"]
        return record(args, run_dir, record_path, previous, overrides,
                      train_minutes=previous.get("train_minutes"), stage0_minutes=0.0,
                      curve=previous.get("curve", []))
    t_stage0 = time.perf_counter()
    student, backbone = build_student(cfg)  # trains and caches stage 0 on first use
    stage0_minutes = (time.perf_counter() - t_stage0) / 60
    already = (run_dir / "checkpoint" / "step.json").exists()
    curve = run_curve(run_dir, previous if already else None)
    val_examples = (load_examples(cfg.data.eval, split="val", trace=cfg.data.trace, limit=args.val_limit)
                    if args.eval_every else None)

    def callback(record):
        if rank != 0:
            return  # one voice: rank 0 evaluates and prints while the other ranks wait at the next step
        if args.eval_every and record["step"] % args.eval_every == 0:
            acc = evaluate(student, backbone, cfg, val_examples, batch_size=64)["accuracy"]
            point = {"step": record["step"], "val_accuracy": acc}
            curve.append(point)
            with open(run_dir / CURVE_FILE, "a") as fh:  # survives a crash: a resumed run keeps its points
                fh.write(json.dumps(point) + "\n")
            print(f"step {record['step']}: val accuracy {acc:.3f}", flush=True)
        if record["step"] % 50 == 0:
            terms = " ".join(f"{k}={record[k]:.4g}" for k in TERMS if k in record)
            print(f"step {record['step']}: {terms} ({record['step_time_s']:.2f} s/step)", flush=True)

    t0 = time.perf_counter()
    train(cfg, run_dir, resume=already, student_backbone=(student, backbone), callback=callback,
          log=lambda s: print(s, flush=True))
    train_minutes = (time.perf_counter() - t0) / 60
    if rank != 0:
        return {}
    if args.procs > 1:
        torch.set_num_threads((args.threads or 1) * args.procs)  # the other ranks are done: evaluate on their cores
    if already and previous.get("train_minutes"):
        train_minutes = previous["train_minutes"]  # re-evaluation only
    return record(args, run_dir, record_path, previous, overrides, train_minutes, stage0_minutes, curve)


def _stage0_threads(args) -> int | None:
    """How many threads the stage 0 this run started from trained on (its last start; None where not written):
    the same stage-0 config built on another thread count is other weights."""
    model = getattr(args, "stage0_model", None)
    versions = Path(model).parent / "run" / "versions.json" if model else None
    return json.loads(versions.read_text()).get("torch_threads") if versions and versions.exists() else None


CURVE_FILE = "curve.jsonl"  # in the run folder: one validation point per line, written as it is measured


def run_curve(run_dir: Path, previous: dict | None) -> list[dict]:
    """The validation points a run continues from: none for a fresh run, whatever an earlier record of the same
    name says (a re-trained run does not extend the curve of one whose folder is gone); for a resumed run
    (``previous`` given), the points its folder holds up to the checkpoint's step (a point measured after the
    last checkpoint is measured again), or, for a folder older than the curve file, its record's curve."""
    if previous is None:
        return []
    resumed_at = json.loads((run_dir / "checkpoint" / "step.json").read_text())["step"]
    path = run_dir / CURVE_FILE
    if not path.exists():
        return [p for p in previous.get("curve", []) if p["step"] <= resumed_at]
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            point = json.loads(line)
            by_step[point["step"]] = point  # a step measured twice (crash after it, before a checkpoint): the last
    return [by_step[s] for s in sorted(by_step) if s <= resumed_at]


def _mean_terms(rows: list[dict]) -> dict:
    """Mean of every loss term (and the gradient norm) over metrics rows; {} for none."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[-1] if k in TERMS + ("grad_norm",)} if rows else {}


def terms_by_window(metrics: list[dict], windows: int = 20) -> list[dict]:
    """The loss terms' means over ``windows`` equal spans of the logged steps, each with its first and last
    step: the training curve in the record (where a loss sat on a plateau, and when it left it)."""
    n = len(metrics)
    spans = [(i * n // windows, (i + 1) * n // windows) for i in range(min(windows, n))]
    return [{"steps": [metrics[a]["step"], metrics[b - 1]["step"]], **_mean_terms(metrics[a:b])}
            for a, b in spans]


def record(args, run_dir: Path, record_path: Path, previous: dict, overrides: list[str],
           train_minutes: float | None, stage0_minutes: float, curve: list[dict]) -> dict:
    from kava_lab.runs import load_run, read_metrics, stage0_dir, weights_fingerprint

    student, backbone, cfg = load_run(run_dir, device="cuda" if torch.cuda.is_available() else None)
    if cfg.data.trace == "both":  # stage 0 trains on both trace styles: evaluate the requested one
        cfg = replace(cfg, data=replace(cfg.data, trace=args.trace))
    cfg = apply_overrides(cfg, args.eval_overrides)
    t1 = time.perf_counter()
    evals = {"val": evaluate_split(student, backbone, cfg, "val", args.val_limit, interventions=True)}
    if args.test:
        evals["test"] = evaluate_split(student, backbone, cfg, "test", cfg.data.eval_limit or 300,
                                       interventions=True)
    metrics = read_metrics(run_dir)
    if train_minutes is None:  # an existing run: its own step times
        train_minutes = sum(r["step_time_s"] for r in metrics) / 60
    tail = metrics[-50:]
    final_terms = _mean_terms(tail)
    record = {
        "name": args.name, "why": args.why or previous.get("why", ""), "method": cfg.method,
        "trace": cfg.data.trace, "seed": cfg.seed, "task": cfg.data.train, "overrides": overrides,
        "steps": cfg.optim.steps, "stage0_steps": cfg.stage0_steps, "stage0_dir": None if args.existing else stage0_dir(cfg).name,
        # the stage-0 build this run started from (or is): rebuilds differ, so comparisons must share it
        "stage0_sha": weights_fingerprint(args.stage0_model) if getattr(args, "stage0_model", None) else None,
        "stage0_threads": _stage0_threads(args),
        "train_minutes": round(train_minutes, 2), "stage0_minutes_this_call": round(stage0_minutes, 2),
        "run_dir": str(run_dir) if args.existing else previous.get("run_dir"),
        "eval_overrides": list(args.eval_overrides), "max_new_tokens": cfg.max_new_tokens,
        "eval_minutes": round((time.perf_counter() - t1) / 60, 2), "threads": args.threads or torch.get_num_threads(),
        "procs": args.procs,
        "median_step_s": sorted(r["step_time_s"] for r in metrics)[len(metrics) // 2] if metrics else None,
        "final_terms_last50": final_terms, "terms_by_window": terms_by_window(metrics), "curve": curve,
        "evals": evals, "config": cfg.to_dict(),
        "commit": _git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    record_path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    val = evals["val"]
    line = f"{args.name}: val accuracy {val['plain']['accuracy']:.3f}"
    for kind, s in val.get("interventions", {}).items():
        line += f", {kind} {s['accuracy']:.3f}"
    print(line, f"-> {record_path}", flush=True)
    return record


if __name__ == "__main__":
    main()
