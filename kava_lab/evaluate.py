"""Evaluation: accuracy, forward passes, wall-clock and KV-cache bytes per question, batched.

Latent methods (codi, pccot, kava) run the latent loop then decode the answer greedily; ``cot`` decodes
its own chain of thought then the answer; ``nocot`` decodes the answer straight from the question. The
prediction is the last number after the answer prompt (or in the whole output if the prompt is missing),
commas removed, compared numerically with a tolerance. Forward passes are counted, not estimated.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import RunConfig
from .data import Example, answers_match, last_number
from .encoding import Collator, encode, without_answer
from .student import Student, greedy_decode


def kv_bytes_per_token(model) -> int:
    """Bytes one token occupies in the KV cache: 2 (K and V) x layers x KV heads x head dim x dtype size."""
    c = model.config
    layers = c.num_hidden_layers
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    from .analysis import kv_cache_bytes  # the one formula

    return kv_cache_bytes(1, layers, heads, head_dim, next(model.parameters()).dtype)


def read_prediction(text: str, answer_prompt: str) -> float | None:
    tail = text.split(answer_prompt)[-1] if answer_prompt in text else text
    return last_number(tail)


@torch.no_grad()
def evaluate(student: Student, backbone, cfg: RunConfig, examples: list[Example], batch_size: int = 64,
             predictions_path: str | Path | None = None, intervene: str | None = None, seed: int = 0,
             teacher=None) -> dict:
    """Evaluate ``student`` (trained as ``cfg.method``) on ``examples``; returns the summary dict.

    ``intervene`` (latent methods only): one of :data:`kava_lab.intervene.INTERVENTIONS`, applied to the
    latent cache of every batch before the answer is decoded; the donor of example ``i`` is example
    ``i + 1`` of its batch (see :func:`kava_lab.intervene.donor_index`). ``"target"`` (an oracle, see
    :data:`kava_lab.intervene.ORACLES`) puts the compressed teacher cache of the gold CoT in the latent slots;
    ``teacher``: the model that cache comes from (default the student's own; see
    :func:`kava_lab.runs.target_teacher` for a run trained against a frozen teacher)."""
    from .intervene import INTERVENTIONS, ORACLES, apply_intervention, apply_target, donor_index, kv_target
    from .synthetic import counterfactual_answer, n_steps

    if intervene is not None:
        if intervene not in INTERVENTIONS + ORACLES:
            raise ValueError(f"unknown intervention {intervene!r}; expected one of {INTERVENTIONS + ORACLES}")
        if not cfg.uses_latents:
            raise ValueError(f"intervention {intervene!r} needs a latent method; this run is {cfg.method!r}")
    model, tok = student.model, backbone.tokenizer
    was_training = student.training
    student.eval()
    device = next(model.parameters()).device
    collate = Collator.for_backbone(backbone)
    per_token = kv_bytes_per_token(model)
    rows = []
    positions = getattr(model.config, "max_position_embeddings", None)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if positions:
            check_positions(chunk, [len(encode(e, tok, cfg.encoding, with_cot=False).question) for e in chunk],
                            (cfg.latent.M + 1 if cfg.uses_latents else 0) + cfg.max_new_tokens, positions)
        if cfg.uses_latents:
            items = [without_answer(encode(e, tok, cfg.encoding, with_cot=False)) for e in chunk]
            batch = collate(items, "student", M=cfg.latent.M).to(device)
            hook = None
            if intervene == "target":  # the oracle: teacher-forced gold CoT, compressed as in training
                tbatch = collate([encode(e, tok, cfg.encoding, with_cot=True) for e in chunk], "teacher").to(device)
                target = kv_target(model if teacher is None else teacher, cfg, tbatch, cfg.latent.M)
                hook = lambda state, b: apply_target(model, state, b, target, tbatch, cfg.loss.kv_keys)
            elif intervene is not None and intervene != "hide":  # hide is a mask, not a cache edit
                hook = lambda state, b: apply_intervention(intervene, model, state, b, seed=seed)
            gen = student.generate(batch, max_new_tokens=cfg.max_new_tokens, latent_hook=hook,
                                   hide_latents=intervene == "hide")
            prefix_text = cfg.encoding.answer_prompt
        else:  # cot / nocot: the model writes everything after the question itself
            items = [replace(encode(e, tok, cfg.encoding, with_cot=False), prompt=(), answer=()) for e in chunk]
            batch = collate(items, "teacher").to(device)
            t0 = time.perf_counter()
            gen = greedy_decode(model, None, batch.input_ids, batch.attention_mask, batch.position_ids,
                                backbone.eos_id, cfg.max_new_tokens)
            gen.seconds = time.perf_counter() - t0
            gen.cache_tokens = batch.attention_mask.sum(1) + gen.lengths
            prefix_text = ""
        donors = donor_index(len(chunk)).tolist()
        for i, e in enumerate(chunk):
            text = tok.decode(gen.tokens[i], skip_special_tokens=True)
            pred = read_prediction(prefix_text + text, cfg.encoding.answer_prompt)
            row = {"id": e.id, "question": e.question, "gold": e.answer_value, "pred": pred,
                   "correct": answers_match(pred, e.answer_value), "output": text, "steps": n_steps(e),
                   "forward_passes": int(gen.forward_passes[i]),
                   "kv_bytes": int(gen.cache_tokens[i]) * per_token,
                   "latency_ms": 1000 * gen.seconds / len(chunk)}
            if intervene == "donor":
                donor = chunk[donors[i]]
                row.update({"donor_id": donor.id, "donor_gold": donor.answer_value,
                            "counterfactual": counterfactual_answer(e, donor)})
            rows.append(row)
    if was_training:
        student.train()
    n = len(rows)
    summary = {
        "method": cfg.method, "trace": cfg.data.trace, "n": n,
        "accuracy": sum(r["correct"] for r in rows) / max(n, 1),
        "forward_passes": sum(r["forward_passes"] for r in rows) / max(n, 1),
        "latency_ms": sum(r["latency_ms"] for r in rows) / max(n, 1),
        "kv_bytes": sum(r["kv_bytes"] for r in rows) / max(n, 1),
        "device": str(device), "batch_size": batch_size, "intervention": intervene,
        "accuracy_by_steps": accuracy_by_steps(rows),
    }
    if intervene == "donor":
        summary.update(donor_rates(rows))
    if predictions_path is not None:
        with open(predictions_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return summary


def check_positions(examples: list[Example], question_tokens: list[int], extra: int, positions: int) -> None:
    """Refuse a question longer than the model's positions; warn when the generation budget may run past them."""
    import warnings

    too_long = [(e.id, n) for e, n in zip(examples, question_tokens) if n >= positions]
    if too_long:
        raise ValueError(f"{len(too_long)} question(s) longer than the model's {positions} positions, e.g. "
                         f"{too_long[0][0]!r} with {too_long[0][1]} tokens: shorten or filter them")
    tight = [(e.id, n) for e, n in zip(examples, question_tokens) if n + extra > positions]
    if tight:
        warnings.warn(f"{len(tight)} question(s) plus latents and the generation budget ({extra} tokens) may run "
                      f"past the model's {positions} positions, e.g. {tight[0][0]!r} ({tight[0][1]} question tokens)")


