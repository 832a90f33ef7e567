"""What does each step's latent say? The step decoder of ``loss.a_step`` (the backbone reading one latent, then
the step's tokens teacher-forced) scored token by token, by the token's role in a synthetic walk's step.

    python scripts/step_decode.py runs/exp/s47c-kava-combo-astep1-1600 [OTHER ...] --limit 256 \
        --out results/probes/step-decode-s47c.json [--merge]

A step of the synthetic walk reads "Maria gives Nina + 5, and Nina has 17 + 5 = 22 books." (NL) or
"<< Maria gives Nina + 5: 17+5=22>>" (equation). Roles: the first, second and third name (giver, receiver,
holder), the first to fourth number (operand, previous value, operand copy, result), the first operator and
its copies, and the other words (the item's name among them). With the step's own tokens forced, the copies and
the result follow from earlier tokens; the giver (the first token, read from the latent alone), the receiver and
the previous value are what the latent must carry. Control: the same decoding from another problem's latent
(the next row of the batch); a role whose accuracy does not drop under it is not read from the latent.
Meaningful for runs trained with ``loss.a_step`` > 0 (elsewhere nothing trained the backbone to decode a step
from a latent; the row records ``a_step``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kava_lab.encoding import Collator, encode  # noqa: E402
from kava_lab.loaders import load_examples  # noqa: E402
from kava_lab.probe.records import probe_main  # noqa: E402
from kava_lab.runs import load_run  # noqa: E402
from kava_lab.step_loss import step_decoder_logits, step_sequences  # noqa: E402
from kava_lab.synthetic import NAMES, parse_spec  # noqa: E402

NAME_ROLES = ("giver", "receiver", "holder")
NUMBER_ROLES = ("operand", "previous value", "operand copy", "result")
ROLES = NAME_ROLES + NUMBER_ROLES + ("operator", "operator copy", "other")


def token_roles(pieces: list[str]) -> list[str]:
    """The role of each decoded token of one step (see the module docstring); digits of one number share it."""
    names = {n for n, _, _ in NAMES}
    roles, n_names, n_numbers, n_ops, in_number = [], 0, 0, 0, False
    for piece in pieces:
        s = piece.strip()
        digit = s.isdigit()
        if digit and not in_number:
            n_numbers += 1
        in_number = digit
        if digit:
            roles.append(NUMBER_ROLES[min(n_numbers, 4) - 1])
        elif s in names:
            n_names += 1
            roles.append(NAME_ROLES[min(n_names, 3) - 1])
        elif s and all(c in "+-*/" for c in s):
            n_ops += 1
            roles.append("operator" if n_ops == 1 else "operator copy")
        else:
            roles.append("other")
    return roles


@torch.no_grad()
def decode_steps(student, backbone, cfg, examples, batch_size: int = 64) -> dict:
    """Token accuracy of every replaced step decoded from its own latent and from a donor's, by role and step."""
    collate, model, tok = Collator.for_backbone(backbone), student.model, backbone.tokenizer
    student.eval()
    counts: dict[tuple[str, str, int], list[int]] = {}  # (source, role, step) -> [correct, total]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        tb = collate([encode(e, tok, cfg.encoding, with_cot=True) for e in chunk], "teacher")
        sb = collate([encode(e, tok, cfg.encoding, with_cot=False) for e in chunk], "student", M=cfg.latent.M)
        latents = student(sb).latents  # [b, M, D]: the last pass's inputs, what the step decoder reads
        rows, slots, tokens = step_sequences(tb, latents.shape[1])
        step_of, seen = [], {}  # 1-based step of each sequence (step_sequences lists a row's steps in order)
        for r in rows.tolist():
            seen[r] = seen.get(r, 0) + 1
            step_of.append(seen[r])
        roles = [token_roles([tok.decode([int(x)]) for x in t]) for t in tokens]
        donor_rows = (rows + 1) % len(chunk)  # the next problem of the batch, the same slot
        for source, r in (("own", rows), ("donor", donor_rows)):
            logits, _ = step_decoder_logits(model, latents[r, slots], tokens)
            pred = logits.argmax(-1)  # [n, W]: position i predicts token i
            for i, t in enumerate(tokens):
                for j, role in enumerate(roles[i]):
                    c = counts.setdefault((source, role, step_of[i]), [0, 0])
                    c[0] += int(pred[i, j] == t[j])
                    c[1] += 1
    table: dict = {}
    for (source, role, step), (right, total) in sorted(counts.items()):
        cell = table.setdefault(source, {}).setdefault(role, {"right": 0, "n": 0, "by_step": {}})
        cell["right"] += right
        cell["n"] += total
        cell["by_step"][str(step)] = round(right / total, 4)
    for source in table.values():
        for cell in source.values():
            cell["accuracy"] = round(cell.pop("right") / cell["n"], 4)
    return table


def run_one(run_dir: str, split: str, limit: int) -> dict:
    t0 = time.perf_counter()
    student, backbone, cfg = load_run(run_dir)
    if not cfg.uses_latents:
        raise ValueError(f"{run_dir}: a {cfg.method!r} run has no latents to decode steps from")
    if not cfg.data.eval.startswith("synthetic") or parse_spec(cfg.data.eval)[2] != "shuffled":
        raise ValueError(f"{run_dir}: token roles are defined for synthetic walks (synthetic:LO-HI:shuffled); this "
                         f"run evaluates on {cfg.data.eval!r}")
    examples = load_examples(cfg.data.eval, split=split, trace=cfg.data.trace, limit=limit)
    table = decode_steps(student, backbone, cfg, examples)
    return {"run": Path(run_dir).name, "split": split, "n": len(examples), "a_step": cfg.loss.a_step,
            "roles": table, "seconds": round(time.perf_counter() - t0, 1)}


def show(row: dict, args) -> None:
    note = "" if row["a_step"] > 0 else " (a_step=0: this decoder was never trained)"
    print(f"{row['run']} (n={row['n']}, {row['seconds']} s){note}: token accuracy of each step decoded from its "
          "own latent [from a donor's]; by step 1, 2, ...")
    own, donor = row["roles"].get("own", {}), row["roles"].get("donor", {})
    for role in (r for r in ROLES if r in own):
        steps = " ".join(f"{v:.2f}" for v in own[role]["by_step"].values())
        print(f"  {role:>15} {own[role]['accuracy']:.3f} [{donor[role]['accuracy']:.3f}]  n={own[role]['n']:>6}"
              f"  by step {steps}")


def main(argv=None) -> list[dict]:
    return probe_main(argv, __doc__, 256, lambda run, a: run_one(run, a.split, a.limit), show)


if __name__ == "__main__":
    main()
