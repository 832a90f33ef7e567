"""Latent trajectories: hidden states of every slot and iteration on their top principal components, and
how much each Jacobi iteration still moves them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class TrajectoryProjection:
    coords: Tensor  # [I, B, M, k]
    explained: Tensor  # [k] fraction of variance per component
    mean: Tensor  # [D]
    components: Tensor  # [k, D]
    iteration_labels: list[str] = field(default_factory=list)

    def transform(self, hidden: Tensor) -> Tensor:
        """Project other hidden states ``[..., D]`` on the same components."""
        return (hidden.float() - self.mean) @ self.components.T


def project_trajectory(hidden: Tensor, n_components: int = 3, examples: Sequence[int] | None = None,
                       iteration_labels: list[str] | None = None) -> TrajectoryProjection:
    """PCA (SVD of the centred points) of latent hidden states ``[I, B, M, D]`` of all iterations, slots
    and examples (``examples`` selects some to fit on; all are projected)."""
    x = hidden.float()
    fit = x if examples is None else x[:, list(examples)]
    pts = fit.reshape(-1, x.shape[-1])
    mean = pts.mean(0)
    _, s, vh = torch.linalg.svd(pts - mean, full_matrices=False)
    k = min(n_components, vh.shape[0])
    var = s.pow(2)
    explained = var[:k] / var.sum().clamp(min=1e-12)
    comps = vh[:k]
    # deterministic sign: largest-magnitude loading positive
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True))).clamp(min=0) * 2 - 1
    comps = comps * sign
    coords = (x - mean) @ comps.T
    return TrajectoryProjection(coords, explained, mean, comps,
                                iteration_labels or [f"iteration {i}" for i in range(x.shape[0])])


def iteration_deltas(hidden: Tensor, slot_mask: Tensor | None = None) -> Tensor:
    """How much each iteration still moves the latents: ``[I-1, M]`` mean over examples of
    ``||h_t - h_{t-1}|| / ||h_{t-1}||`` for ``hidden`` ``[I, B, M, D]``. Near zero: converged."""
    x = hidden.float()
    rel = (x[1:] - x[:-1]).norm(dim=-1) / x[:-1].norm(dim=-1).clamp(min=1e-8)  # [I-1, B, M]
    if slot_mask is None:
        return rel.mean(1)
    m = slot_mask.float()[None]
    return (rel * m).sum(1) / m.sum(1).clamp(min=1)
