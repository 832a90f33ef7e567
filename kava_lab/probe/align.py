"""KV alignment: the student's latent K/V against the compressed teacher cache, slot by slot.

Per layer, cosine similarity between student slot ``i`` and teacher slot ``j`` (per KV head, then the head
mean) as an ``M x M`` matrix; the *diagonal score* (mean diagonal minus mean off-diagonal over valid slot
pairs) sums it up, next to a control that pairs each student with another problem's teacher cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def kv_cosine(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every student slot ``i`` with every teacher slot ``j``:
    ``[..., M, d]`` x ``[..., M, d]`` -> ``[..., M_student, M_teacher]``."""
    s = student.float() / student.float().norm(dim=-1, keepdim=True).clamp(min=eps)
    t = teacher.float() / teacher.float().norm(dim=-1, keepdim=True).clamp(min=eps)
    return s @ t.transpose(-1, -2)


def diagonal_score(cos: Tensor, slot_mask: Tensor | None = None, pool: tuple[int, ...] = ()) -> Tensor:
    """Mean diagonal minus mean off-diagonal of ``[..., M, M]`` matrices over valid slot pairs (both slots
    valid in ``slot_mask`` ``[..., M]``, broadcast over the leading dims): one score per leading index, or
    pooled over the leading dims ``pool`` (e.g. ``(0, 2)`` of ``[B, L, H, M, M]`` -> one score per layer)."""
    M = cos.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=cos.device)
    valid = torch.ones(cos.shape[:-1], dtype=torch.bool, device=cos.device) if slot_mask is None else slot_mask.bool()
    valid = valid.expand(cos.shape[:-1])
    pair = valid[..., :, None] & valid[..., None, :]
    diag, off = pair & eye, pair & ~eye
    dims = tuple(pool) + (-2, -1)
    d = (cos * diag).sum(dims) / diag.sum(dims).clamp(min=1)
    o = (cos * off).sum(dims) / off.sum(dims).clamp(min=1)
    return d - o


@dataclass
class KVAlignment:
    """Student latent K/V vs compressed teacher K/V, per layer (cosine per KV head, mean over heads)."""

    keys: Tensor  # [B, L, M, M] per example (head mean); entries of invalid slot pairs are NaN
    values: Tensor  # [B, L, M, M]
    slot_mask: Tensor  # [B, M]
    key_score: Tensor  # [L] diagonal score over all examples, heads and valid slots
    value_score: Tensor  # [L]
    key_control: Tensor  # [L] same with each student paired with another example's teacher cache
    value_control: Tensor  # [L]

    def mean(self, kind: str = "keys") -> Tensor:
        """[L, M, M] mean over examples of valid pairs (NaN where no example has both slots)."""
        x = getattr(self, kind)
        return torch.nanmean(x, 0) if x.shape[0] else x.sum(0)

    def summary(self) -> dict:
        return {"key_score": self.key_score.tolist(), "value_score": self.value_score.tolist(),
                "key_control": self.key_control.tolist(), "value_control": self.value_control.tolist(),
                "key_score_mean": float(self.key_score.mean()), "value_score_mean": float(self.value_score.mean())}


def _pooled_score(cos: Tensor, mask: Tensor) -> Tensor:
    """cos [B, L, H, M, M], mask [B, M] -> [L]: diagonal score pooled over examples, heads, valid pairs."""
    return diagonal_score(cos, mask[:, None, None, :], pool=(0, 2))


