"""R-KV token scores over one layer's CoT cache (KaVa §3, kava-method.md §3): what :mod:`kava_lab.compress`
ranks tokens by, and what notebook 02's retained-attention figures measure.

- :func:`importance_scores` ``I``: the attention the answer span pays to each CoT token (GQA: max over the
  query heads of a KV group, on logits), through :func:`attention_mass` (masked softmax, mean over queries);
- :func:`redundancy_scores` ``R``: high for tokens unlike the others, in O(N d) (no N x N matrix).

Shapes: keys [B, H_kv, N, d], queries [B, H_q, A, d], key_mask [B, N], query_mask [B, A]; scores float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["importance_scores", "redundancy_scores", "attention_mass"]


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _all_valid(batch: int, n: int, device: torch.device) -> Tensor:
    return torch.ones(batch, n, dtype=torch.bool, device=device)


def _masked_softmax(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``x`` over ``dim`` restricted to ``mask``; 0 at masked entries; all-zero when nothing is
    valid (no NaN)."""
    x = x.masked_fill(~mask, torch.finfo(x.dtype).min)
    return torch.softmax(x, dim=dim).masked_fill(~mask, 0.0)


def _check_layer_shapes(keys: Tensor, queries: Tensor | None, key_mask: Tensor, query_mask: Tensor | None):
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, H_kv, N, d], found shape {tuple(keys.shape)}")
    b, h_kv, n, d = keys.shape
    if key_mask.shape != (b, n):
        raise ValueError(f"key_mask must be [B, N] = {(b, n)}, found {tuple(key_mask.shape)}")
    if queries is not None:
        if queries.dim() != 4 or queries.shape[0] != b or queries.shape[-1] != d:
            raise ValueError(
                f"queries must be [B, H_q, A, d] with B={b}, d={d}, found shape {tuple(queries.shape)}"
            )
        if queries.shape[1] % h_kv != 0:
            raise ValueError(f"H_q={queries.shape[1]} is not a multiple of H_kv={h_kv}")
        if query_mask is not None and query_mask.shape != (b, queries.shape[2]):
            raise ValueError(
                f"query_mask must be [B, A] = {(b, queries.shape[2])}, found {tuple(query_mask.shape)}"
            )


def importance_scores(keys: Tensor, queries: Tensor, key_mask: Tensor, query_mask: Tensor) -> Tensor:
    """Attention that the answer span pays to each CoT token, ``I`` of KaVa §3.

    Logits ``q_j·k_i/sqrt(d)``; under GQA the max over the query heads of each KV group (on logits);
    softmax over valid CoT tokens ``i``; mean over valid queries ``j``.

    keys [B, H_kv, N, d], queries [B, H_q, A, d], key_mask [B, N], query_mask [B, A] -> [B, H_kv, N] float32
    (sums to 1 over valid tokens when the example has a valid query and a valid token, else 0).
    The largest intermediate is the logits tensor ``[B, H_q, A, N]`` (float32), then ``[B, H_kv, A, N]``.
    """
    b, h_kv, n, d = keys.shape
    h_q, a = queries.shape[1], queries.shape[2]
    g = h_q // h_kv
    if n == 0:
        return keys.new_zeros(b, h_kv, 0, dtype=torch.float32)
    k = keys.float()
    # Query heads of one KV group are contiguous (transformers' repeat_kv layout): [B, H_kv, G*A, d].
    # Scaling q by 1/sqrt(d) first is the same as scaling the logits (and commutes with the max over G).
    q = queries.float() * (1.0 / math.sqrt(d))  # [B, H_q, A, d], a fresh (small) tensor
    q = q.masked_fill_(~query_mask[:, None, :, None], 0.0).reshape(b, h_kv, g * a, d)  # pad queries -> 0
    # A pad key only reaches its own logit column, which the key mask overwrites (NaN there is harmless).
    logits = torch.matmul(q, k.transpose(-1, -2))  # [B, H_kv, G*A, N], the largest intermediate
    logits = logits.view(b, h_kv, g, a, n).amax(dim=2)  # [B, H_kv, A, N]
    return attention_mass(logits, key_mask, query_mask)


