"""How many steps of the chain do a trained student's latents hold? Linear probes for each step's intermediate
value, read from every layer at every latent slot, and from the <bot> column (the last prompt position, which
sees the question and no latent), on held-out problems.

    python scripts/hop_probe.py runs/exp/s47c-kava-combo-4800 [runs/exp/OTHER ...] --limit 1500 \
        --out results/probes/hop-probe-s47c.json [--merge]

Per step k (step 1 .. 7, then the answer): the best site's held-out accuracy for the value's last digit
(:func:`kava_lab.probe.linear_probes`, site chosen by leave-one-out on the probe's training problems), the
shuffled-label control at that site, and the majority-class rate (``--target holder``: who holds the count
after the step, the walk without its arithmetic); at four sites: the latent hidden states,
the <bot> column, the latent values, and the compressed target's values the KV loss aims at (the probe's
positive control). Steps the latents hold and the <bot> column does not are steps the latent loop computed. A latent probe that falls to its control after step 1 or 2 says the loop does not carry the walk
further; one above control at every step says the values are there and the answer fails to use them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kava_lab import probe  # noqa: E402
from kava_lab.encoding import Collator, encode  # noqa: E402
from kava_lab.loaders import load_examples  # noqa: E402
from kava_lab.probe.records import probe_main  # noqa: E402
from kava_lab.runs import load_run, target_teacher  # noqa: E402


@torch.no_grad()
def bot_hidden(student, backbone, cfg, examples, batch_size: int = 64) -> torch.Tensor:
    """Every layer's hidden state at the <bot> column (the last prompt position): ``[B, L+1, 1, D]``."""
    collate, model, out = Collator.for_backbone(backbone), student.model, []
    student.eval()
    for start in range(0, len(examples), batch_size):
        items = [encode(e, backbone.tokenizer, cfg.encoding, with_cot=True)
                 for e in examples[start:start + batch_size]]
        sb = collate(items, "student", M=cfg.latent.M)
        P = sb.P  # prompts are left-padded: column P - 1 is every example's <bot>
        h = model(input_ids=sb.input_ids[:, :P], attention_mask=sb.attention_mask[:, :P],
                  position_ids=sb.position_ids[:, :P], output_hidden_states=True, use_cache=False).hidden_states
        out.append(torch.stack(h, 1)[:, :, P - 1:P].float())  # [b, L+1, 1, D]
    return torch.cat(out, 0)


def _rows(result) -> list[dict]:
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in result.best()]


def hops(run_dir: str, split: str, limit: int, seed: int, target: str) -> dict:
    t0 = time.perf_counter()
    student, backbone, cfg = load_run(run_dir)
    examples = load_examples(cfg.data.eval, split=split, trace=cfg.data.trace, limit=limit)
    data = probe.collect(student, backbone, cfg, examples, batch_size=64, teacher=target_teacher(cfg, student))
    bot = bot_hidden(student, backbone, cfg, examples)
    B, L, H, M, d = data.student_values.shape
    sites = {  # each [B, layers, slots, features]
        "latents": data.hidden,  # hidden states at the latent slots, embedding output first
        "bot": bot,  # hidden states at <bot>
        "student_values": data.student_values.permute(0, 1, 3, 2, 4).reshape(B, L, M, H * d),
        # the compressed teacher cache the KV loss aims at (empty slots past a short CoT hold zeros)
        "target_values": data.teacher_values.permute(0, 1, 3, 2, 4).reshape(B, L, M, H * d),
    }
    out = {"run": Path(run_dir).name, "split": split, "n": len(examples), "M": data.M, "seed": seed,
           "target": target}
    for name, x in sites.items():
        out[name] = _rows(probe.linear_probes(x, examples, target=target, seed=seed))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _arguments(ap) -> None:
    ap.add_argument("--seed", type=int, default=0, help="the probes' train / held-out split")
    ap.add_argument("--target", default="last_digit", choices=probe.linear.TARGETS,
                    help="last_digit: 10-way accuracy; log_value: R^2 of log(1 + |value|); holder: accuracy "
                         "of who holds the count after the step (shuffled walks)")


def show(row: dict, args) -> None:
    metric = "accuracy" if args.target in probe.linear.CLASSES else "r2"
    print(f"{row['run']} (n={row['n']}, {row['seconds']} s): {args.target} probes, held-out {metric} at the "
          f"best site by leave-one-out [shuffled-label control there]; chance {[r['chance'] for r in row['bot']]}")
    names = ("latents", "bot", "student_values", "target_values")
    print("  " + " " * 8 + "".join(f"{n:>22}" for n in names))
    by = {n: {r["step"]: r for r in row[n]} for n in names}
    for step in [r["step"] for r in row["bot"]]:
        cells = [by[n].get(step) for n in names]
        print(f"  {step:>8}" + "".join(f"{c[metric]:>14.3f} [{c['control']:.3f}]" if c else f"{'-':>22}"
                                       for c in cells))


def main(argv=None) -> list[dict]:
    return probe_main(argv, __doc__, 1500, lambda run, a: hops(run, a.split, a.limit, a.seed, a.target), show,
                      _arguments)


if __name__ == "__main__":
    main()
