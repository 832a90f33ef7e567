"""Can the teacher answer from its compressed CoT cache? The KV objective's ceiling, in the teacher's layout.

KaVa trains the student's latent cache toward the teacher's CoT cache compressed to M entries per layer and
KV head. If the teacher itself cannot answer from that compressed cache, no amount of KV matching teaches
the student to: the target does not hold the answer. This oracle runs the teacher on each problem's gold
CoT (teacher-forced, as in training), keeps the question and the M compressed CoT entries of every layer
and head (post-RoPE, at their own positions: the cache R-KV would leave behind), then feeds the answer
prompt at its own positions and decodes the answer greedily. With M at least the CoT length nothing is
evicted and the answer is the teacher's own, given the gold CoT (a test checks the logits match).

It reads the gold CoT (and, through R-KV's importance, the gold answer's queries, as the training target
does): a diagnostic of the target, never a method's accuracy. The student-layout counterpart, on a trained
student, is the ``target`` intervention (:func:`kava_lab.intervene.apply_target`).
"""

from __future__ import annotations

import torch

from .config import RunConfig
from .data import Example, answers_match
from .encoding import Collator, encode
from .student import fork_cache, greedy_decode


@torch.no_grad()
def compressed_cache_answers(model, backbone, cfg: RunConfig, examples: list[Example], M: int,
                             batch_size: int = 64) -> dict:
    """Accuracy of ``model`` answering from ``[question, M compressed CoT entries]`` (``cfg.compress``);
    returns ``{"accuracy", "n", "M", "compressor", "kept_fraction", "accuracy_by_steps", "rows"}``."""
    from .evaluate import accuracy_by_steps, read_prediction
    from .intervene import compress_target, write_latents
    from .synthetic import n_steps
    from .teacher import extract_teacher

    tok = backbone.tokenizer
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collate = Collator.for_backbone(backbone)
    rows, kept, total = [], 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collate([encode(e, tok, cfg.encoding, with_cot=True) for e in chunk], "teacher").to(device)
        P = batch.P
        ext = extract_teacher(model, batch, with_logits=False, keep_cache=True)
        target = compress_target(ext, cfg, M)  # keys/values [B, L, H_kv, M, d] at their own positions
        cache = fork_cache(ext.cache)
        cache.crop(-(cache.get_seq_length() - P))  # the question columns of the same pass
        write_latents(cache, P, M, target.keys, target.values)  # appended after the question
        slots = target.latent_mask.to(batch.attention_mask.dtype)  # [B, M]: CoTs shorter than M leave gaps
        n_prompt = int((batch.anchor - batch.prompt_start).max()) + 1
        offs = torch.arange(n_prompt, device=device)[None]
        cols = (batch.prompt_start[:, None] + offs).clamp(max=batch.input_ids.shape[1] - 1)  # [B, n]
        suffix_mask = (offs <= (batch.anchor - batch.prompt_start)[:, None]).to(slots.dtype)  # right-padded
        gen = greedy_decode(model, cache, batch.input_ids.gather(1, cols),
                            torch.cat([batch.attention_mask[:, :P], slots, suffix_mask], 1),
                            batch.position_ids.gather(1, cols), backbone.eos_id, cfg.max_new_tokens)
        kept += int(target.n_kept.sum())
        total += int(batch.cot_len.sum())
        for i, e in enumerate(chunk):
            text = tok.decode(gen.tokens[i], skip_special_tokens=True)
            pred = read_prediction(cfg.encoding.answer_prompt + text, cfg.encoding.answer_prompt)
            rows.append({"id": e.id, "gold": e.answer_value, "pred": pred, "output": text, "steps": n_steps(e),
                         "correct": answers_match(pred, e.answer_value)})
    if was_training:
        model.train()
    n = len(rows)
    return {"accuracy": sum(r["correct"] for r in rows) / max(n, 1), "n": n, "M": M,
            "compressor": cfg.compress.method, "kept_fraction": kept / max(total, 1),
            "accuracy_by_steps": accuracy_by_steps(rows), "rows": rows}
