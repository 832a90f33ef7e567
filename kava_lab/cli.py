"""``kava-lab``: the notebooks' jobs without Jupyter.

    kava-lab train --preset tiny --method kava --trace nl --seed 0 [--steps N] --out runs/kava-nl
    kava-lab eval runs/kava-nl [--json] [--intervene all]
    kava-lab lab [--out runs/lab] [--small]     # the main job: every notebook through papermill
    kava-lab presets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"  # a source checkout (or editable install)
NOTEBOOK_DATA = ("share", "kava_lab", "notebooks")  # where a wheel installs them (pyproject: data-files)


def notebook_dir() -> Path:
    """The folder holding the four notebooks: the source checkout's ``notebooks/``, else the copy a
    non-editable install put under ``<prefix>/share/kava_lab/notebooks`` (sys.prefix, the user base)."""
    import site
    import sysconfig

    if any(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")):
        return NOTEBOOK_DIR
    bases = [sysconfig.get_path("data"), sys.prefix, getattr(site, "USER_BASE", None)]
    tried = []
    for base in dict.fromkeys(b for b in bases if b):
        folder = Path(base).joinpath(*NOTEBOOK_DATA)
        tried.append(str(folder))
        if any(folder.glob("[0-9][0-9]_*.ipynb")):
            return folder
    raise FileNotFoundError(f"no notebooks found: not in {NOTEBOOK_DIR} (a source checkout) nor in {tried} "
                            "(an installed wheel); reinstall kava_lab or run from a clone of the repository")


def _train(args) -> int:
    from .config import METHODS, RunConfig, apply_overrides, get_preset
    from .evaluate import evaluate_run
    from .train import train

    out = Path(args.out)
    if args.resume and (out / "config.json").exists():
        cfg = RunConfig.load(out / "config.json")
        asked = {"--method": (args.method, cfg.method), "--steps": (args.steps, cfg.optim.steps),
                 "--trace": (args.trace, cfg.data.trace), "--seed": (args.seed, cfg.seed)}
        clash = [f"{flag} {want} (the run has {have})" for flag, (want, have) in asked.items()
                 if want is not None and want != have]
        if clash or args.overrides:
            raise SystemExit(f"kava-lab train --resume continues {out} exactly as it was configured; it cannot "
                             f"change {', '.join(clash + [f'--set {o}' for o in args.overrides])}. Train into a new "
                             "folder instead")
    else:
        method = args.method or "kava"
        if method not in METHODS:
            raise SystemExit(f"--method must be one of {METHODS}, found {method!r}")
        cfg = get_preset(args.preset, method, trace=args.trace, seed=args.seed or 0, steps=args.steps)
        cfg = apply_overrides(cfg, args.overrides + ([f"save_every={args.save_every}"] if args.save_every else []))
    train(cfg, out, resume=args.resume, progress=True)  # a bar with the loss; log lines print above it
    if args.eval:
        print(json.dumps(evaluate_run(out), indent=2))
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_run

    if args.intervene:
        return _intervene(args)
    summary = evaluate_run(args.run, eval_source=args.source, split=args.split, limit=args.limit,
                           batch_size=args.batch_size)
    if args.json:
        print(json.dumps(summary))
    else:
        for key in ("method", "trace", "eval_source", "n", "accuracy", "forward_passes", "latency_ms", "kv_bytes"):
            print(f"{key:>15}: {summary[key]}")
    return 0


def _intervene(args) -> int:
    """Accuracy of the untouched run next to each latent intervention (written to interventions*.json)."""
    from .evaluate import evaluate_interventions
    from .loaders import load_examples
    from .runs import load_run, target_teacher

    kinds = None if "all" in args.intervene else tuple(dict.fromkeys(args.intervene))  # None: all that apply
    student, backbone, cfg = load_run(args.run)
    if not cfg.uses_latents:
        raise SystemExit(f"{args.run}: --intervene needs a latent method (codi, pccot, kava); this run is "
                         f"{cfg.method!r}")
    source = args.source or cfg.data.eval
    split = args.split or (cfg.data.eval_split if args.source is None else None)
    examples = load_examples(source, split=split, trace=cfg.data.trace,
                             limit=args.limit if args.limit is not None else cfg.data.eval_limit)
    oracle = kinds is None or "target" in kinds  # a frozen-teacher run rebuilds its teacher only for the oracle
    results = evaluate_interventions(student, backbone, cfg, examples, kinds=kinds, batch_size=args.batch_size,
                                     teacher=target_teacher(cfg, student) if oracle else None)
    name = "interventions.json" if args.source is None and args.split is None else \
        f"interventions-{Path(str(source)).name.replace(':', '_')}-{split}.json"
    record = {"run": str(args.run), "eval_source": str(source), "eval_split": split, "results": results}
    (Path(args.run) / name).write_text(json.dumps(record, indent=1))
    if args.json:
        print(json.dumps(record))
        return 0
    plain = results["plain"]["accuracy"]
    print(f"{'intervention':>14}  accuracy  change   (n={results['plain']['n']}, {source}/{split})")
    for kind, summary in results.items():
        extra = ""
        if kind == "donor" and summary.get("counterfactual_rate") is not None:
            extra = (f"  counterfactual answer {summary['counterfactual_rate']:.1%}, donor's answer "
                     f"{summary['donor_answer_rate']:.1%} of {summary['donor_rows']} distinguishable rows")
        change = "" if kind == "plain" else f"{100 * (summary['accuracy'] - plain):+6.1f}"
        print(f"{kind:>14}  {summary['accuracy']:7.1%}  {change:>6}{extra}")
    print(f"written to {Path(args.run) / name}")
    return 0


def _presets(args) -> int:
    from .config import PRESETS

    for name in PRESETS:
        cfg = PRESETS[name]()
        print(f"{name:>16}  backbone={cfg.backbone}  train={cfg.data.train}  steps={cfg.optim.steps}  "
              f"lr={cfg.optim.lr}  M={cfg.latent.M} T={cfg.latent.T}")
    return 0


def run_notebooks(out: Path, small: bool = False, names: list[str] | None = None) -> list[Path]:
    """Execute the notebooks in order with papermill; notebook 04 probes the run notebook 03 trained."""
    import papermill

    out.mkdir(parents=True, exist_ok=True)
    if small:
        os.environ["KAVA_LAB_SMALL"] = "1"
    done = []
    folder = notebook_dir()
    # from a checkout, notebooks run where they live (their relative defaults, ../shared/data); an installed
    # copy may be read-only, so it runs in the output folder (every path it writes is passed in absolute)
    cwd = folder if folder == NOTEBOOK_DIR else out
    for nb in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        if names and not any(nb.name.startswith(n) for n in names):
            continue
        params = {"out_dir": str(out / nb.stem)}
        if nb.name.startswith("04") and (out / "03_distill" / "run" / "config.json").exists():
            params["run"] = str(out / "03_distill" / "run")
        target = out / nb.name
        t0 = time.perf_counter()
        print(f"running {nb.name} -> {target}", flush=True)
        papermill.execute_notebook(str(nb), str(target), parameters=params, cwd=str(cwd),
                                   progress_bar=False)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
        done.append(target)
    return done


def _lab(args) -> int:
    out = Path(args.out or f"runs/lab-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_notebooks(out, small=args.small, names=args.only)
    print(f"executed notebooks, run folders and figures are in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kava-lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one method on a preset into a run folder")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--method", default=None, help="cot, nocot, codi, pccot or kava (default kava)")
    p.add_argument("--trace", choices=("equation", "nl"), default=None)
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: the preset's)")
    p.add_argument("--eval", action="store_true", help="evaluate on the preset's eval set when done")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set latent.T=6 --set data.train=synthetic:3-6")
    p.set_defaults(fn=_train)

    p = sub.add_parser("eval", help="evaluate a run folder")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.add_argument("--source", default=None, help="eval set (default: the run's); e.g. gsm8k, svamp, a path")
    p.add_argument("--split", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--intervene", nargs="+",
                   choices=("donor", "zero", "mean", "shuffle-slots", "hide", "target", "all"),
                   help="also decode with the latent cache intervened on (donor swap, zeroed inputs, batch "
                        "mean, shuffled slots, latents hidden from the answer; 'target' is an oracle that reads "
                        "the gold CoT: the compressed teacher cache the KV loss aims at); prints accuracy under "
                        "each next to the untouched run")
    p.set_defaults(fn=_eval)

    p = sub.add_parser("lab", help="the main job: run every notebook with papermill into a run folder")
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true", help="small parameters (what the tests use)")
    p.add_argument("--only", nargs="*", help="notebook prefixes, e.g. 01 03")
    p.set_defaults(fn=_lab)

    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(fn=_presets)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # a clear line, not a traceback
        print(f"kava-lab {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
