"""The KaVa objective (kava-method.md §4): KV distillation, CODI distillation, and their combination.

    L = teacher_weight * L_teacher + L_student + a1 * L_CODI + a2 * L_KV
        (+ a_step * L_step + a_target * L_target + a_tf * L_KV_forced + a_direct * L_direct, optional)

Teacher-side tensors are always detached here, whatever the caller passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig

_DISTANCES = {
    "smooth_l1": lambda r: F.smooth_l1_loss(r, torch.zeros_like(r), reduction="none"),
    "l1": lambda r: r.abs(),
    "mse": lambda r: r.pow(2),
}


def _distance(kind: str):
    if kind not in _DISTANCES:
        raise ValueError(f"unknown KV loss {kind!r}; expected one of {sorted(_DISTANCES)}")
    return _DISTANCES[kind]


def _layer_std(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Std of ``target`` ``[B, L, H, M, d]`` per layer over valid entries (mask ``[B, L, H, M]``) -> ``[L]``."""
    m = mask[..., None].to(target.dtype).expand_as(target)
    count = m.sum(dim=(0, 2, 3, 4)).clamp(min=1)
    mean = (target * m).sum(dim=(0, 2, 3, 4)) / count
    var = (((target - mean[None, :, None, None, None]) ** 2) * m).sum(dim=(0, 2, 3, 4)) / count
    return var.sqrt().clamp(min=1e-6)


