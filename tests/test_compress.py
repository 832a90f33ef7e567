"""kava_lab.compress: scorers against the formula written by hand, the shared selector, whole extractions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kava_lab.compress import (
    COMPRESSORS,
    Compressed,
    compress_extraction,
    get_compressor,
    select,
)

ALL = sorted(COMPRESSORS)

# GQA: 2 KV heads, 3 query heads per KV head.
B, L, H_KV, G, D = 4, 3, 2, 3, 16
H_Q = H_KV * G
N, A = 13, 5
KEY_LENS = [13, 7, 0, 3]  # a full row, a padded one, an empty CoT, a CoT shorter than M
QUERY_LENS = [5, 2, 4, 1]


def _mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def make_layer(seed=0, key_lens=KEY_LENS, query_lens=QUERY_LENS, n=N, a=A, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = len(key_lens)
    keys = torch.randn(b, H_KV, n, D, generator=g)
    queries = torch.randn(b, H_Q, a, D, generator=g)
    km, qm = _mask(key_lens, n), _mask(query_lens, a)
    # garbage (huge values) at pads: must not matter
    keys = keys.masked_fill(~km[:, None, :, None], 1e4)
    queries = queries.masked_fill(~qm[:, None, :, None], -1e4)
    return keys.to(dtype), queries.to(dtype), km, qm


def make_ext(seed=0, key_lens=KEY_LENS, query_lens=QUERY_LENS, n=N, a=A, n_layers=L, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    b = len(key_lens)
    return SimpleNamespace(
        cot_keys=torch.randn(b, n_layers, H_KV, n, D, generator=g).to(dtype),
        cot_values=torch.randn(b, n_layers, H_KV, n, D, generator=g).to(dtype),
        cot_mask=_mask(key_lens, n),
        answer_queries=torch.randn(b, n_layers, H_Q, a, D, generator=g).to(dtype),
        answer_mask=_mask(query_lens, a),
    )


def reference_rkv(keys, queries, key_mask, query_mask, lam):
    """Straight from the formula: explicit loops over examples and KV heads, full cosine matrix, float64."""
    b, h_kv, n, d = keys.shape
    g = queries.shape[1] // h_kv
    out = torch.full((b, h_kv, n), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        valid = [i for i in range(n) if key_mask[bi, i]]
        qvalid = [j for j in range(queries.shape[2]) if query_mask[bi, j]]
        nv = len(valid)
        if nv == 0:
            continue
        for h in range(h_kv):
            K = keys[bi, h, valid].double()  # [nv, d]
            # importance
            imp = torch.zeros(nv, dtype=torch.float64)
            for j in qvalid:
                logits = torch.stack(
                    [K @ queries[bi, h * g + gi, j].double() / math.sqrt(d) for gi in range(g)]
                ).amax(dim=0)
                imp += torch.softmax(logits, dim=0)
            if qvalid:
                imp /= len(qvalid)
            # redundancy
            Kn = K / K.norm(dim=-1, keepdim=True)
            C = Kn @ Kn.T
            C.fill_diagonal_(0.0)
            col_mean = C.sum(dim=0) / nv  # over all n valid tokens, zeroed diagonal included (§3)
            red = torch.softmax(-col_mean, dim=0)
            out[bi, h, valid] = lam * imp + (1 - lam) * red
    return out


# ---------------------------------------------------------------------------------------------------------
# scores against the formula
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0, 0.0])
def test_rkv_matches_reference(lam):
    keys, queries, km, qm = make_layer(seed=1)
    got = get_compressor("rkv", lam=lam).score(keys, queries, km, qm)
    ref = reference_rkv(keys, queries, km, qm, lam)
    assert got.shape == (B, H_KV, N) and got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin].double(), ref[fin], rtol=1e-5, atol=1e-7)


def test_named_compressors_match_the_reference_formula():
    """attention = importance alone, redundancy = redundancy alone, each against the hand-written loop (not
    against rkv, which shares their code)."""
    keys, queries, km, qm = make_layer(seed=2)
    fin = None
    for name, lam in (("attention", 1.0), ("redundancy", 0.0)):
        ref = reference_rkv(keys, queries, km, qm, lam)
        fin = torch.isfinite(ref)
        got = get_compressor(name).score(keys, queries, km, qm)
        torch.testing.assert_close(got[fin].double(), ref[fin], rtol=1e-5, atol=1e-7)
    # redundancy needs no queries
    no_queries = get_compressor("redundancy").score(keys, None, km)
    torch.testing.assert_close(no_queries[fin].double(), reference_rkv(keys, queries, km, qm, 0.0)[fin],
                               rtol=1e-5, atol=1e-7)


def test_redundancy_never_forms_n_by_n():
    """Record every op's output size: nothing as large as N*N (the cosine matrix) may appear."""

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max_numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.max_numel = max(self.max_numel, t.numel())
            return out

    n, d = 400, 4
    keys = torch.randn(1, 1, n, d)
    km = torch.ones(1, n, dtype=torch.bool)
    with Largest() as mode:
        get_compressor("redundancy").score(keys, None, km)
    assert mode.max_numel <= n * d < n * n