def attention_mass(logits: Tensor, key_mask: Tensor, query_mask: Tensor) -> Tensor:
    """Masked softmax of answer-span logits over CoT tokens, averaged over valid queries: the last step of
    :func:`importance_scores`, shared with :func:`kava_lab.analysis.importance_from_logits`.

    logits [B, *, A, N] float32 (overwritten: these tensors dominate memory at large N), key_mask [B, N],
    query_mask [B, A] -> [B, *, N] (sums to 1 over valid tokens; 0 at pads and without a valid query/token).
    """
    lead = (slice(None),) + (None,) * (logits.dim() - 3)  # broadcast the masks over the * dims
    # Done in place; the normaliser Z and the mean over valid queries are folded into one weight per
    # query, applied with a matmul. A pad key's column is overwritten by the mask (NaN there is harmless).
    logits.masked_fill_(~key_mask[lead + (None, slice(None))], torch.finfo(logits.dtype).min)
    e = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # [B, *, A, N], unnormalised softmax
    z = e.sum(dim=-1)  # [B, *, A] >= 1
    n_q = query_mask.sum(dim=-1).clamp(min=1).to(z.dtype)  # [B]
    w = query_mask[lead].to(z.dtype) / (n_q[lead + (None,)] * z)  # [B, *, A]; 0 at pad queries
    mass = torch.matmul(w.unsqueeze(-2), e).squeeze(-2)  # [B, *, N]
    return mass.masked_fill_(~key_mask[lead], 0.0)  # pads (and examples with no valid token) -> 0


def redundancy_scores(keys: Tensor, key_mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Redundancy ``R`` of KaVa §3 in O(N d): high means unlike the other tokens.

    With unit keys ``k̂``, cosine matrix ``C`` (diagonal zeroed), token ``i`` scores the negative mean of
    column ``i`` over the ``n`` valid tokens, the zeroed diagonal included (kava-method.md §3; R-KV's own code
    averages the whole row), ``-(k̂_i·Σ_j k̂_j - k̂_i·k̂_i) / n``;
    ``R`` is the masked softmax of that over tokens. No ``N x N`` matrix and no normalised copy of the keys
    is formed: ``k̂_i·s = (k_i·s)/|k_i|`` with ``s = Σ_j k_j/|k_j|``.

    keys [B, H_kv, N, d], key_mask [B, N] -> [B, H_kv, N] float32 (sums to 1 over valid tokens, 0 at pads).
    """
    k = keys.float()
    km = key_mask[:, None, :]  # [B, 1, N]
    raw_norm = torch.linalg.vector_norm(k, dim=-1)  # [B, H_kv, N]
    norm = raw_norm.clamp(min=eps)
    inv = torch.where(km, 1.0 / norm, 0.0)  # 1/|k_j| at valid tokens, 0 at pads
    s = torch.matmul(inv.unsqueeze(-2), k)  # [B, H_kv, 1, d] = Σ_j valid k̂_j
    if not bool(torch.isfinite(s).all()):  # 0 * nan at a pad row poisons s: redo with pad rows zeroed
        s = torch.matmul(inv.unsqueeze(-2), k.masked_fill(~km.unsqueeze(-1), 0.0))
    dot = torch.matmul(k, s.transpose(-1, -2)).squeeze(-1) / norm  # [B, H_kv, N] = k̂_i · s
    self_sim = (raw_norm / norm).square()  # k̂_i·k̂_i (1 unless k_i == 0)
    col_sum = dot - self_sim  # pads are not in s; their entries are masked below
    n_valid = key_mask.sum(dim=-1).clamp(min=1).to(k.dtype)[:, None, None]  # [B, 1, 1]
    return _masked_softmax(-col_sum / n_valid, km, dim=-1)