def kv_alignment(student_keys: Tensor, student_values: Tensor, teacher_keys: Tensor, teacher_values: Tensor,
                 slot_mask: Tensor | None = None) -> KVAlignment:
    """Cosine matrices and diagonal scores between student and compressed teacher latent caches, all
    ``[B, L, H, M, d]``; ``slot_mask`` ``[B, M]`` (or ``[B, L, H, M]``) marks valid teacher slots.

    The control rolls the teacher cache by one example (needs ``B >= 2``): a diagonal that survives it
    comes from positions (RoPE, slot order), not from what the student wrote into its latents.
    """
    B, L, H, M, _ = student_keys.shape
    if slot_mask is None:
        slot_mask = torch.ones(B, M, dtype=torch.bool)
    slot_mask = slot_mask.bool().cpu()
    if slot_mask.dim() == 4:
        slot_mask = slot_mask.flatten(1, 2).any(1)
    pair = slot_mask[:, :, None] & slot_mask[:, None, :]  # [B, M, M]
    out = {}
    for kind, s, t in (("key", student_keys, teacher_keys), ("value", student_values, teacher_values)):
        s, t = s.float().cpu(), t.float().cpu()
        cos = kv_cosine(s, t)  # [B, L, H, M, M]
        out[kind] = cos.mean(2).masked_fill(~pair[:, None], float("nan"))
        out[kind + "_score"] = _pooled_score(cos, slot_mask)
        if B >= 2:
            ctl = kv_cosine(s, t.roll(1, 0))
            out[kind + "_control"] = _pooled_score(ctl, slot_mask & slot_mask.roll(1, 0))
        else:
            out[kind + "_control"] = torch.full((L,), float("nan"))
    return KVAlignment(keys=out["key"], values=out["value"], slot_mask=slot_mask, key_score=out["key_score"],
                       value_score=out["value_score"], key_control=out["key_control"],
                       value_control=out["value_control"])


@dataclass
class ValueReach:
    """How close the student's latent values come to their compressed target, slot by slot, against the
    content-free floor (each problem predicted by the other problems' mean target: what every problem shares).

    ``ratio`` < 1 means the slot carries something specific to its problem; ~1 means it only reproduces what
    all problems share. Values carry no RoPE, so position plays no part (keys would need rotating back)."""

    distance: Tensor  # [L, M] mean per-entry distance, student vs target (valid slots only)
    floor: Tensor  # [L, M] the same for the leave-one-out mean target
    count: Tensor  # [M] valid examples per slot

    @property
    def ratio(self) -> Tensor:  # [L, M]
        return self.distance / self.floor.clamp(min=1e-12)

    def summary(self) -> dict:
        slot_ratio = self.distance.mean(0) / self.floor.mean(0).clamp(min=1e-12)  # [M] over layers
        return {"ratio_by_slot": slot_ratio.tolist(), "ratio_by_layer":
                (self.distance.mean(1) / self.floor.mean(1).clamp(min=1e-12)).tolist(),
                "ratio": float(self.distance.mean() / self.floor.mean().clamp(min=1e-12)),
                "count": self.count.tolist()}


def value_reach(student_values: Tensor, teacher_values: Tensor, slot_mask: Tensor, kind: str = "smooth_l1"
                ) -> ValueReach:
    """Student vs target latent values ``[B, L, H, M, d]`` (``slot_mask`` ``[B, M]``: valid target slots),
    each layer's residual divided by the std of that layer's target (as the KV loss with ``layer_std``);
    per layer and slot, the mean distance over heads, dims and the examples where the slot is valid, next to
    the same distance for the leave-one-out mean target (``kava_lab.losses.kv_content_floor``, per slot)."""
    from ..losses import _distance, _layer_std, full_mask, leave_one_out_mean

    s, t = student_values.float().cpu(), teacher_values.float().cpu()
    mask = slot_mask.bool().cpu()
    if mask.dim() == 4:
        mask = mask.flatten(1, 2).any(1)
    full = full_mask(mask, t)  # [B, L, H, M]
    std = _layer_std(t, full)[None, :, None, None, None]  # [1, L, 1, 1, 1]
    dist, w = _distance(kind), mask[:, None, :].float()  # w: [B, 1, M]
    out = []
    for pred in (s, leave_one_out_mean(t, full)):
        per = dist((pred - t) / std).mean(dim=(2, 4))  # [B, L, M]
        out.append((per * w).sum(0) / w.sum(0).clamp(min=1))  # [L, M]
    return ValueReach(distance=out[0], floor=out[1], count=mask.sum(0))