# ---------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("M", [1, 4, 13, 20])
def test_pads_never_selected_and_valid_counts(name, M):
    """Every method: no pad position in a valid slot, exactly min(M, valid) valid slots, time order,
    invalid slots last with index 0. M=20 > N=13 covers output padding; KEY_LENS has an empty CoT."""
    ext = make_ext(seed=3)
    out = compress_extraction(ext, get_compressor(name), M)
    assert out.indices.shape == out.slot_mask.shape == (B, L, H_KV, M)
    assert out.keys.shape == out.values.shape == (B, L, H_KV, M, D)
    km = ext.cot_mask
    for b in range(B):
        idx, sm = out.indices[b], out.slot_mask[b]
        assert bool(km[b][idx[sm]].all()), "a pad position was selected"
        n_valid = int(km[b].sum())
        assert (sm.sum(-1) == min(M, n_valid)).all()
        # valid slots first, then invalid ones pointing at 0
        expected_mask = torch.arange(M) < min(M, n_valid)
        assert torch.equal(sm, expected_mask.expand_as(sm))
        assert (idx[~sm] == 0).all()
        # time order: strictly increasing positions among valid slots
        v = idx[..., : min(M, n_valid)]
        assert (v[..., 1:] > v[..., :-1]).all()
    assert torch.equal(out.n_kept, torch.tensor([min(M, n) for n in KEY_LENS]))


def test_score_order_and_nonfinite_valid_scores():
    scores = torch.tensor([[[0.3, float("nan"), 0.9, float("-inf"), 5.0, 0.1]]])
    km = torch.tensor([[True, True, True, True, False, True]])
    idx, sm = select(scores, km, 5, order="score")
    assert idx.tolist() == [[[2, 0, 5, 1, 3]]] or idx.tolist() == [[[2, 0, 5, 3, 1]]]
    assert sm.all()  # NaN / -inf valid tokens still beat the pad (score 5.0)
    idx, sm = select(scores, km, 3, order="time")
    assert idx.tolist() == [[[0, 2, 5]]] and sm.all()
    # N < M, no valid token at all, M = 0
    idx, sm = select(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool), 6)
    assert idx.shape == (2, 3, 6) and not sm.any() and (idx == 0).all()
    idx, sm = select(torch.randn(2, 3, 4), None, 0)
    assert idx.shape == sm.shape == (2, 3, 0)
    with pytest.raises(ValueError):
        select(scores, km, 2, order="position")


