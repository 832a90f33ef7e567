"""Is the KV target reachable through the latent inputs at all? With a trained student's weights fixed, fit the
M latent inputs of each problem directly (Adam on ``[B, M, D]``) to the run's own KV loss, and report the
distance over the content-free floor next to the trained loop's.

    python scripts/input_reach.py runs/exp/s47c-kava-combo-4800 --limit 128 --steps 300 \
        --out results/probes/input-reach-s47c.json [--merge]

Four figures per run, each the KV loss (the run's keys, weights, normalisation) over its floor, on held-out
problems: ``loop``, the trained latent loop's final pass; ``loop_forced``, the same inputs over the true
compressed past (slot j reads the target's slots < j: Student.forced_pass, loss.a_tf); ``fitted``, inputs
fitted per problem through an ordinary causal pass (slot j reads the fitted slots < j), the floor of what any
latent loop, projection or number of iterations can reach with these weights, since every loop's final pass
is that function of its inputs; ``fitted_forced``, fitted over the true past. A ``fitted`` far under ``loop``
says the target is reachable and the loop does not compute the inputs that reach it; ``fitted`` near ``loop``
says no inputs reach it with these weights.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kava_lab.backbone import forward_cached  # noqa: E402
from kava_lab.encoding import Collator, encode  # noqa: E402
from kava_lab.intervene import compress_target  # noqa: E402
from kava_lab.loaders import load_examples  # noqa: E402
from kava_lab.probe.records import probe_main  # noqa: E402
from kava_lab.runs import load_run, target_teacher  # noqa: E402
from kava_lab.student import fork_cache, stack_kv  # noqa: E402
from kava_lab.teacher import extract_teacher  # noqa: E402
from kava_lab.train import KaVaObjective  # noqa: E402


def _ratio(objective, keys, values, target, ext, sb, tb) -> tuple[torch.Tensor, float]:
    kv, floor = objective._kv_terms(keys, values, target, ext, sb, tb)
    return kv, float(kv.detach() / floor)


def batch_reach(student, cfg, objective, sb, tb, teacher, steps: int, lr: float) -> dict[str, float]:
    """The four ratios (see the module docstring) on one batch."""
    P, M, model = sb.P, sb.M, student.model
    with torch.no_grad():
        ext = extract_teacher(teacher, tb, with_logits=False)
        target = compress_target(ext, cfg, M)
        loop = student(sb)  # the trained loop: its latent K/V, inputs and [question, <bot>, latents] cache
        keys, values = loop.latent_keys, loop.latent_values
        question = fork_cache(loop.latent_cache)
        question.crop(-M)  # [question, <bot>]
        true_past = objective._target_cache(loop, target, sb, tb)  # the target in the slots, as loss.a_tf reads it

    def free(z):  # an ordinary causal pass of the M inputs over [question, <bot>]: the last pass of any loop
        _, cache = forward_cached(model, fork_cache(question), inputs_embeds=z,
                                  attention_mask=sb.attention_mask[:, :P + M],
                                  position_ids=sb.position_ids[:, P:P + M], logits_to_keep=1)
        return stack_kv(cache, P, P + M)

    def forced(z):  # over the true compressed past
        return student.forced_pass(sb, fork_cache(true_past), z)

    out = {}
    with torch.no_grad():
        out["loop"] = _ratio(objective, keys, values, target, ext, sb, tb)[1]
        out["loop_forced"] = _ratio(objective, *forced(loop.latents), target, ext, sb, tb)[1]
    for name, run in (("fitted", free), ("fitted_forced", forced)):
        z = loop.latents.detach().clone().requires_grad_(True)  # start from the loop's own inputs
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            kv, _ = _ratio(objective, *run(z), target, ext, sb, tb)
            opt.zero_grad()
            kv.backward()
            opt.step()
        with torch.no_grad():
            out[name] = _ratio(objective, *run(z), target, ext, sb, tb)[1]
        out[name + "_input_norm"] = float(z.detach().norm(dim=-1).mean())
    out["loop_input_norm"] = float(loop.latents.norm(dim=-1).mean())
    return out


def reach(run_dir: str, split: str, limit: int, steps: int, lr: float, batch_size: int) -> dict:
    t0 = time.perf_counter()
    student, backbone, cfg = load_run(run_dir)
    student.eval().requires_grad_(False)
    examples = load_examples(cfg.data.eval, split=split, trace=cfg.data.trace, limit=limit)
    objective = KaVaObjective(student, cfg)
    collate, teacher = Collator.for_backbone(backbone), target_teacher(cfg, student)
    rows = []
    for start in range(0, len(examples), batch_size):
        items = [encode(e, backbone.tokenizer, cfg.encoding, with_cot=True)
                 for e in examples[start:start + batch_size]]
        tb, sb = collate(items, "teacher"), collate(items, "student", M=cfg.latent.M)
        rows.append((len(items), batch_reach(student, cfg, objective, sb, tb, teacher, steps, lr)))
    n = sum(k for k, _ in rows)
    mean = {key: sum(k * r[key] for k, r in rows) / n for key in rows[0][1]}
    return {"run": Path(run_dir).name, "split": split, "n": n, "steps": steps, "lr": lr,
            **{k: round(v, 4) for k, v in mean.items()}, "seconds": round(time.perf_counter() - t0, 1)}


def _arguments(ap) -> None:
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300, help="Adam steps fitting the inputs")
    ap.add_argument("--lr", type=float, default=0.05)


def show(row: dict, args) -> None:
    print(f"{row['run']} (n={row['n']}, {row['steps']} Adam steps, {row['seconds']} s): KV loss / floor  "
          f"loop {row['loop']:.3f}  loop over the true past {row['loop_forced']:.3f}  fitted inputs "
          f"{row['fitted']:.3f}  fitted over the true past {row['fitted_forced']:.3f}  (input norms: loop "
          f"{row['loop_input_norm']:.2f}, fitted {row['fitted_input_norm']:.2f})")


def main(argv=None) -> list[dict]:
    return probe_main(argv, __doc__, 128,
                      lambda run, a: reach(run, a.split, a.limit, a.steps, a.lr, a.batch_size), show, _arguments)


if __name__ == "__main__":
    main()