def evaluate_interventions(student: Student, backbone, cfg: RunConfig, examples: list[Example],
                           kinds: tuple[str, ...] | None = None, batch_size: int = 64,
                           teacher=None) -> dict[str, dict]:
    """``{"plain": summary, kind: summary, ...}``: the untouched run next to each latent intervention
    (by default all of :data:`kava_lab.intervene.INTERVENTIONS`, and the ``target`` oracle when every example
    has a reasoning trace and the run has a KV target; none for cot / nocot). ``teacher``: as in :func:`evaluate`."""
    from .intervene import INTERVENTIONS, ORACLES

    out = {"plain": evaluate(student, backbone, cfg, examples, batch_size=batch_size)}
    if kinds is None:
        with_target = cfg.loss.a2 > 0 and all(e.steps for e in examples)
        kinds = INTERVENTIONS + (ORACLES if with_target else ())
    if cfg.uses_latents:
        for kind in kinds:
            out[kind] = evaluate(student, backbone, cfg, examples, batch_size=batch_size, intervene=kind,
                                 teacher=teacher)
    return out


def accuracy_by_steps(rows: list[dict]) -> dict[str, float]:
    """Accuracy per number of reasoning steps of the problem (keys are strings, for JSON)."""
    groups: dict[int, list[bool]] = {}
    for r in rows:
        groups.setdefault(r["steps"], []).append(bool(r["correct"]))
    return {str(k): sum(v) / len(v) for k, v in sorted(groups.items())}


def donor_rates(rows: list[dict]) -> dict:
    """How often donor-swapped predictions equal the donor's answer or the counterfactual answer.

    Counted only on rows where the three numbers (gold, donor's gold, counterfactual) differ, and the
    example is not its own donor, so each rate says what the prediction followed."""
    usable = [r for r in rows if r.get("counterfactual") is not None and r["donor_id"] != r["id"]
              and len({r["gold"], r["donor_gold"], r["counterfactual"]}) == 3]
    n = len(usable)
    hit = lambda key: sum(answers_match(r["pred"], r[key]) for r in usable) / n if n else None
    return {"donor_rows": n, "counterfactual_rate": hit("counterfactual"), "donor_answer_rate": hit("donor_gold"),
            "gold_rate_on_donor_rows": hit("gold")}


def evaluate_run(run_dir: str | Path, eval_source: str | None = None, split: str | None = None,
                 limit: int | None = None, batch_size: int = 64, device=None, write: bool = True,
                 trace: str | None = None) -> dict:
    """Load a run folder and evaluate it on its configured eval set (or ``eval_source``)."""
    from .loaders import load_examples
    from .runs import load_run

    run_dir = Path(run_dir)
    if device is None and torch.cuda.is_available():
        device = "cuda"  # a GPU machine evaluates there (training's accelerate already moved it; loading does not)
    student, backbone, cfg = load_run(run_dir, device=device)
    own = eval_source is None and split is None  # the run's own eval set: eval.json; anything else: its own file
    source = eval_source or cfg.data.eval
    split = split if (eval_source or split) else cfg.data.eval_split
    trace = trace or (cfg.data.trace if cfg.data.trace != "both" else "equation")
    examples = load_examples(source, split=split, trace=trace,
                             limit=limit if limit is not None else cfg.data.eval_limit)
    if not examples:
        raise ValueError(f"no examples to evaluate: {source!r} split {split!r} is empty")
    tag = "" if own else f"-{Path(str(source)).name.replace(':', '_')}-{split or 'default'}"
    summary = evaluate(student, backbone, cfg, examples, batch_size=batch_size,
                       predictions_path=run_dir / f"predictions{tag}.jsonl" if write else None)
    summary.update({"run": str(run_dir), "eval_source": source, "eval_split": split})
    if write:
        (run_dir / f"eval{tag}.json").write_text(json.dumps(summary, indent=2))
    return summary
