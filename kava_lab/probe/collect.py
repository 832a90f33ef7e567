"""Collecting what the probes read: one :class:`ProbeData` from batched teacher and recorded student passes.

Shapes: ``I`` iterations (Jacobi: prefill + T passes; sequential: 1), ``B`` examples, ``L`` layers, ``H`` KV
heads, ``M`` slots, ``d`` head dim, ``D`` hidden size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Temporarily cap torch's intra-op threads (restored in ``finally``). Thousands of tiny batched SVDs and
    matmuls gain nothing from threads, and on a busy CPU the thread pool's spin-waits cost 20-100x."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def trajectory_tensor(trajectory: list[dict], which: str = "outputs") -> tuple[Tensor, list[str]]:
    """Stack a recorded :attr:`LatentState.trajectory` into ``[I, B, M, D]`` with one label per iteration.

    Jacobi: one entry per pass, prefill first (its inputs are the placeholders: ``which="inputs"`` skips
    it). Sequential: entries are per slot; they form one iteration (``I = 1``).
    """
    if which not in ("outputs", "inputs"):
        raise ValueError(f"which must be 'outputs' or 'inputs', found {which!r}")
    if not trajectory:
        raise ValueError("empty trajectory: run latent_loop(batch, record=True)")
    if "slot" in trajectory[0]:  # sequential: [B, 1, D] per slot
        return torch.cat([t[which] for t in trajectory], 1)[None], ["sequential"]
    steps, labels = [], []
    for t, entry in enumerate(trajectory):
        if entry[which] is None:
            continue
        steps.append(entry[which])
        labels.append("prefill" if t == 0 else f"iteration {t}")
    return torch.stack(steps, 0), labels


@torch.no_grad()
def latent_hidden_states(student, batch, latents: Tensor) -> Tensor:
    """Hidden states of every layer (embedding output first) at the latent columns of the final latent pass:
    ``[B, L+1, M, D]``. Re-runs ``[question, <bot>]`` plus the final pass's latent inputs ``latents``
    ``[B, M, D]`` in one causal forward, which equals the cached passes of both Jacobi and sequential mode.
    Layer ``L`` (the last) is after the final norm when the family returns it so (transformers 5 does)."""
    P, M, model = batch.P, batch.M, student.model
    emb = model.get_input_embeddings()(batch.input_ids[:, :P])
    x = torch.cat([emb, latents.to(emb.dtype)], 1)
    out = model(inputs_embeds=x, attention_mask=batch.attention_mask[:, :P + M],
                position_ids=batch.position_ids[:, :P + M], output_hidden_states=True, use_cache=False)
    return torch.stack(out.hidden_states, 1)[:, :, P:P + M]


@dataclass
class ProbeData:
    """Everything the probes read, for ``B`` held-out examples (CPU, float32)."""

    examples: list  # [B] Example
    mode: str  # "jacobi" or "sequential"
    M: int
    trajectory: Tensor  # [I, B, M, D] last-layer hidden states of the latent slots per iteration
    iteration_labels: list[str]  # [I]
    latent_inputs: Tensor  # [B, M, D] the final pass's latent inputs
    hidden: Tensor  # [B, L+1, M, D] all layers (embedding output first) at the latents, final pass
    student_keys: Tensor  # [B, L, H, M, d] student latent cache
    student_values: Tensor  # [B, L, H, M, d]
    teacher_keys: Tensor  # [B, L, H, M, d] compressed teacher cache
    teacher_values: Tensor  # [B, L, H, M, d]
    slot_mask: Tensor  # [B, M] bool, valid compressed slots (min(M, CoT length))
    kept_indices: Tensor  # [B, L, H, M] CoT positions kept per slot
    cot_ids: list[list[int]]  # [B] the teacher's CoT token ids
    compressor: str = ""

    def __len__(self) -> int:
        return len(self.examples)


@torch.no_grad()
def collect(student, backbone, cfg, examples: Sequence, batch_size: int = 32, compressor=None,
            progress: Callable[[str], None] | None = None, threads: int | str | None = "auto",
            teacher=None) -> ProbeData:
    """Run teacher (extraction + compression with the run's compressor unless given) and student (recorded
    latent loop, latent K/V, all hidden states) over ``examples``; returns a :class:`ProbeData`.

    ``student``/``backbone``/``cfg`` as returned by :func:`kava_lab.runs.load_run`. The teacher is the
    same model in teacher mode (self-distillation), reading each problem's CoT, unless ``teacher`` (a model,
    e.g. :func:`kava_lab.runs.target_teacher` of a run trained against a frozen teacher) is given.
    ``threads``: torch threads while collecting; ``"auto"`` uses one for models under 20M parameters (on a
    shared CPU, tiny matmuls run several times faster single-threaded) and leaves larger ones alone; None never
    changes it.
    """
    if threads == "auto":
        threads = 1 if sum(p.numel() for p in student.model.parameters()) < 20_000_000 else None
    with _torch_threads(threads):
        return _collect(student, backbone, cfg, examples, batch_size, compressor, progress, teacher)


def _collect(student, backbone, cfg, examples, batch_size, compressor, progress, teacher) -> ProbeData:
    from ..compress import compress_extraction, compressor_from_config, get_compressor
    from ..encoding import Collator, encode
    from ..student import stack_kv
    from ..teacher import extract_teacher

    if not cfg.uses_latents:
        raise ValueError(f"method {cfg.method!r} has no latents to probe; use a codi, pccot or kava run")
    if compressor is None:
        compressor = compressor_from_config(cfg.compress)
    elif isinstance(compressor, str):
        compressor = get_compressor(compressor)
    was_training = student.training
    student.eval()
    model, tok, M = student.model, backbone.tokenizer, cfg.latent.M
    device = next(model.parameters()).device
    collate = Collator.for_backbone(backbone)
    parts: dict[str, list] = {}
    cot_ids: list[list[int]] = []
    labels: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        items = [encode(e, tok, cfg.encoding, with_cot=True) for e in chunk]
        tb = collate(items, "teacher").to(device)
        sb = collate(items, "student", M=M).to(device)
        ext = extract_teacher(model if teacher is None else teacher, tb)
        comp = compress_extraction(ext, compressor, M, order=cfg.compress.order, scope=cfg.compress.scope)
        state = student.latent_loop(sb, record=True)
        keys, values = stack_kv(state.cache, sb.P, sb.P + M)
        traj, labels = trajectory_tensor(state.trajectory)
        hidden = latent_hidden_states(student, sb, state.latents)
        for name, t in (("trajectory", traj.transpose(0, 1)), ("latent_inputs", state.latents), ("hidden", hidden),
                        ("student_keys", keys), ("student_values", values), ("teacher_keys", comp.keys),
                        ("teacher_values", comp.values), ("slot_mask", comp.latent_mask),
                        ("kept_indices", comp.indices)):
            parts.setdefault(name, []).append(t.detach().cpu() if t.dtype in (torch.bool, torch.long)
                                              else t.detach().float().cpu())
        cot_ids += [list(it.cot) for it in items]
        if progress is not None:
            progress(f"collected {min(start + batch_size, len(examples))}/{len(examples)}")
    if was_training:
        student.train()
    cat = {k: torch.cat(v, 0) for k, v in parts.items()}
    return ProbeData(examples=list(examples), mode=student.cfg.mode, M=M,
                     trajectory=cat["trajectory"].transpose(0, 1).contiguous(), iteration_labels=labels,
                     latent_inputs=cat["latent_inputs"], hidden=cat["hidden"], student_keys=cat["student_keys"],
                     student_values=cat["student_values"], teacher_keys=cat["teacher_keys"],
                     teacher_values=cat["teacher_values"], slot_mask=cat["slot_mask"],
                     kept_indices=cat["kept_indices"], cot_ids=cot_ids, compressor=repr(compressor))
