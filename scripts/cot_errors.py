"""Where a CoT on the shuffled synthetic walk first goes wrong: each wrong prediction's first step that does not
copy its fact, sorted into kinds.

    python scripts/cot_errors.py RUN/predictions-synthetic_3-5_shuffled-val.jsonl [--json]

``kava-lab eval RUN --split val`` writes the predictions file. On the shuffled walk each CoT step opens by copying
the fact it applies (``<< Ben gives Anna + 3: 12+3=15>>``, synthetic v8), so a step's source, target, operator
and operand can be checked against the question's facts. Kinds, of the first step that differs: the right
operator with the operand of another fact that has the same operator (a binding error between facts); another
fact's operator and operand; the right operator with an operand in no fact; a transfer the question does not
state; other. Wrong predictions whose written steps all copy their facts fall in "no step copies a fact wrongly"
(an arithmetic slip, a missing step or the answer step). Also the accuracy on problems where two facts share an
operator and where none do. Only for the shuffled walk, whose steps copy their facts in both trace styles.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kava_lab.synthetic import FACT  # noqa: E402
KINDS = ("right operator, operand of another fact with it", "another fact's operator and operand",
         "right operator, operand in no fact", "a transfer the question does not state", "other",
         "no step copies a fact wrongly")


def first_error(question: str, output: str) -> str:
    """The kind of the first written step that does not copy its fact (``KINDS``)."""
    facts = {(a, b): (op, n) for a, b, op, n in FACT.findall(question)}
    for a, b, op, n in FACT.findall(output):
        if (a, b) not in facts:
            return KINDS[3]
        if (op, n) == facts[(a, b)]:
            continue
        others = [v for k, v in facts.items() if k != (a, b)]
        if op == facts[(a, b)][0]:
            return KINDS[0] if (op, n) in others else KINDS[2]
        return KINDS[1] if (op, n) in others else KINDS[4]
    return KINDS[5]


def shares_operator(question: str) -> bool:
    """Whether two of the question's facts have the same operator (what a binding error needs)."""
    ops = [op for _a, _b, op, _n in FACT.findall(question)]
    return len(ops) != len(set(ops))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for number, line in enumerate(args.predictions.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append((bool(row["correct"]), row["question"], row["output"]))
        except (json.JSONDecodeError, KeyError) as err:
            sys.exit(f"{args.predictions}:{number}: not a prediction row ({type(err).__name__}: {err}); expected "
                     "JSON with 'correct', 'question' and 'output'")
    kinds = collections.Counter(first_error(q, out) for ok, q, out in rows if not ok)
    by_sharing = {}
    for shared in (True, False):
        group = [ok for ok, q, _out in rows if shares_operator(q) == shared]
        by_sharing["some facts share an operator" if shared else "no two facts share an operator"] = {
            "n": len(group), "accuracy": sum(group) / len(group) if group else None}
    summary = {"predictions": str(args.predictions), "n": len(rows), "wrong": sum(kinds.values()),
               "first_error": {k: kinds[k] for k in KINDS if kinds[k]}, "by_operator_sharing": by_sharing}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['n']} predictions, {summary['wrong']} wrong; first step that does not copy its fact:")
        for kind, count in summary["first_error"].items():
            print(f"  {count:4d}  {kind}")
        for group, figures in by_sharing.items():
            accuracy = "-" if figures["accuracy"] is None else f"{100 * figures['accuracy']:.1f}%"
            print(f"  accuracy where {group}: {accuracy} of {figures['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
