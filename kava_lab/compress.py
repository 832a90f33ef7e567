"""Compress the teacher's CoT KV cache to M entries per layer and KV head (R-KV style eviction).

One small contract, one shared selector, tiny implementations (the kvpress shape):

- :meth:`Compressor.score` scores every CoT token of one layer::

      keys        [B, H_kv, N, d]   post-RoPE CoT keys, as the cache holds them
      queries     [B, H_q,  A, d]   post-RoPE answer-span queries (H_q a multiple of H_kv)
      key_mask    [B, N]    bool    True at real CoT tokens
      query_mask  [B, A]    bool    True at real answer-span queries
      -> scores   [B, H_kv, N]      float32, higher = keep; ``-inf`` at pad positions

- :func:`select` turns scores into ``M`` kept positions per (example, KV head): pads are never chosen,
  exactly ``min(M, valid tokens)`` slots are valid, time order by default.
- :func:`compress_extraction` runs both over a whole teacher extraction (all layers at once, ``L`` folded
  into the batch) and gathers the kept K/V rows into a :class:`Compressed`.
- :func:`scope_scores` (``compress.scope``) optionally averages the scores over a layer's KV heads, or over every
  layer and head, before selection: one kept set per layer, or one for the whole cache (the paper: per head).

Implementations (:data:`COMPRESSORS`, :func:`get_compressor`): ``rkv`` (``S = lam*I + (1-lam)*R``, the
KaVa default, ``lam=0.1``), ``attention`` (``lam=1``), ``redundancy`` (``lam=0``), ``crop`` (first M),
``stride`` (evenly spaced over the valid tokens), ``random`` (seeded) and ``knorm`` (smallest key L2 norm).

The scores themselves (importance ``I``, redundancy ``R``) live in :mod:`kava_lab.scores`.
Everything is vectorised over batch, layers and heads, device-agnostic, and computes scores in float32
whatever the input dtype. The redundancy term never forms the ``N x N`` cosine matrix: the column sum of
``C`` (diagonal zeroed) is ``k̂_i · Σ_j k̂_j - k̂_i · k̂_i``, so it costs ``O(N d)`` time and memory.
See ``docs/kava-method.md`` §3 for the method.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor

from .scores import _all_valid, _check_layer_shapes, importance_scores, redundancy_scores  # noqa: F401 (re-exported)

__all__ = [
    "Compressor",
    "RKVCompressor",
    "AttentionCompressor",
    "RedundancyCompressor",
    "CropCompressor",
    "StrideCompressor",
    "RandomCompressor",
    "KnormCompressor",
    "COMPRESSORS",
    "get_compressor",
    "select",
    "Compressed",
    "compress_extraction",
    "scope_scores",
    "SCOPES",
    "importance_scores",
    "redundancy_scores",
]

_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------------------------------------


class Compressor:
    """Scores every CoT token of one layer; :func:`select` keeps the top ``M``.

    Subclasses implement :meth:`_score`; :meth:`score` validates shapes, fills default masks and sets pad
    positions to ``-inf``. ``budget`` (the M that :func:`select` will use) is passed by
    :func:`compress_extraction` for position-based methods that need it (``stride``); score-based methods
    ignore it.
    """

    name: str = "base"
    uses_queries: bool = False

    def score(
        self,
        keys: Tensor,
        queries: Tensor | None,
        key_mask: Tensor | None = None,
        query_mask: Tensor | None = None,
        *,
        budget: int | None = None,
    ) -> Tensor:
        """keys [B, H_kv, N, d], queries [B, H_q, A, d], key_mask [B, N], query_mask [B, A]
        -> scores [B, H_kv, N] float32, ``-inf`` at pads. Masks default to all-valid."""
        b, _, n, _ = keys.shape
        if key_mask is None:
            key_mask = _all_valid(b, n, keys.device)
        key_mask = key_mask.to(device=keys.device, dtype=torch.bool)
        if queries is not None and query_mask is None:
            query_mask = _all_valid(b, queries.shape[2], keys.device)
        if query_mask is not None:
            query_mask = query_mask.to(device=keys.device, dtype=torch.bool)
        if self.uses_queries and queries is None:
            raise ValueError(f"compressor {self.name!r} needs the answer-span queries")
        _check_layer_shapes(keys, queries, key_mask, query_mask)
        scores = self._score(keys, queries, key_mask, query_mask, budget)
        return scores.float().masked_fill(~key_mask[:, None, :], _NEG_INF)

    def _score(self, keys, queries, key_mask, query_mask, budget) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class RKVCompressor(Compressor):
    """R-KV mix ``S = lam*I + (1-lam)*R`` (KaVa default ``lam=0.1``). ``lam`` 1 or 0 skips the unused term,
    so ``rkv`` with ``lam=1``/``lam=0`` is exactly ``attention``/``redundancy``."""

    name = "rkv"

    def __init__(self, lam: float = 0.1, eps: float = 1e-8):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], found {lam}")
        self.lam = float(lam)
        self.eps = eps

    @property
    def uses_queries(self) -> bool:  # type: ignore[override]
        return self.lam > 0

    def _score(self, keys, queries, key_mask, query_mask, budget):
        if self.lam == 1.0:
            return importance_scores(keys, queries, key_mask, query_mask)
        if self.lam == 0.0:
            return redundancy_scores(keys, key_mask, self.eps)
        imp = importance_scores(keys, queries, key_mask, query_mask)
        red = redundancy_scores(keys, key_mask, self.eps)
        return self.lam * imp + (1.0 - self.lam) * red


class AttentionCompressor(RKVCompressor):
    """Attention only (``rkv`` with ``lam=1``)."""

    name = "attention"

    def __init__(self):
        super().__init__(lam=1.0)


class RedundancyCompressor(RKVCompressor):
    """Redundancy only (``rkv`` with ``lam=0``)."""

    name = "redundancy"

    def __init__(self, eps: float = 1e-8):
        super().__init__(lam=0.0, eps=eps)


class CropCompressor(Compressor):
    """The first M valid CoT tokens: score ``-position``."""

    name = "crop"

    def _score(self, keys, queries, key_mask, query_mask, budget):
        b, h, n, _ = keys.shape
        pos = torch.arange(n, device=keys.device, dtype=torch.float32)
        return (-pos).expand(b, h, n)


class StrideCompressor(Compressor):
    """M positions evenly spaced over the valid tokens, first and last included:
    valid ranks ``round(linspace(0, n-1, M))`` (all of them when ``n <= M``).

    Needs the budget M: :func:`compress_extraction` passes it; for direct calls give ``budget=`` or ``M``
    at construction. Chosen tokens score in (1, 2], the others in (-1, 0], earlier first.
    """

    name = "stride"

    def __init__(self, M: int | None = None):
        self.M = M

    def _score(self, keys, queries, key_mask, query_mask, budget):
        m = budget if budget is not None else self.M
        if m is None:
            raise ValueError("stride needs the budget M: pass budget= to score() or M= to the constructor")
        b, h, n, _ = keys.shape
        km = key_mask.long()
        rank = km.cumsum(dim=-1) - 1  # [B, N] rank among valid tokens
        n_valid = km.sum(dim=-1, keepdim=True)  # [B, 1]
        # token of rank r is chosen iff r == round(j*(n-1)/(m-1)) for some j; the nearest j is
        # round(r*(m-1)/(n-1)). Exact integer arithmetic: round(p/q) = (2p + q) // (2q) for p, q >= 0.
        if m <= 1:
            chosen = rank == 0
        else:
            num = (n_valid - 1).clamp(min=1)
            j = (2 * rank.clamp(min=0) * (m - 1) + num) // (2 * num)
            chosen = (2 * j * (n_valid - 1) + (m - 1)) // (2 * (m - 1)) == rank
            chosen = chosen | (n_valid <= m)
        frac = rank.float() / n_valid.clamp(min=1).float()  # in [0, 1): earlier is higher after negation
        s = torch.where(chosen, 2.0 - frac, -frac)
        return s[:, None, :].expand(b, h, n)


class RandomCompressor(Compressor):
    """Uniformly random M of the valid tokens, independently per example, layer and head.

    Reproducible: draws come from a CPU ``torch.Generator`` seeded at construction (so the same on every
    device); two instances with the same seed give the same sequence of selections, and each call draws
    afresh. :meth:`reset` restarts the sequence.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)

    def _score(self, keys, queries, key_mask, query_mask, budget):
        b, h, n, _ = keys.shape
        return torch.rand(b, h, n, generator=self._gen).to(keys.device)


