"""Evaluation questions/s of this tree against an earlier commit, on the same trained backbone, side by side.

    python benchmarks/bench_eval_vs_commit.py --model ~/.cache/kava_lab/stage0-*/model [--commit b9ec0c9] \
        [--n 128] [--rounds 2] [--threads 1]

A random backbone never emits eos, so every question decodes to the full budget and questions/s says little
(bench_train.py's evaluation figure). Here both sides load one trained model folder (a cached stage 0: CoT-trained
on both trace styles, so its CoT decodes stop where a trained model's do) and time ``evaluate()`` on ``--n``
test problems (the split both trees have): CoT (greedy decoding of the whole chain) and KaVa (the latent loop, then the answer; the
projection is the untouched initialisation, so the answers are not the point, the work is). Each side runs in its
own process from its own tree (the earlier commit in a temporary ``git worktree``); rounds alternate the sides.

Both sides evaluate the same problems: this tree's synthetic test problems, written once to an iCoT-format text
file (``question||<<eq>> ... #### answer``, which every tree reads), since two commits' generators may differ. A
batch decodes until its slowest row ends, so unequal problems are unequal work even at equal mean passes per
question: the first version of this benchmark let each tree generate its own problems and read a 0.81x KaVa
slowdown that was unequal work, not slower code (README, issue 8). The table also counts batch-level model calls
and the time per call.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from against_commit import ROOT, commit_worktree, run_child  # benchmarks/ is the script folder

from kava_lab.loaders import load_examples

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[4]))
from dataclasses import replace
from kava_lab.config import get_preset
from kava_lab.evaluate import evaluate
from kava_lab.loaders import load_examples
calls = [0]
try:
    from kava_lab.runs import build_student
except ImportError:  # older trees kept it in train.py
    from kava_lab.train import build_student
out = {}
for method in ("cot", "kava"):
    cfg = replace(get_preset("tiny", method, trace="nl"), backbone=sys.argv[2], stage0_steps=0)
    student, backbone = build_student(cfg)
    student.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # batch-level calls
    examples = load_examples(sys.argv[5], trace="equation", limit=int(sys.argv[3]))  # one file for both trees
    evaluate(student, backbone, cfg, examples[:8], batch_size=64)  # warm-up
    calls[0] = 0
    t0 = time.perf_counter()
    summary = evaluate(student, backbone, cfg, examples, batch_size=64)
    seconds = time.perf_counter() - t0
    out[method] = {"seconds": seconds, "n": len(examples), "accuracy": summary["accuracy"],
                   "passes": summary["forward_passes"], "calls": calls[0]}
print(json.dumps(out))
"""


def run_side(src: Path, model: Path, n: int, threads: int, cache: Path, problems: Path) -> dict:
    return run_child(CHILD, src, [str(model), str(n), str(threads), str(problems)], threads, cache, "evaluation")


def write_problems(path: Path, n: int, task: str) -> Path:
    """This tree's ``task`` test problems in iCoT text format (``question||<<eq>> <<eq>> #### answer``)."""
    examples = load_examples(task, split="test", trace="equation", limit=n)
    path.write_text("".join(f"{e.question}||{' '.join(e.steps)} #### {e.answer}\n" for e in examples))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="a trained model folder (e.g. a cached stage 0's model/)")
    ap.add_argument("--commit", default="b9ec0c9", help="the earlier commit (issue 8's baseline by default)")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task", default="synthetic", help="the synthetic task whose test problems both sides evaluate")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        ap.error(f"--model {args.model}: expected a model folder with config.json (e.g. "
                 "~/.cache/kava_lab/stage0-<hash>/model, written by any training run's stage 0)")
    with commit_worktree(args.commit) as (base, tmp):
        problems = write_problems(tmp / "problems.txt", args.n, args.task)
        sides = {args.commit: base, "this tree": ROOT}
        rows = {k: [] for k in sides}
        for _ in range(args.rounds):
            for i, (name, src) in enumerate(sides.items()):
                rows[name].append(run_side(src, args.model.resolve(), args.n, args.threads, tmp / f"cache-{i}",
                                               problems))
    print(f"evaluate() on {args.n} test problems, batch 64, {args.threads} thread(s), {args.rounds} rounds "
          f"(median), model {args.model}")
    print("| side | method | questions/s | forward passes / question | passes/s | model calls | ms / call | accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    med = {}
    for name, rs in rows.items():
        for method in ("cot", "kava"):
            q = statistics.median(r[method]["n"] / r[method]["seconds"] for r in rs)
            p = statistics.median(r[method]["passes"] for r in rs)
            c = statistics.median(r[method]["calls"] for r in rs)
            ms = statistics.median(1000 * r[method]["seconds"] / max(r[method]["calls"], 1) for r in rs)
            med[name, method] = (q, q * p, ms)
            print(f"| {name} | {method} | {q:.1f} | {p:.1f} | {q * p:.0f} | {c:.0f} | {ms:.2f} | "
                  f"{100 * rs[0][method]['accuracy']:.1f} |")
    for method in ("cot", "kava"):
        q0, p0, ms0 = med[args.commit, method]
        q1, p1, ms1 = med["this tree", method]
        print(f"{method}: this tree / {args.commit}: questions/s {q1 / q0:.2f}x, forward passes/s {p1 / p0:.2f}x, "
              f"time per model call {ms0 / ms1:.2f}x faster")


if __name__ == "__main__":
    main()
