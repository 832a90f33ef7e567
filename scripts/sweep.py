"""Run a plan of recorded experiments (scripts/experiment.py lines) on N workers, one log per run.

    python scripts/sweep.py sweeps/tiny-preset.txt --workers 2 --threads 1      # 2-core CPU: two 1-thread runs
    python scripts/sweep.py sweeps/tiny-preset.txt --only 'codi|pccot' --dry-run  # what would run

A plan is a text file with one experiment per line, written as ``scripts/experiment.py``'s arguments
(``NAME --method M --seed S --set KEY=VALUE ...``, shell quoting); ``#`` starts a comment. Every line is
checked before anything runs (its flags, and its ``--set`` overrides against the config), so a typo on line
40 fails in a second, naming the file and line, not after hours of training. With ``--only``, only the
selected lines are checked (and names across the plan kept unique), so a line written for newer code does not
stop older code from running the others. A line whose
``results/NAME.json`` already holds every split it asks for is skipped (``--redo`` runs it again), so an
interrupted sweep is resumed by running the same command: each run also resumes from its own checkpoint.

Workers take lines in order. Runs that share a stage 0 wait on its lock while the first one builds it,
so put one line per stage 0 first when that matters. On two CPU cores, two single-threaded workers beat one
two-threaded run (README, *Training throughput*); on a GPU, several workers share the device. A line with
``--procs N`` trains in N data-parallel processes of ``--threads`` each, so it needs N x threads cores of its own
(``--workers 1`` on 2 cores); on the 2-core CPU it ran no faster than one 2-thread process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


class PlanError(ValueError):
    """A plan line that would fail: names the file and line."""


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line in the plan file
    name: str
    argv: tuple[str, ...]  # experiment.py's arguments, NAME first
    splits: tuple[str, ...]  # the splits its record must hold to count as done


def read_plan(path: Path, only: str | None = None) -> list[Line]:
    """Parse and check the lines of a plan; raises PlanError naming the file and line of the first bad one.

    With ``only`` (a regular expression), the lines whose NAME (their first word) does not match are not
    checked beyond their name, and not returned: a plan line that needs newer code (a new setting) does not
    stop older code from running the other lines. Names stay unique across the whole plan."""
    from experiment import build_parser, run_config  # scripts/experiment.py

    from kava_lab.config import apply_overrides

    parser = build_parser()
    parser.exit_on_error = False
    lines, names = [], {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        where = f"{path}:{number}"
        try:
            argv = shlex.split(raw, comments=True)
        except ValueError as err:
            raise PlanError(f"{where}: cannot split the line ({err}): {raw!r}") from None
        if not argv:
            continue
        if only is not None and not argv[0].startswith("-") and not re.search(only, argv[0]):
            if argv[0] in names:
                raise PlanError(f"{where}: run name {argv[0]!r} already used on line {names[argv[0]]}")
            names[argv[0]] = number
            continue
        for flag in ("--runs", "--results", "--threads"):
            if flag in argv:
                raise PlanError(f"{where}: {flag} belongs to the sweep's command line, not to a plan line")
        try:
            args = parser.parse_args(argv)
        except (argparse.ArgumentError, SystemExit) as err:
            raise PlanError(f"{where}: {err or 'bad arguments'}: {raw.strip()!r}") from None
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
            raise PlanError(f"{where}: run name {args.name!r}: expected letters, digits, '.', '_' or '-'")
        if args.name in names:
            raise PlanError(f"{where}: run name {args.name!r} already used on line {names[args.name]}")
        names[args.name] = number
        try:
            apply_overrides(run_config(args)[0], args.eval_overrides)
        except (ValueError, KeyError, TypeError) as err:
            raise PlanError(f"{where}: {err}") from None
        if only is not None and not re.search(only, args.name):  # a line that names its run after its flags
            continue
        lines.append(Line(number, args.name, tuple(argv), ("val", "test") if args.test else ("val",)))
    if not lines:
        raise PlanError(f"{path}: no experiment lines" + (f" whose name matches {only!r}" if only is not None
                                                          else " (only comments or blank lines)"))
    return lines


def is_done(line: Line, results: Path) -> bool:
    path = results / f"{line.name}.json"
    if not path.exists():
        return False
    try:
        evals = json.loads(path.read_text()).get("evals", {})
    except json.JSONDecodeError:
        return False  # a torn record: run it again
    return all(split in evals for split in line.splits)


def run_line(line: Line, threads: int, runs: Path, results: Path, logs: Path, python: str) -> dict:
    cmd = [python, str(ROOT / "scripts" / "experiment.py"), *line.argv, "--threads", str(threads),
           "--runs", str(runs), "--results", str(results)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    log = logs / f"{line.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return {"name": line.name, "line": line.number, "rc": rc, "minutes": (time.perf_counter() - t0) / 60,
            "log": str(log)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--only", default=None, help="regular expression: run the lines whose NAME matches")
    ap.add_argument("--redo", action="store_true", help="run lines whose record is already complete")
    ap.add_argument("--dry-run", action="store_true", help="check the plan and list what would run")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "exp")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--logs", type=Path, default=ROOT / "runs" / "sweep-logs")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        ap.error(f"--workers and --threads must be at least 1 (found {args.workers}, {args.threads})")
    try:
        lines = read_plan(args.plan, args.only)
    except (PlanError, OSError) as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 2
    todo = [ln for ln in lines if args.redo or not is_done(ln, args.results)]
    for ln in lines:
        state = "run" if ln in todo else "done (recorded)"
        print(f"{args.plan}:{ln.number} {ln.name}: {state}", flush=True)
    if args.dry_run or not todo:
        return 0
    args.logs.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {len(todo)} runs on {args.workers} workers x {args.threads} threads; logs in {args.logs}",
          flush=True)
    failed = []
    with ThreadPoolExecutor(args.workers) as pool:
        jobs = [pool.submit(run_line, ln, args.threads, args.runs, args.results, args.logs, sys.executable)
                for ln in todo]
        for job in as_completed(jobs):  # report each run as it ends
            r = job.result()
            print(f"{r['name']}: {'ok' if r['rc'] == 0 else 'FAILED rc=' + str(r['rc'])} in {r['minutes']:.1f} min"
                  f" ({r['log']})", flush=True)
            if r["rc"]:
                failed.append(r)
    if failed:
        print(f"sweep: {len(failed)} of {len(todo)} runs failed: " + ", ".join(
            f"{r['name']} (line {r['line']}, {r['log']})" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