@pytest.mark.parametrize("name", [n for n in ALL if n != "random"])
def test_alone_equals_in_padded_batch(name):
    """An example compressed alone (no padding) gives the same selection as inside a padded batch."""
    M = 4
    ext = make_ext(seed=4)
    # garbage in the padding of the batch, NaN included
    pad = ~ext.cot_mask[:, None, None, :, None]
    ext.cot_keys = ext.cot_keys.masked_fill(pad, float("nan"))
    ext.answer_queries = ext.answer_queries.masked_fill(~ext.answer_mask[:, None, None, :, None], float("nan"))
    batch = compress_extraction(ext, get_compressor(name), M, return_scores=True)
    for b in (0, 1, 3):
        n, a = KEY_LENS[b], QUERY_LENS[b]
        alone = SimpleNamespace(
            cot_keys=ext.cot_keys[b : b + 1, :, :, :n],
            cot_values=ext.cot_values[b : b + 1, :, :, :n],
            cot_mask=torch.ones(1, n, dtype=torch.bool),
            answer_queries=ext.answer_queries[b : b + 1, :, :, :a],
            answer_mask=torch.ones(1, a, dtype=torch.bool),
        )
        one = compress_extraction(alone, get_compressor(name), M, return_scores=True)
        assert torch.equal(one.indices[0], batch.indices[b])
        assert torch.equal(one.slot_mask[0], batch.slot_mask[b])
        assert torch.equal(one.keys[0], batch.keys[b])
        torch.testing.assert_close(one.scores[0], batch.scores[b, ..., :n])


def test_random_reproducible_by_seed():
    ext = make_ext(seed=5, key_lens=[13, 11, 12, 9])
    a1 = compress_extraction(ext, get_compressor("random", seed=7), 4)
    a2 = compress_extraction(ext, get_compressor("random", seed=7), 4)
    b1 = compress_extraction(ext, get_compressor("random", seed=8), 4)
    assert torch.equal(a1.indices, a2.indices)
    assert not torch.equal(a1.indices, b1.indices)
    # stateful: the next draw differs, reset() restarts the sequence
    c = get_compressor("random", seed=7)
    first = compress_extraction(ext, c, 4).indices
    assert not torch.equal(first, compress_extraction(ext, c, 4).indices)
    c.reset()
    assert torch.equal(first, compress_extraction(ext, c, 4).indices)


def test_crop_stride_knorm_pick_by_hand():
    keys, queries, km, qm = make_layer(seed=6, key_lens=[13, 10, 5], query_lens=[5, 5, 5])
    M = 4
    idx, sm = select(get_compressor("crop").score(keys, queries, km, qm), km, M)
    assert idx[:, 0].tolist() == [[0, 1, 2, 3]] * 3
    # stride: evenly spaced over valid tokens, first and last included (round half up)
    idx, sm = select(get_compressor("stride").score(keys, queries, km, qm, budget=M), km, M)
    for b, n in enumerate([13, 10, 5]):
        want = [math.floor(j * (n - 1) / (M - 1) + 0.5) for j in range(M)]
        assert (idx[b] == torch.tensor(want)).all(), (n, idx[b], want)
    idx, sm = select(get_compressor("stride", M=20).score(keys, queries, km, qm), km, 20)
    assert (sm.sum(-1) == torch.tensor([13, 10, 5])[:, None]).all()
    # knorm: the M smallest L2 norms among valid tokens
    idx, sm = select(get_compressor("knorm").score(keys, queries, km, qm), km, M, order="score")
    for b, n in enumerate([13, 10, 5]):
        for h in range(H_KV):
            norms = keys[b, h, :n].norm(dim=-1)
            assert idx[b, h].tolist() == norms.argsort()[:M].tolist()


def test_bf16_runs_and_upcasts():
    ext = make_ext(seed=7, dtype=torch.bfloat16)
    ext32 = SimpleNamespace(**{k: (v.float() if v.is_floating_point() else v) for k, v in vars(ext).items()})
    for name in ALL:
        out = compress_extraction(ext, get_compressor(name), 6, return_scores=True)
        assert out.keys.dtype == out.values.dtype == torch.bfloat16
        assert out.scores.dtype == torch.float32
        if name != "random":
            ref = compress_extraction(ext32, get_compressor(name), 6, return_scores=True)
            assert torch.equal(out.scores, ref.scores), name  # scores are computed in fp32
            assert torch.equal(out.indices, ref.indices)