def full_mask(slot_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A slot mask ``[B, M]`` or ``[B, L, H, M]`` as ``[B, L, H, M]`` for K/V ``like`` ``[B, L, H, M, d]``."""
    if slot_mask.dim() == 2:
        return slot_mask[:, None, None, :].expand(like.shape[:4])
    return slot_mask


def kv_loss(student_k: torch.Tensor, student_v: torch.Tensor, teacher_k: torch.Tensor, teacher_v: torch.Tensor,
            slot_mask: torch.Tensor, kind: str = "smooth_l1", layer_std: bool = True,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(D(K~, K_s) + D(V~, V_s)) / 2`` over layers, KV heads, valid slots and dims, mean-reduced.

    student_k/v, teacher_k/v: ``[B, L, H_kv, M, d]``; slot_mask: ``[B, L, H_kv, M]`` (or ``[B, M]``).
    With ``layer_std`` each layer's residual is divided by the std of that layer's teacher target.
    ``weights`` ``[B, L, H_kv, M]`` (optional, e.g. :func:`importance_weights`) scale each entry's distance.
    """
    mask = full_mask(slot_mask, teacher_k).bool()
    n = mask.sum()
    if n == 0:
        return student_k.sum() * 0.0
    dist = _distance(kind)
    total = student_k.new_zeros(())
    for student, teacher in ((student_k, teacher_k), (student_v, teacher_v)):
        teacher = teacher.detach().to(student.dtype)
        residual = student - teacher
        if layer_std:
            residual = residual / _layer_std(teacher, mask)[None, :, None, None, None]
        per_entry = dist(residual).mean(-1)  # [B, L, H, M]
        if weights is not None:
            per_entry = per_entry * weights.detach().to(per_entry.dtype)
        total = total + per_entry[mask].sum() / n
    return total / 2


def importance_weights(importance: torch.Tensor, indices: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """Per-entry KV-loss weights from the answer's attention: ``importance`` ``[B, L, H_kv, N]`` (the
    attention the teacher's answer pays each CoT token, :func:`kava_lab.scores.importance_scores`) read at the
    kept entries ``indices`` ``[B, L, H_kv, M]``, normalised to mean 1 over the valid slots of each example,
    layer and head (so the term keeps its scale); 0 at invalid slots. Uniform importance gives all ones."""
    w = importance.gather(-1, indices).float() * slot_mask  # [B, L, H, M]
    count = slot_mask.sum(-1, keepdim=True).clamp(min=1)
    mean = w.sum(-1, keepdim=True) / count
    return torch.where(mean > 0, w / mean.clamp(min=1e-12), slot_mask.float())


def kv_content_floor(teacher_k: torch.Tensor, teacher_v: torch.Tensor, slot_mask: torch.Tensor,
                     kind: str = "smooth_l1", layer_std: bool = True,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """The KV loss of a content-free student: one that answers every problem with the mean target of the
    *other* problems in the batch (per layer, head and slot; leave-one-out). A diagnostic, never a loss term:
    ``kv`` below this floor means the latents carry something specific to their problem; ``kv`` near it means
    they only reproduce what every problem's compressed cache shares (position, slot order, common tokens).

    teacher_k/v: ``[B, L, H_kv, M, d]``; slot_mask: ``[B, L, H_kv, M]`` (or ``[B, M]``)."""
    with torch.no_grad():
        slot_mask = full_mask(slot_mask, teacher_k)
        return kv_loss(leave_one_out_mean(teacher_k, slot_mask), leave_one_out_mean(teacher_v, slot_mask),
                       teacher_k, teacher_v, slot_mask, kind=kind, layer_std=layer_std, weights=weights)


def leave_one_out_mean(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each example's prediction by the mean of the *other* examples' valid entries: ``target``
    ``[B, L, H, M, d]``, ``mask`` ``[B, L, H, M]`` -> ``[B, L, H, M, d]`` (masked rows enter no mean)."""
    m = mask[..., None].to(target.dtype)  # [B, L, H, M, 1]
    others = (m.sum(0, keepdim=True) - m).clamp(min=1)  # valid rows other than this one
    return ((target * m).sum(0, keepdim=True) - target * m) / others


def codi_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, norm: str = "global") -> torch.Tensor:
    """Smooth-L1 between anchor hidden states ``[B, L, D]``, each layer divided by a teacher scale.

    ``norm="global"``: the std of the teacher's states over batch and hidden dims (CODI's code divides by
    ``ref_selected.std()``). ``norm="examples"``: their spread across examples, ``sqrt(mean_d var_b)``: the
    part of the state that differs between problems, usually far smaller than the global scale."""
    teacher = teacher_hidden.detach().to(student_hidden.dtype)
    if norm == "global":
        std = teacher.std(dim=(0, 2))  # [L]
    elif norm == "examples":
        std = teacher.var(dim=0).mean(-1).sqrt() if teacher.shape[0] > 1 else teacher.std(dim=(0, 2))  # [L]
    else:
        raise ValueError(f"unknown CODI normalisation {norm!r}; expected 'global' or 'examples'")
    std = std.clamp(min=1e-6)
    residual = (student_hidden - teacher) / std[None, :, None]
    return F.smooth_l1_loss(residual, torch.zeros_like(residual))


def kava_objective(cfg: LossConfig, teacher_ce: torch.Tensor, student_ce: torch.Tensor | None = None,
                   codi: torch.Tensor | None = None, kv: torch.Tensor | None = None,
                   step: torch.Tensor | None = None, answer_weight: float = 1.0,
                   target_ce: torch.Tensor | None = None, kv_tf: torch.Tensor | None = None,
                   direct_ce: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Combine the terms; returns every term separately (``loss`` is the total) for logging.

    ``answer_weight`` scales the student's answer CE in the total (0 during a ``loss.answer_after`` warm-up:
    the term is still returned, for the log)."""
    terms = {"teacher_ce": teacher_ce}
    total = cfg.teacher_weight * teacher_ce
    if student_ce is not None:
        terms["student_ce"] = student_ce
        if answer_weight:
            total = total + answer_weight * student_ce
    if codi is not None:
        terms["codi"] = codi
        total = total + cfg.a1 * codi
    if kv is not None:
        terms["kv"] = kv
        total = total + cfg.a2 * kv
    if step is not None:
        terms["step_ce"] = step
        total = total + cfg.a_step * step
    if target_ce is not None:  # the answer read from the KV target in the latent slots (loss.a_target)
        terms["target_ce"] = target_ce
        total = total + cfg.a_target * target_ce
    if kv_tf is not None:  # the KV loss of the teacher-forced latent pass (loss.a_tf)
        terms["kv_tf"] = kv_tf
        total = total + cfg.a_tf * kv_tf
    if direct_ce is not None:  # the answer CE with the latent slots masked out (loss.a_direct)
        terms["direct_ce"] = direct_ce
        total = total + cfg.a_direct * direct_ce
    terms["loss"] = total
    return terms