class KnormCompressor(Compressor):
    """Keep the smallest key L2 norms (kvpress ``KnormPress``): score ``-|k_i|``."""

    name = "knorm"

    def _score(self, keys, queries, key_mask, query_mask, budget):
        return -torch.linalg.vector_norm(keys.float(), dim=-1)


COMPRESSORS: dict[str, Callable[..., Compressor]] = {
    "rkv": RKVCompressor,
    "attention": AttentionCompressor,
    "redundancy": RedundancyCompressor,
    "crop": CropCompressor,
    "stride": StrideCompressor,
    "random": RandomCompressor,
    "knorm": KnormCompressor,
}


def get_compressor(name: str, **kwargs: Any) -> Compressor:
    """A compressor by name, e.g. ``get_compressor("rkv", lam=0.1)``, ``get_compressor("random", seed=1)``."""
    try:
        cls = COMPRESSORS[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; choose one of {sorted(COMPRESSORS)}") from None
    return cls(**kwargs)


def compressor_from_config(cfg) -> Compressor:
    """The one ``CompressConfig -> Compressor`` factory: ``lam`` goes to rkv, ``seed`` to random."""
    kwargs = {"rkv": {"lam": cfg.lam}, "random": {"seed": cfg.seed}}.get(cfg.method, {})
    return get_compressor(cfg.method, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------


def select(
    scores: Tensor, key_mask: Tensor | None, M: int, order: str = "time"
) -> tuple[Tensor, Tensor]:
    """Top-``M`` positions per (example, head).

    scores [B, H, N], key_mask [B, N] bool (None: all valid) -> indices [B, H, M] long, slot_mask [B, H, M]
    bool.

    - pad positions are never chosen, whatever their score; valid tokens with ``-inf``/NaN scores still
      beat pads, so exactly ``min(M, valid tokens)`` slots are valid per head;
    - ``order="time"``: kept entries re-sorted by position; ``order="score"``: best first;
    - invalid slots come last, are masked, and their index is 0 (safe to gather with);
    - ``N < M`` and examples with no valid token are fine (output padded to ``M`` masked slots).
    """
    if order not in ("time", "score"):
        raise ValueError(f"order must be 'time' or 'score', found {order!r}")
    if M < 0:
        raise ValueError(f"M must be >= 0, found {M}")
    b, h, n = scores.shape
    device = scores.device
    if key_mask is None:
        key_mask = _all_valid(b, n, device)
    key_mask = key_mask.to(device=device, dtype=torch.bool)
    if key_mask.shape != (b, n):
        raise ValueError(f"key_mask must be [B, N] = {(b, n)}, found {tuple(key_mask.shape)}")

    k = min(M, n)
    s = scores.float()
    # Valid tokens: finite floor (NaN/-inf -> lowest finite) so that they always beat pads at -inf.
    lowest = torch.finfo(torch.float32).min
    s = torch.nan_to_num(s, nan=lowest, posinf=torch.finfo(torch.float32).max, neginf=lowest)
    s = s.masked_fill(~key_mask[:, None, :], _NEG_INF)
    idx = torch.topk(s, k, dim=-1, sorted=True).indices  # [B, H, k], best first
    valid = torch.gather(key_mask[:, None, :].expand(b, h, n), -1, idx)  # [B, H, k]
    if order == "time":
        # invalid slots sort after every valid position
        key = torch.where(valid, idx, torch.full_like(idx, n))
        key, perm = torch.sort(key, dim=-1)
        idx = torch.gather(idx, -1, perm)
        valid = key < n
    idx = idx.masked_fill(~valid, 0)
    if k < M:
        pad = M - k
        idx = torch.cat([idx, idx.new_zeros(b, h, pad)], dim=-1)
        valid = torch.cat([valid, valid.new_zeros(b, h, pad)], dim=-1)
    return idx, valid


# ---------------------------------------------------------------------------------------------------------
# whole extraction
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Compressed:
    """The teacher's CoT cache compressed to M entries per layer and KV head.

    keys, values [B, L, H_kv, M, d] (the extraction's dtype), indices [B, L, H_kv, M] long (CoT positions,
    0 at invalid slots), slot_mask [B, L, H_kv, M] bool, scores [B, L, H_kv, N] float32 or None.
    In time order the slot mask is the same for every layer and head: :attr:`latent_mask` [B, M].
    """

    keys: Tensor
    values: Tensor
    indices: Tensor
    slot_mask: Tensor
    scores: Tensor | None = None

    @property
    def latent_mask(self) -> Tensor:
        """[B, M] bool: slots valid in any layer/head (all of them, as valid counts are per example)."""
        return self.slot_mask.flatten(1, 2).any(dim=1)

    @property
    def n_kept(self) -> Tensor:
        """[B] long: kept entries per example (``min(M, CoT length)``)."""
        return self.latent_mask.sum(dim=-1)

    @property
    def short_fraction(self) -> float:
        """Fraction of examples whose CoT is shorter than M (some latent slots masked out)."""
        lm = self.latent_mask
        return float((~lm).any(dim=-1).float().mean()) if lm.numel() else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held (K/V dominate)."""
        return sum(
            t.numel() * t.element_size()
            for t in (getattr(self, f.name) for f in fields(self))
            if isinstance(t, Tensor)
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Compressed":
        """A copy on ``device``; ``dtype`` (optional) applies to keys and values only."""
        kv = {"device": device} if dtype is None else {"device": device, "dtype": dtype}
        return Compressed(
            keys=self.keys.to(**kv),
            values=self.values.to(**kv),
            indices=self.indices.to(device),
            slot_mask=self.slot_mask.to(device),
            scores=None if self.scores is None else self.scores.to(device),
        )


SCOPES = ("head", "layer", "all")


def scope_scores(scores: Tensor, scope: str = "head") -> Tensor:
    """Scores ``[B, L, H_kv, N]`` for selection: unchanged (``"head"``), averaged over each layer's KV heads
    (``"layer"``) or over every layer and head (``"all"``), expanded back to ``[B, L, H_kv, N]`` so that
    :func:`select` keeps the same positions in every head (and layer). ``-inf`` and NaN scores count as the
    lowest finite score (as in :func:`select`, which never keeps a pad whatever its score)."""
    if scope not in SCOPES:
        raise ValueError(f"compress.scope must be one of {SCOPES}, found {scope!r}")
    if scope == "head":
        return scores
    lowest = torch.finfo(torch.float32).min
    s = torch.nan_to_num(scores.float(), nan=lowest, posinf=torch.finfo(torch.float32).max, neginf=lowest)
    mean = s.mean(dim=(2,) if scope == "layer" else (1, 2), keepdim=True)  # pads: select masks them by key_mask
    return mean.expand_as(scores)


def compress_extraction(
    ext: Any,
    compressor: Compressor | str,
    M: int,
    order: str = "time",
    return_scores: bool = False,
    scope: str = "head",
) -> Compressed:
    """Compress a whole teacher extraction (every layer) to ``M`` entries per layer and KV head.

    ``scope`` (:func:`scope_scores`): ``"head"`` selects per layer and KV head (R-KV, the paper); ``"layer"``
    keeps one set of CoT positions per layer (scores averaged over its KV heads); ``"all"`` one set for the
    whole cache (averaged over layers and heads), so latent slot ``j`` is one CoT token in every layer and head.

    ``ext`` has attributes ``cot_keys``, ``cot_values`` [B, L, H_kv, N, d], ``cot_mask`` [B, N] bool,
    ``answer_queries`` [B, L, H_q, A, d] and ``answer_mask`` [B, A] bool (post-RoPE keys and queries).
    ``L`` is folded into the batch, so the compressor runs once for all layers. ``compressor`` may be a
    name from :data:`COMPRESSORS`. Returns a :class:`Compressed` with keys/values in the extraction's dtype
    and on its device; ``return_scores`` also keeps the scores [B, L, H_kv, N] (for plots).
    """
    if isinstance(compressor, str):
        compressor = get_compressor(compressor)
    keys, values = ext.cot_keys, ext.cot_values
    if keys.dim() != 5 or values.shape != keys.shape:
        raise ValueError(
            f"cot_keys/cot_values must both be [B, L, H_kv, N, d], found {tuple(keys.shape)} "
            f"and {tuple(values.shape)}"
        )
    b, n_layers, h_kv, n, d = keys.shape
    device = keys.device
    key_mask = ext.cot_mask.to(device=device, dtype=torch.bool)
    queries = getattr(ext, "answer_queries", None)
    query_mask = getattr(ext, "answer_mask", None)

    # Fold L into the batch: [B*L, ...] views (reshape copies only if the input is not contiguous).
    bl = b * n_layers
    k_f = keys.reshape(bl, h_kv, n, d)
    v_f = values.reshape(bl, h_kv, n, d)
    km_f = key_mask[:, None, :].expand(b, n_layers, n).reshape(bl, n)
    q_f = qm_f = None
    if queries is not None and compressor.uses_queries:
        if queries.dim() != 5 or queries.shape[:2] != (b, n_layers):
            raise ValueError(f"answer_queries must be [B, L, H_q, A, d], found {tuple(queries.shape)}")
        a = queries.shape[3]
        q_f = queries.to(device).reshape(bl, queries.shape[2], a, queries.shape[4])
        if query_mask is None:
            query_mask = _all_valid(b, a, device)
        query_mask = query_mask.to(device=device, dtype=torch.bool)
        qm_f = query_mask[:, None, :].expand(b, n_layers, a).reshape(bl, a)

    scores = compressor.score(k_f, q_f, km_f, qm_f, budget=M)  # [B*L, H_kv, N]
    chosen = scope_scores(scores.view(b, n_layers, h_kv, n), scope).reshape(bl, h_kv, n)
    idx, slot_mask = select(chosen, km_f, M, order=order)  # [B*L, H_kv, M]
    if n == 0:  # nothing to gather from
        k_sel = keys.new_zeros(bl, h_kv, M, d)
        v_sel = values.new_zeros(bl, h_kv, M, d)
    else:
        gidx = idx.unsqueeze(-1).expand(bl, h_kv, M, d)
        k_sel = torch.gather(k_f, 2, gidx)
        v_sel = torch.gather(v_f, 2, gidx)
    return Compressed(
        keys=k_sel.view(b, n_layers, h_kv, M, d),
        values=v_sel.view(b, n_layers, h_kv, M, d),
        indices=idx.view(b, n_layers, h_kv, M),
        slot_mask=slot_mask.view(b, n_layers, h_kv, M),
        scores=scores.view(b, n_layers, h_kv, n) if return_scores else None,
    )


def extraction_importance(ext: Any) -> Tensor:
    """The answer's attention to every CoT token of every layer, ``[B, L, H_kv, N]`` float32
    (:func:`kava_lab.scores.importance_scores` with L folded into the batch, as :func:`compress_extraction`)."""
    keys, queries = ext.cot_keys, ext.answer_queries
    b, n_layers, h_kv, n, d = keys.shape
    bl = b * n_layers
    key_mask = ext.cot_mask.to(device=keys.device, dtype=torch.bool)[:, None, :].expand(b, n_layers, n)
    query_mask = ext.answer_mask.to(device=keys.device, dtype=torch.bool)
    a = queries.shape[3]
    imp = importance_scores(keys.reshape(bl, h_kv, n, d), queries.reshape(bl, queries.shape[2], a, d),
                            key_mask.reshape(bl, n), query_mask[:, None, :].expand(b, n_layers, a).reshape(bl, a))
    return imp.view(b, n_layers, h_kv, n)
