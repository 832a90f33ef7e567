"""How much of the answer survives in the KV target: two oracles over compressors and slot counts.

    python scripts/target_oracle.py --task synthetic:5-8:alternate --set stage0_steps=2000 --threads 2 \
        --grid crop:160 rkv:12 rkv:24 rkv:48 attention:12 stride:12 crop:12 \
        --out results/probes/teacher-oracle-a58-stage0.json
    python scripts/target_oracle.py --run runs/exp/NAME --grid rkv:12 rkv:24

For each ``compressor:M``, on the validation problems:

- ``teacher``: the model answers from its own compressed CoT cache in the teacher's layout (question, the M
  kept entries of every layer and head at their own positions, then the answer prompt;
  :func:`kava_lab.oracle.compressed_cache_answers`). Low means the target does not hold the answer: no KV
  matching can teach it. With M at least the CoT length (``crop:160``) nothing is evicted.
- with ``--run`` (a trained latent run) also ``target``: the same compressed cache placed in the student's
  latent slots (:func:`kava_lab.intervene.apply_target`), beside ``plain``, the student's own latents. Only
  meaningful for a trained student: the stage-0 teacher has never seen ``<bot>``/``<eot>`` (measured: 2-4%
  whatever the compressor, even with the whole CoT in the slots).

Without ``--run`` the weights are the stage-0 backbone (the CoT teacher every student starts from).
Both oracles read the gold CoT: diagnostics of the target, never a method's accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kava_lab.config import apply_overrides, get_preset  # noqa: E402
from kava_lab.evaluate import evaluate  # noqa: E402
from kava_lab.loaders import load_examples  # noqa: E402
from kava_lab.oracle import compressed_cache_answers  # noqa: E402


def with_slots(student, latent):
    """The same weights and projection with another number of latent slots."""
    from kava_lab.student import Student

    other = Student(student.model, latent, eos_id=student.eos_id, eot_id=student.eot_id)
    other.projection = student.projection
    return other


def main(argv=None) -> dict:
    from kava_lab.runs import build_student, load_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a trained latent run folder (default: the stage-0 backbone)")
    ap.add_argument("--task", default=None, help="synthetic task, e.g. synthetic:5-8:alternate")
    ap.add_argument("--trace", default="nl", choices=("nl", "equation"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--grid", nargs="+", default=["rkv:12"], help="compressor:M points, e.g. rkv:12 stride:24")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.run:
        student, backbone, base = load_run(args.run)
        base = apply_overrides(base, args.overrides)
    else:
        overrides = list(args.overrides)
        if args.task:
            overrides = [f"data.train={args.task}", f"data.eval={args.task}"] + overrides
        base = apply_overrides(get_preset("tiny", "kava", trace=args.trace), overrides)
        student, backbone = build_student(base)  # the stage-0 backbone, an untrained projection
    examples = load_examples(base.data.eval, split=args.split, trace=args.trace, limit=args.limit)
    rows = []
    for point in args.grid:
        method, _, m = point.partition(":")
        if not m.isdigit():
            raise SystemExit(f"--grid {point!r}: expected compressor:M, e.g. rkv:12")
        cfg = apply_overrides(base, [f"compress.method={method}", f"latent.M={m}"])
        slots = student if cfg.latent.M == student.cfg.M else with_slots(student, cfg.latent)
        t0 = time.perf_counter()
        teacher = compressed_cache_answers(student.model, backbone, cfg, examples, int(m))
        row = {"compressor": method, "M": int(m), "kept_fraction": round(teacher["kept_fraction"], 4),
               "teacher": teacher["accuracy"], "teacher_by_steps": teacher["accuracy_by_steps"]}
        line = (f"{method:>10} M={m:>3} (keeps {teacher['kept_fraction']:6.1%} of the CoT): "
                f"teacher {teacher['accuracy']:6.1%}")
        if args.run:
            plain = evaluate(slots, backbone, cfg, examples, batch_size=64)
            target = evaluate(slots, backbone, cfg, examples, batch_size=64, intervene="target")
            row.update(plain=plain["accuracy"], target=target["accuracy"], target_by_steps=target["accuracy_by_steps"])
            line += f"  student layout: plain {plain['accuracy']:6.1%}, target {target['accuracy']:6.1%}"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(line, f" by steps {teacher['accuracy_by_steps']}", flush=True)
    record = {"weights": args.run or f"stage 0 ({base.stage0_steps} CoT steps)", "task": base.data.eval,
              "split": args.split, "n": len(examples), "trace": args.trace, "overrides": args.overrides,
              "lam": base.compress.lam, "kv_keys": base.loss.kv_keys, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"-> {args.out}")
    return record


if __name__ == "__main__":
    main()