@pytest.mark.parametrize("order", ["time", "score"])
def test_compress_extraction_gathers_rows_and_folds_layers(order):
    ext = make_ext(seed=8)
    M = 5
    comp = get_compressor("rkv", lam=0.3)
    out = compress_extraction(ext, comp, M, order=order)
    # folding L into the batch equals compressing layer by layer
    for l in range(L):
        s = comp.score(ext.cot_keys[:, l], ext.answer_queries[:, l], ext.cot_mask, ext.answer_mask)
        idx, sm = select(s, ext.cot_mask, M, order=order)
        assert torch.equal(out.indices[:, l], idx) and torch.equal(out.slot_mask[:, l], sm)
    # gathered rows, by hand
    for b in range(B):
        for l in range(L):
            for h in range(H_KV):
                for m in range(M):
                    i = int(out.indices[b, l, h, m])
                    assert torch.equal(out.keys[b, l, h, m], ext.cot_keys[b, l, h, i])
                    assert torch.equal(out.values[b, l, h, m], ext.cot_values[b, l, h, i])


@pytest.mark.parametrize("scope", ["layer", "all"])
def test_scoped_selection_keeps_one_set_per_layer_or_cache(scope):
    ext = make_ext(seed=8)
    M = 5
    comp = get_compressor("rkv", lam=0.3)
    out = compress_extraction(ext, comp, M, scope=scope, return_scores=True)
    same_heads = out.indices == out.indices[:, :, :1]
    assert same_heads.all() and torch.equal(out.slot_mask, compress_extraction(ext, comp, M).slot_mask)
    if scope == "all":
        assert (out.indices == out.indices[:, :1]).all()
    # the kept set is the top-M of the mean score over the shared heads (and layers), pads never kept
    mean = out.scores.mean(dim=2 if scope == "layer" else (1, 2), keepdim=True).expand_as(out.scores)
    for b in range(B):
        for l in range(L):
            idx, sm = select(mean[b:b + 1, l], ext.cot_mask[b:b + 1], M)
            assert torch.equal(out.indices[b, l], idx[0]) and torch.equal(out.slot_mask[b, l], sm[0])
    # rows are still each head's own K/V at the shared positions
    i = int(out.indices[0, 1, 1, 2])
    assert torch.equal(out.values[0, 1, 1, 2], ext.cot_values[0, 1, 1, i])
    with pytest.raises(ValueError, match="compress.scope"):
        compress_extraction(ext, comp, M, scope="none")


def test_compressed_helpers_and_errors():
    ext = make_ext(seed=9)
    out = compress_extraction(ext, "rkv", 8)
    assert isinstance(out, Compressed) and out.scores is None
    assert out.latent_mask.shape == (B, 8)
    assert out.short_fraction == 0.75  # lengths 7, 0, 3 < 8
    expected = 2 * B * L * H_KV * 8 * D * 4 + B * L * H_KV * 8 * (8 + 1)
    assert out.nbytes == expected
    half = out.to("cpu", dtype=torch.bfloat16)
    assert half.keys.dtype == torch.bfloat16 and half.indices.dtype == torch.long
    with pytest.raises(ValueError, match="unknown compressor"):
        get_compressor("h2o")
    with pytest.raises(ValueError, match="multiple"):
        keys, queries, km, qm = make_layer()
        get_compressor("rkv").score(keys, queries[:, :5], km, qm)
    with pytest.raises(ValueError, match="budget"):
        get_compressor("stride").score(keys, None, km)
    # N = 0 CoT tokens
    empty = make_ext(seed=0, key_lens=[0, 0], query_lens=[1, 2], n=0)
    out = compress_extraction(empty, "rkv", 3)
    assert out.keys.shape == (2, L, H_KV, 3, D) and not out.slot_mask.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name):
    ext = make_ext(seed=10)
    cpu = compress_extraction(ext, get_compressor(name), 6, return_scores=True)
    gpu_ext = SimpleNamespace(**{k: v.cuda() for k, v in vars(ext).items()})
    gpu = compress_extraction(gpu_ext, get_compressor(name), 6, return_scores=True)
    assert gpu.keys.is_cuda and gpu.indices.is_cuda
    torch.testing.assert_close(gpu.scores.cpu(), cpu.scores, rtol=1e-4, atol=1e-6)
    assert torch.equal(gpu.slot_mask.cpu(), cpu.slot_mask)
