"""Training tokens/s of this tree against an earlier commit, measured side by side through ``train()``.

    python benchmarks/bench_vs_commit.py --commit b9ec0c9 [--steps 60] [--threads 2] \
        [--set optim.group_by_length=true] [--set optim.compile=true]

Each side trains the tiny preset's KaVa run (random tiny backbone, no stage 0, NL traces) for ``--steps``
optimizer steps in its own process and its own cache folder: the earlier commit from a temporary ``git worktree``,
this tree with the ``--set`` overrides (several ``--set`` groups: ``--variant NAME=KEY=VALUE,KEY=VALUE``; the
pseudo-key ``procs=N`` trains data-parallel in N processes under torchrun, gloo, at the same effective batch and
``--threads / N`` threads each, so every side uses the same cores). The
figure is what ``train()`` itself logs, tokens/s (real tokens, padding excluded) and step time, as medians over
the steps after the first ``--skip`` (warm-up, compilation). Rounds alternate the sides (``--rounds``), so a
change in machine load hits each alike. The two commits may generate different synthetic problems (the
generator changed in between): tokens/s normalises for their length, step time does not.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from against_commit import ROOT, commit_worktree, run_child  # benchmarks/ is the script folder

CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[3]))
world = int(os.environ.get("WORLD_SIZE", "1"))
from kava_lab.config import get_preset
from kava_lab.train import train, read_metrics
overrides = json.loads(sys.argv[4])
cfg = get_preset("tiny", "kava", trace="nl", steps=int(sys.argv[2]))
if overrides:
    from kava_lab.config import apply_overrides
    cfg = apply_overrides(cfg, overrides)
import dataclasses
if world > 1:  # the same effective batch, split over the processes
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=cfg.optim.effective_batch // world))
cfg = dataclasses.replace(cfg, stage0_steps=0, save_every=10**9, log_every=1)
out = sys.argv[5]
train(cfg, out, log=lambda s: None)
if int(os.environ.get("RANK", "0")) == 0:
    print(json.dumps([{k: r[k] for k in ("step", "tokens_per_s", "step_time_s")} for r in read_metrics(out)]))
"""


def run_side(src: Path, steps: int, threads: int, overrides: list[str], cache: Path, out: Path) -> list[dict]:
    procs = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("procs=")]
    procs = procs[-1] if procs else 1
    overrides = [o for o in overrides if not o.startswith("procs=")]
    per_proc = max(1, threads // procs)
    return run_child(CHILD, src, [str(steps), str(per_proc), json.dumps(overrides), str(out)], per_proc, cache,
                     "training", procs=procs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", default="b9ec0c9", help="the earlier commit (the issue's baseline by default)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the medians")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=KEY=VALUE[,KEY=VALUE]: a configuration of this tree to time (default: the preset)")
    args = ap.parse_args(argv)
    variants = {"this tree": []}
    for v in args.variant:
        name, _, sets = v.partition("=")
        variants[name] = [s for s in sets.split(",") if s]
    with commit_worktree(args.commit) as (base, tmp):
        sides = {f"{args.commit}": (base, [])} | {k: (ROOT, v) for k, v in variants.items()}
        rows = {k: [] for k in sides}
        for r in range(args.rounds):
            for i, (name, (src, overrides)) in enumerate(sides.items()):
                metrics = run_side(src, args.steps, args.threads, overrides, tmp / f"cache-{i}", tmp / f"run-{i}-{r}")
                rows[name] += metrics[args.skip:]
    print(f"tiny preset KaVa training, {args.steps} steps x {args.rounds} rounds per side (medians after step "
          f"{args.skip}), {args.threads} threads")
    base_tps = statistics.median(r["tokens_per_s"] for r in rows[args.commit])
    for name, rs in rows.items():
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        st = statistics.median(r["step_time_s"] for r in rs)
        label = name + (f" ({', '.join(variants[name])})" if variants.get(name) else "")
        print(f"{label:>60}: {tps:8.0f} tokens/s, {st:.3f} s/step, {tps / base_tps:.2f}x {args.commit}'s tokens/s")


if __name__ == "__main__":
    main()
