"""Does a trained Jacobi student use its iterations? Accuracy with T changed at test time only.

    python scripts/jacobi_passes.py runs/exp/s35-kava-combo-a2-1-4800 [runs/exp/OTHER ...] --T 1 2 3 4 6 \
        --limit 300 --out results/probes/jacobi-passes-s35.json [--merge]

For each run (latent.mode=jacobi), on its task's validation problems: the same weights decode with the latent
loop run for each T in ``--T`` and the run's own T, so the student makes 1 + T forward passes before answering
instead of the 1 + T_train it was trained with. Accuracy falling below T_train says the later passes carry work;
accuracy rising above it says the loop is a fixed-point iteration the answer can read further; flat says the
passes past the first few are idle. Accuracy by number of steps shows whether extra passes help the deeper
problems.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kava_lab.evaluate import evaluate  # noqa: E402
from kava_lab.loaders import load_examples  # noqa: E402
from kava_lab.probe.records import probe_main  # noqa: E402
from kava_lab.runs import load_run  # noqa: E402


def passes(run_dir: str, split: str, limit: int, Ts: list[int]) -> dict:
    t0 = time.perf_counter()
    student, backbone, cfg = load_run(run_dir)
    if student.cfg.mode != "jacobi":
        raise ValueError(f"{run_dir}: latent mode {student.cfg.mode!r}; this probe changes Jacobi iterations only")
    examples = load_examples(cfg.data.eval, split=split, trace=cfg.data.trace, limit=limit)
    trained = student.cfg
    by_T = {}
    try:
        for T in sorted(set(Ts) | {trained.T}):  # the trained T always, as the reference
            student.cfg = replace(trained, T=T)
            s = evaluate(student, backbone, cfg, examples)
            by_T[str(T)] = {k: s[k] for k in ("accuracy", "accuracy_by_steps", "forward_passes")}
    finally:
        student.cfg = trained
    return {"run": Path(run_dir).name, "split": split, "n": len(examples), "T_trained": trained.T, "by_T": by_T,
            "seconds": round(time.perf_counter() - t0, 1)}


def show(row: dict, args) -> None:
    print(f"{row['run']} ({row['split']}, n={row['n']}, trained with T={row['T_trained']}, {row['seconds']} s)")
    for T, r in row["by_T"].items():
        steps = " ".join(f"{k}:{v:.0%}" for k, v in sorted(r["accuracy_by_steps"].items()))
        mark = " (trained)" if int(T) == row["T_trained"] else ""
        print(f"  T={T:>2}: {r['accuracy']:.1%}  by steps {steps}{mark}")


def extend(ap) -> None:
    ap.add_argument("--T", type=int, nargs="+", default=[1, 2, 3, 4, 6], help="Jacobi iterations to decode with")


def main(argv=None) -> list[dict]:
    return probe_main(argv, __doc__, 300, lambda run, a: passes(run, a.split, a.limit, a.T), show, extend)


if __name__ == "__main__":
    main()
