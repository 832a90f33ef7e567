"""Probing a trained student: what do the latents hold? (kava-method.md §7, claim (d)).

Four views of the M latent slots of a trained student, all computed from one :class:`ProbeData` bundle
that :func:`collect` fills in a few batched passes over held-out problems:

- **decoded latents** (:func:`decode_latents`): every slot's last-layer hidden state at every Jacobi
  iteration (prefill included) through the final norm and the LM head; top-k tokens with probabilities,
  and whether the top token occurs in the teacher's CoT for that problem (and, as a control, in the CoT of
  another problem). In transformers 5 ``hidden_states[-1]`` is already after the final norm for Llama,
  Qwen2 and GPT-2; :func:`last_hidden_is_normed` checks it on the model itself instead of assuming it.
- **KV alignment** (:func:`kv_alignment`): per layer, the cosine similarity between the student's latent
  K (and V) slot ``i`` and the compressed teacher slot ``j``, per KV head then averaged over heads, as an
  ``M x M`` matrix; the *diagonal score* (mean diagonal minus mean off-diagonal over valid slots) sums it
  up. The control pairs each student with another problem's teacher cache: what is left there is position
  (RoPE) structure, not content.
- **trajectories** (:func:`project_trajectory`): latent hidden states of all slots and iterations projected
  on their top principal components (SVD), so one sees how the Jacobi iterations move the latents;
  :func:`iteration_deltas` measures how much each iteration still changes them.
- **linear probes** (:func:`linear_probes`): from the hidden state of every layer at every latent slot
  (final latent pass, re-run with all hidden states by :func:`latent_hidden_states`), predict each
  step's intermediate result (``Example.step_values``) on held-out problems, next to a shuffled-label
  control and the majority-class rate. The default target is the *last digit* of the value (10 classes):
  the tiny tokenizer writes every digit as its own token, so the last digit is a quantity the model must
  represent to write the number, its classes are balanced enough for accuracy to mean something, and a
  raw-value regression would be dominated by the few large values (``target="log_value"`` does ridge
  regression on ``log(1 + value)`` and reports R²). Probes are closed-form ridge (one-vs-rest on one-hot
  targets for classes), batched over every (layer, slot), with the ridge strength chosen per probe by
  exact leave-one-out on the training problems.

Figures (plotly, imported lazily) for the notebook are at the end (``fig_*``); :func:`demo_run` trains or
reuses a short tiny run for notebooks called without a run folder.

Shapes: ``B`` examples, ``L`` layers, ``H`` KV heads, ``M`` slots, ``d`` head dim, ``D`` hidden size,
``I`` iterations (Jacobi: prefill + T passes; sequential: 1), ``K`` probe targets (steps + answer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "unwrap_model", "final_norm", "lm_head", "last_hidden_is_normed", "logit_lens",
    "ProbeData", "collect", "latent_hidden_states", "trajectory_tensor",
    "LatentDecoding", "decode_latents",
    "kv_cosine", "diagonal_score", "KVAlignment", "kv_alignment",
    "TrajectoryProjection", "project_trajectory", "iteration_deltas",
    "ProbeResult", "probe_targets", "ridge_fit_predict", "linear_probes",
    "demo_run", "small_mode", "explore",
]


# ------------------------------------------------------------------------------------ final norm and head

def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal LM under a peft wrapper (``get_base_model()``), else the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The final norm of a causal LM, found generically: ``get_decoder().<norm>`` or ``base_model.<norm>``
    for the usual names (Llama/Qwen2 ``norm``, GPT-2 ``ln_f``, ...); None when there is none."""
    lm = unwrap_model(model)
    candidates = []
    get_decoder = getattr(lm, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # some families raise when they have no separate decoder
            pass
    candidates += [getattr(lm, "base_model", None), getattr(lm, "model", None), getattr(lm, "transformer", None)]
    for module in candidates:
        for name in _NORM_NAMES:
            norm = getattr(module, name, None) if module is not None else None
            if isinstance(norm, nn.Module):
                return norm
    return None


def lm_head(model: nn.Module) -> nn.Module:
    """The output projection (``get_output_embeddings()``)."""
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to decode latents with")
    return head


_NORMED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def last_hidden_is_normed(model: nn.Module) -> bool:
    """Whether ``output_hidden_states[-1]`` is already after the final norm, checked on this model (cached):
    one forward on a few tokens, then ``head(h)`` vs ``head(norm(h))`` against the model's logits."""
    lm = unwrap_model(model)
    if lm in _NORMED:
        return _NORMED[lm]
    device = next(lm.parameters()).device
    ids = torch.arange(1, 5, device=device)[None] % lm.get_input_embeddings().weight.shape[0]
    out = lm(input_ids=ids, output_hidden_states=True)
    h, head, norm = out.hidden_states[-1], lm_head(lm), final_norm(lm)
    raw = (head(h).float() - out.logits.float()).abs().max().item()
    normed = raw
    if norm is not None:
        normed = (head(norm(h)).float() - out.logits.float()).abs().max().item()
    scale = out.logits.float().abs().max().item() + 1e-6
    if min(raw, normed) > 1e-3 * scale:
        raise ValueError(f"{type(lm).__name__}: neither head(h) nor head(norm(h)) reproduces the logits "
                         f"(errors {raw:.3g}, {normed:.3g}); the family post-processes logits, decode by hand")
    _NORMED[lm] = result = raw <= normed
    return result


@torch.no_grad()
def logit_lens(model: nn.Module, hidden: Tensor, normed: bool | None = None) -> Tensor:
    """Logits ``[..., V]`` of last-layer hidden states ``[..., D]``; the final norm is applied only when
    ``hidden`` is not already normed (``normed=None``: :func:`last_hidden_is_normed`)."""
    if normed is None:
        normed = last_hidden_is_normed(model)
    head = lm_head(model)
    h = hidden.to(device=head.weight.device, dtype=head.weight.dtype)
    if not normed:
        norm = final_norm(model)
        if norm is not None:
            h = norm(h)
    return head(h).float()


# --------------------------------------------------------------------------------------------- collecting

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
            progress: Callable[[str], None] | None = None, threads: int | str | None = "auto") -> ProbeData:
    """Run teacher (extraction + compression with the run's compressor unless given) and student (recorded
    latent loop, latent K/V, all hidden states) over ``examples``; returns a :class:`ProbeData`.

    ``student``/``backbone``/``cfg`` as returned by :func:`kava_lab.runs.load_run`. The teacher is the
    same model in teacher mode (self-distillation), reading each problem's CoT. ``threads``: torch threads
    while collecting; ``"auto"`` uses one for models under 20M parameters (on a shared CPU, tiny matmuls
    run several times faster single-threaded) and leaves larger ones alone; None never changes it.
    """
    if threads == "auto":
        threads = 1 if sum(p.numel() for p in student.model.parameters()) < 20_000_000 else None
    with _torch_threads(threads):
        return _collect(student, backbone, cfg, examples, batch_size, compressor, progress)


def _collect(student, backbone, cfg, examples, batch_size, compressor, progress) -> ProbeData:
    from .compress import compress_extraction, get_compressor
    from .encoding import Collator, encode
    from .student import stack_kv
    from .teacher import extract_teacher
    from .compress import compressor_from_config

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
        ext = extract_teacher(model, tb)
        comp = compress_extraction(ext, compressor, M, order=cfg.compress.order)
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


# ----------------------------------------------------------------------------------------- decoded latents

@dataclass
class LatentDecoding:
    """Top-k decoding of latent slots per iteration."""

    token_ids: Tensor  # [I, B, M, k] long
    probs: Tensor  # [I, B, M, k] float
    in_trace: Tensor | None  # [I, B, M] bool: top-1 token occurs in this example's teacher CoT
    topk_in_trace: Tensor | None  # [I, B, M] bool: any of the top-k does
    in_other_trace: Tensor | None  # [I, B, M] bool: control, top-1 in another example's CoT
    iteration_labels: list[str] = field(default_factory=list)

    def match_rate(self, slot_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Per iteration ``[I]``: fraction of (example, slot) whose top-1 / any top-k token is in the trace,
        and the control (another example's trace). ``slot_mask`` ``[B, M]`` restricts the slots counted."""
        if self.in_trace is None:
            raise ValueError("decoded without trace ids: pass trace_ids to decode_latents")
        mask = torch.ones_like(self.in_trace[0]) if slot_mask is None else slot_mask.bool()
        n = mask.sum().clamp(min=1)

        def rate(x):
            return (x & mask).flatten(1).sum(1).float() / n

        return {"top1": rate(self.in_trace), "topk": rate(self.topk_in_trace),
                "control": rate(self.in_other_trace)}

    def tokens(self, tokenizer, example: int, iteration: int = -1) -> list[list[str]]:
        """``[M][k]`` decoded strings of one example at one iteration."""
        ids = self.token_ids[iteration, example]
        return [[_token_text(tokenizer, i) for i in row.tolist()] for row in ids]


def _token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([int(token_id)])
    return text.strip() or repr(text)


def _trace_table(trace_ids: Sequence[Sequence[int]], vocab: int, device) -> Tensor:
    """[B, V] bool membership of each example's CoT token ids."""
    table = torch.zeros(len(trace_ids), vocab, dtype=torch.bool, device=device)
    for b, ids in enumerate(trace_ids):  # building a lookup table from ragged Python lists
        if len(ids):
            table[b, torch.as_tensor(list(ids), dtype=torch.long, device=device)] = True
    return table


@torch.no_grad()
def decode_latents(model: nn.Module, hidden: Tensor, k: int = 5, trace_ids: Sequence[Sequence[int]] | None = None,
                   normed: bool | None = None, iteration_labels: list[str] | None = None,
                   chunk: int = 64) -> LatentDecoding:
    """Decode last-layer latent hidden states ``[I, B, M, D]`` (or ``[B, M, D]``) through the final norm
    (only if not already applied, see :func:`logit_lens`) and the LM head.

    ``trace_ids`` ``[B]`` lists of the teacher's CoT token ids: marks whether the top-1 (any top-k) token
    occurs in the example's own trace, and in the next example's trace (``in_other_trace``, a control for
    tokens common to every trace, such as ``=`` or frequent digits).
    """
    if hidden.dim() == 3:
        hidden = hidden[None]
    I, B, M, _ = hidden.shape
    ids, probs = [], []
    for b0 in range(0, B, chunk):  # bounded memory for large vocabularies: [I, chunk, M, V] at a time
        logits = logit_lens(model, hidden[:, b0:b0 + chunk], normed=normed)
        p, i = torch.softmax(logits, -1).topk(k, dim=-1)
        ids.append(i.cpu())
        probs.append(p.cpu())
    token_ids, top_probs = torch.cat(ids, 1), torch.cat(probs, 1)
    in_trace = topk_in = other = None
    if trace_ids is not None:
        if len(trace_ids) != B:
            raise ValueError(f"trace_ids has {len(trace_ids)} entries for {B} examples")
        vocab = int(max(token_ids.max().item(), max((max(t) for t in trace_ids if len(t)), default=0))) + 1
        table = _trace_table(trace_ids, vocab, "cpu")  # [B, V]
        flat = token_ids.permute(1, 0, 2, 3).reshape(B, -1)  # [B, I*M*k]
        member = table.gather(1, flat).view(B, I, M, k).permute(1, 0, 2, 3)  # [I, B, M, k]
        member_other = table.roll(-1, 0).gather(1, flat).view(B, I, M, k).permute(1, 0, 2, 3)
        in_trace, topk_in, other = member[..., 0], member.any(-1), member_other[..., 0]
    return LatentDecoding(token_ids, top_probs, in_trace, topk_in, other,
                          iteration_labels or [f"iteration {i}" for i in range(I)])


# ------------------------------------------------------------------------------------------- KV alignment

def kv_cosine(student: Tensor, teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of every student slot ``i`` with every teacher slot ``j``:
    ``[..., M, d]`` x ``[..., M, d]`` -> ``[..., M_student, M_teacher]``."""
    s = student.float() / student.float().norm(dim=-1, keepdim=True).clamp(min=eps)
    t = teacher.float() / teacher.float().norm(dim=-1, keepdim=True).clamp(min=eps)
    return s @ t.transpose(-1, -2)


def diagonal_score(cos: Tensor, slot_mask: Tensor | None = None) -> Tensor:
    """Mean diagonal minus mean off-diagonal of ``[..., M, M]`` matrices over valid slot pairs (both slots
    valid in ``slot_mask`` ``[..., M]``, broadcast over the leading dims); one score per leading index."""
    M = cos.shape[-1]
    eye = torch.eye(M, dtype=torch.bool, device=cos.device)
    valid = torch.ones(cos.shape[:-1], dtype=torch.bool, device=cos.device) if slot_mask is None else slot_mask.bool()
    valid = valid.expand(cos.shape[:-1])
    pair = valid[..., :, None] & valid[..., None, :]
    diag, off = pair & eye, pair & ~eye
    d = (cos * diag).sum((-1, -2)) / diag.sum((-1, -2)).clamp(min=1)
    o = (cos * off).sum((-1, -2)) / off.sum((-1, -2)).clamp(min=1)
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
    M = cos.shape[-1]
    eye = torch.eye(M, dtype=torch.bool)
    pair = (mask[:, :, None] & mask[:, None, :])[:, None, None]  # [B, 1, 1, M, M]
    diag, off = (pair & eye).expand_as(cos), (pair & ~eye).expand_as(cos)
    dims = (0, 2, 3, 4)
    d = (cos * diag).sum(dims) / diag.sum(dims).clamp(min=1)
    o = (cos * off).sum(dims) / off.sum(dims).clamp(min=1)
    return d - o


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


# ------------------------------------------------------------------------------------------- trajectories

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


# ------------------------------------------------------------------------------------------ linear probes

TARGETS = ("last_digit", "log_value")


def probe_targets(examples: Sequence, target: str = "last_digit", n_steps: int | None = None
                  ) -> tuple[Tensor, list[str]]:
    """Per example and step the probe's label: ``[B, K]`` with ``K = n_steps + 1`` columns (step 1..n, then
    the final answer); ``last_digit`` gives class ids (``-1`` where the example has no such step), and
    ``log_value`` gives ``log(1 + |value|)`` (NaN where missing)."""
    if target not in TARGETS:
        raise ValueError(f"unknown probe target {target!r}; expected one of {TARGETS}")
    values = [list(e.step_values) for e in examples]
    if not any(values):
        raise ValueError("the examples carry no step_values (synthetic problems and equation traces do)")
    n = n_steps if n_steps is not None else max(len(v) for v in values)
    names = [f"step {i + 1}" for i in range(n)] + ["answer"]
    rows = []
    for e, v in zip(examples, values):  # ragged Python lists -> one table
        answer = e.answer_value if v == [] else v[-1]
        rows.append([v[i] if i < len(v) else math.nan for i in range(n)] + [answer])
    table = torch.tensor(rows, dtype=torch.float64)
    if target == "last_digit":
        ok = torch.isfinite(table) & (table == table.round())
        digits = torch.where(ok, table.nan_to_num(0).abs().remainder(10), torch.full_like(table, -1))
        return digits.long(), names
    return torch.log1p(table.abs()).float(), names


def ridge_fit_predict(x_train: Tensor, y_train: Tensor, x_test: Tensor,
                      lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4),
                      classify: bool = True) -> tuple[Tensor, Tensor]:
    """Batched closed-form ridge with leave-one-out choice of the strength, per probe.

    ``x_train`` ``[P, n, D]``, ``y_train`` ``[n, C]`` (one-hot for classes, ``C=1`` values), ``x_test``
    ``[P, m, D]``. Features are standardised with training statistics and an intercept is fitted. The LOO
    prediction of ridge is exact from one SVD: ``(ŷ_i - H_ii y_i) / (1 - H_ii)`` (hat diagonal ``H_ii``
    plus ``1/n`` for the intercept). LOO criterion: accuracy (classify) or squared error.
    Returns test predictions ``[P, m, C]``, the chosen lambda ``[P]`` and its LOO score ``[P]`` (accuracy,
    or minus the mean squared error).
    """
    x = x_train.double()
    y = y_train.double()
    mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True).clamp(min=1e-6)
    xs, xt = (x - mu) / sd, (x_test.double() - mu) / sd
    ybar = y.mean(0)
    yc = y - ybar
    n = x.shape[1]
    u, s, vh = torch.linalg.svd(xs, full_matrices=False)  # [P, n, r], [P, r], [P, r, D]
    uty = u.transpose(1, 2) @ yc  # [P, r, C]
    best_score = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
    best_lam = torch.zeros(x.shape[0], dtype=torch.float64)
    best_pred = None
    for lam in sorted(lambdas, reverse=True):  # strongest first: ties keep the simpler probe; batched over probes
        shrink = s.pow(2) / (s.pow(2) + lam)  # [P, r]
        fitted = u @ (shrink[..., None] * uty)  # [P, n, C]
        hat = (u.pow(2) * shrink[:, None, :]).sum(-1) + 1.0 / n  # [P, n]
        loo = (fitted - hat[..., None] * yc) / (1 - hat[..., None]).clamp(min=1e-6) + ybar
        if classify:
            score = (loo.argmax(-1) == y.argmax(-1)).double().mean(1)
        else:
            score = -(loo - y).pow(2).mean((1, 2))
        coef = vh.transpose(1, 2) @ ((s / (s.pow(2) + lam))[..., None] * uty)  # [P, D, C]
        pred = xt @ coef + ybar
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_lam = torch.where(better, torch.full_like(best_lam, lam), best_lam)
        best_pred = pred if best_pred is None else torch.where(better[:, None, None], pred, best_pred)
    return best_pred.float(), best_lam.float(), best_score.float()


@dataclass
class ProbeResult:
    """Held-out scores of linear probes per target step, layer and slot."""

    target: str  # "last_digit" (accuracy) or "log_value" (R²)
    metric: str  # "accuracy" or "r2"
    step_names: list[str]  # [K]
    score: Tensor  # [K, L+1, M] on held-out problems
    control: Tensor  # [K, L+1, M] same probes fit on shuffled training labels (mean over shuffles)
    chance: Tensor  # [K] majority-class accuracy (classes) or 0 (R²)
    n_train: Tensor  # [K]
    n_test: Tensor  # [K]
    lambdas: Tensor  # [K, L+1, M] chosen ridge strength
    loo: Tensor  # [K, L+1, M] leave-one-out score on the training problems (accuracy or -MSE)

    def best(self) -> list[dict]:
        """Per step: the (layer, slot) with the best leave-one-out score on the *training* problems (so the
        held-out score is not a maximum over noisy test scores), its held-out score, the shuffled control
        there and its maximum over all sites, and chance."""
        out = []
        for k, name in enumerate(self.step_names):
            s = self.score[k]
            if torch.isnan(s).all():
                continue
            flat = int(torch.nan_to_num(self.loo[k], nan=-math.inf).flatten().argmax())
            layer, slot = divmod(flat, s.shape[1])
            out.append({"step": name, "layer": layer, "slot": slot, self.metric: float(s[layer, slot]),
                        "max_over_sites": float(torch.nan_to_num(s, nan=-math.inf).max()),
                        "control": float(self.control[k, layer, slot]),
                        "control_max": float(torch.nan_to_num(self.control[k], nan=-math.inf).max()),
                        "chance": float(self.chance[k]), "n_train": int(self.n_train[k]),
                        "n_test": int(self.n_test[k])})
        return out


def _split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def linear_probes(hidden: Tensor, examples: Sequence | None = None, target: str = "last_digit",
                  labels: Tensor | None = None, step_names: list[str] | None = None,
                  test_fraction: float = 0.3, seed: int = 0, n_shuffles: int = 3, min_examples: int = 10,
                  lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4), threads: int | None = 1
                  ) -> ProbeResult:
    """Fit one linear probe per (target step, layer, slot) from ``hidden`` ``[B, L+1, M, D]`` (see
    :func:`latent_hidden_states`) to the step's label (:func:`probe_targets` of ``examples``, or ``labels``
    ``[B, K]`` directly), training on a random ``1 - test_fraction`` of the problems and scoring on the rest.

    The control refits every probe on training labels shuffled across problems (``n_shuffles`` times,
    scores averaged): what a probe of this capacity reaches when the hidden states carry no information
    about the label. A step with fewer than ``min_examples`` training problems is left NaN. ``threads``
    caps torch's threads while fitting (None: leave as is).
    """
    with _torch_threads(threads):
        return _linear_probes(hidden, examples, target, labels, step_names, test_fraction, seed, n_shuffles,
                              min_examples, lambdas)


def _linear_probes(hidden, examples, target, labels, step_names, test_fraction, seed, n_shuffles, min_examples,
                   lambdas) -> ProbeResult:
    if labels is None:
        if examples is None:
            raise ValueError("give examples (with step_values) or labels")
        labels, step_names = probe_targets(examples, target)
    classify = target == "last_digit"
    B, L1, M, D = hidden.shape
    K = labels.shape[1]
    step_names = step_names or [f"target {k}" for k in range(K)]
    x_all = hidden.float().permute(1, 2, 0, 3).reshape(L1 * M, B, D)  # [P, B, D]
    train_idx, test_idx = _split(B, test_fraction, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    score = torch.full((K, L1, M), math.nan)
    control = torch.full((K, L1, M), math.nan)
    lam_out = torch.full((K, L1, M), math.nan)
    loo_out = torch.full((K, L1, M), math.nan)
    chance = torch.full((K,), math.nan)
    n_train, n_test = torch.zeros(K, dtype=torch.long), torch.zeros(K, dtype=torch.long)
    n_classes = 10
    for k in range(K):  # a few target steps; each fits all (layer, slot) probes in one batched solve
        y = labels[:, k]
        valid = (y >= 0) if classify else torch.isfinite(y)
        tr, te = train_idx[valid[train_idx]], test_idx[valid[test_idx]]
        n_train[k], n_test[k] = len(tr), len(te)
        if len(tr) < min_examples or len(te) < 1:
            continue
        if classify:
            y_tr = nn.functional.one_hot(y[tr], n_classes).float()
            y_te = y[te]
            counts = torch.bincount(y[tr], minlength=n_classes)
            chance[k] = (y_te == counts.argmax()).float().mean()
        else:
            y_tr = y[tr, None].float()
            y_te = y[te].float()
            chance[k] = 0.0

        def evaluate(y_fit):
            pred, lam, loo = ridge_fit_predict(x_all[:, tr], y_fit, x_all[:, te], lambdas, classify)
            if classify:
                return (pred.argmax(-1) == y_te).float().mean(1), lam, loo
            resid = (pred[..., 0] - y_te).pow(2).sum(1)
            total = (y_te - y[tr].float().mean()).pow(2).sum().clamp(min=1e-12)
            return 1 - resid / total, lam, loo

        s, lam, loo = evaluate(y_tr)
        score[k], lam_out[k], loo_out[k] = s.view(L1, M), lam.view(L1, M), loo.view(L1, M)
        shuffled = [evaluate(y_tr[torch.randperm(len(tr), generator=gen)])[0] for _ in range(n_shuffles)]
        control[k] = torch.stack(shuffled).mean(0).view(L1, M)
    return ProbeResult(target=target, metric="accuracy" if classify else "r2", step_names=step_names,
                       score=score, control=control, chance=chance, n_train=n_train, n_test=n_test,
                       lambdas=lam_out, loo=loo_out)


# -------------------------------------------------------------------------------------- the demo run

def small_mode() -> bool:
    """:func:`kava_lab.runs.small_mode` (``KAVA_LAB_SMALL=1`` in CI): notebooks use tiny sizes."""
    from .runs import small_mode as _small

    return _small()


def demo_config(method: str = "kava", small: bool | None = None, steps: int | None = None,
                stage0_steps: int | None = None, trace: str | None = None, train_limit: int | None = None):
    """The config of a short tiny run for notebooks called without a run folder.

    Default: the tiny preset with ``steps=100`` of ``method``. Its stage 0 (CoT pretraining of the
    from-scratch backbone) is the preset's own when that is already in the cache (no cost: data and batch
    are left as the preset has them, since the stage-0 cache key includes them), else a short one of
    ``stage0_steps=200``. Small mode (``KAVA_LAB_SMALL=1``): 20 stage-0 steps + 20 steps of batch 8 on 500
    problems, a smoke test whose latents carry little.
    """
    from .config import get_preset
    from .runs import stage0_dir

    small = small_mode() if small is None else small
    cfg = get_preset("tiny", method, trace=trace)
    steps = steps if steps is not None else (20 if small else 100)
    optim = replace(cfg.optim, steps=steps)
    data = cfg.data
    if small:
        optim = replace(optim, batch_size=8, effective_batch=8)
        data = replace(data, train_limit=500)
    if train_limit is not None:
        data = replace(data, train_limit=train_limit)
    cfg = replace(cfg, log_every=10, save_every=max(steps, 1), data=data, optim=optim)
    if stage0_steps is None:
        full_cached = (stage0_dir(cfg) / "model" / "config.json").exists()
        stage0_steps = 20 if small else (cfg.stage0_steps if full_cached else 200)
    return replace(cfg, stage0_steps=stage0_steps)


def _finished_latent_run(run_dir: Path) -> bool:
    from .config import RunConfig
    from .runs import checkpoint_path

    if not (run_dir / "config.json").exists():
        return False
    ckpt = checkpoint_path(run_dir)
    if ckpt is None:
        return False
    cfg = RunConfig.load(run_dir / "config.json")
    return cfg.uses_latents and json.loads((ckpt / "step.json").read_text())["step"] >= cfg.optim.steps


def demo_run(method: str = "kava", small: bool | None = None, log: Callable[[str], None] = print,
             root: str | Path | None = None, reuse: Sequence[str | Path] = (), **overrides) -> Path:
    """A run folder to probe when none is given: the first of ``reuse`` that holds a finished latent run
    (e.g. notebook 03's ``runs/03/run``), else a short tiny run trained (or reused, or resumed) in
    ``<cache>/probe-demo/<method>-<digest>`` (or under ``root``). ``overrides`` go to :func:`demo_config`.
    Says which through ``log``."""
    from .backbone import cache_dir
    from .config import RunConfig
    from .runs import checkpoint_path
    from .train import train

    for candidate in reuse:
        candidate = Path(candidate)
        if _finished_latent_run(candidate):
            c = RunConfig.load(candidate / "config.json")
            log(f"reusing the finished {c.method} run {candidate.resolve()} ({c.optim.steps} steps, stage 0: "
                f"{c.stage0_steps} steps)")
            return candidate
    cfg = demo_config(method, small=small, **overrides)
    from . import synthetic

    key = {**cfg.to_dict(), "synthetic_version": getattr(synthetic, "VERSION", None)}  # never reuse stale data
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    folder = Path(root) if root is not None else cache_dir() / "probe-demo"
    run_dir = folder / f"{method}-{digest}"
    ckpt = checkpoint_path(run_dir) if run_dir.exists() else None
    if ckpt is not None and json.loads((ckpt / "step.json").read_text())["step"] >= cfg.optim.steps \
            and RunConfig.load(run_dir / "config.json") == cfg:
        log(f"reusing the cached {method} demo run {run_dir} ({cfg.optim.steps} steps, stage 0: "
            f"{cfg.stage0_steps} steps)")
        return run_dir
    log(f"training a short {method} demo run into {run_dir}: stage 0 {cfg.stage0_steps} steps (cached when "
        f"already built), then {cfg.optim.steps} steps on {cfg.data.train_limit} problems")
    return train(cfg, run_dir, resume="auto", log=log)


# ------------------------------------------------------------------------------------------------ figures

def fig_decoded(dec: LatentDecoding, tokenizer, example: int = 0, slot_mask: Tensor | None = None,
                title: str | None = None):
    """Heatmap iteration x slot of the top-1 probability, each cell labelled with its top-1 token (``*``:
    the token occurs in the teacher's CoT); hover shows the top-k."""
    import plotly.graph_objects as go

    I, _, M, k = dec.token_ids.shape
    text, hover = [], []
    for i in range(I):
        toks = dec.tokens(tokenizer, example, i)
        row_t, row_h = [], []
        for j in range(M):
            star = "*" if dec.in_trace is not None and bool(dec.in_trace[i, example, j]) else ""
            row_t.append(toks[j][0] + star)
            row_h.append("<br>".join(f"{t!r}: {p:.2f}" for t, p in zip(toks[j], dec.probs[i, example, j].tolist())))
        text.append(row_t)
        hover.append(row_h)
    fig = go.Figure(go.Heatmap(z=dec.probs[:, example, :, 0].numpy(), x=[f"slot {j + 1}" for j in range(M)],
                               y=dec.iteration_labels, text=text, texttemplate="%{text}", customdata=hover,
                               hovertemplate="%{y}, %{x}<br>%{customdata}<extra></extra>", colorscale="Blues",
                               zmin=0, zmax=1, colorbar=dict(title="top-1 p")))
    if slot_mask is not None:
        invalid = [f"slot {j + 1}" for j in range(M) if not bool(slot_mask[example, j])]
        if invalid:
            fig.add_annotation(text=f"slots past the CoT length: {', '.join(invalid)}", showarrow=False,
                               xref="paper", yref="paper", x=0, y=-0.25, xanchor="left")
    fig.update_layout(title=title or f"decoded latents, example {example} (* = token in the teacher's CoT)",
                      yaxis=dict(autorange="reversed"), height=160 + 40 * I)
    return fig


def fig_match_rate(dec: LatentDecoding, slot_mask: Tensor | None = None, title: str = ""):
    import plotly.graph_objects as go

    rates = dec.match_rate(slot_mask)
    names = {"top1": "top-1 in own CoT", "topk": f"any top-{dec.token_ids.shape[-1]} in own CoT",
             "control": "top-1 in another problem's CoT"}
    fig = go.Figure([go.Bar(name=names[k], x=dec.iteration_labels, y=v.numpy()) for k, v in rates.items()])
    fig.update_layout(barmode="group", yaxis=dict(range=[0, 1], title="fraction of latent slots"),
                      title=title or "decoded latent tokens found in the teacher's trace")
    return fig


def fig_alignment(align: KVAlignment, layer: int = 0, kind: str = "keys", example: int | None = None):
    """``M x M`` cosine matrix (student slot i vs teacher slot j) of one layer, mean or one example."""
    import plotly.graph_objects as go

    mat = align.mean(kind)[layer] if example is None else getattr(align, kind)[example, layer]
    M = mat.shape[-1]
    score = (align.key_score if kind == "keys" else align.value_score)[layer]
    who = "mean over examples" if example is None else f"example {example}"
    fig = go.Figure(go.Heatmap(z=mat.numpy(), x=[str(j + 1) for j in range(M)], y=[str(i + 1) for i in range(M)],
                               colorscale="RdBu", zmid=0, colorbar=dict(title="cos")))
    fig.update_layout(title=f"{kind[:-1]} cosine, layer {layer} ({who}); diagonal score {float(score):.3f}",
                      xaxis=dict(title="teacher slot (compressed CoT entry)"),
                      yaxis=dict(title="student latent slot", autorange="reversed"), width=520, height=480)
    return fig


def fig_alignment_scores(align: KVAlignment, title: str = ""):
    import plotly.graph_objects as go

    layers = [f"layer {i}" for i in range(len(align.key_score))]
    fig = go.Figure([
        go.Bar(name="K", x=layers, y=align.key_score.numpy()),
        go.Bar(name="V", x=layers, y=align.value_score.numpy()),
        go.Bar(name="K, other problem's teacher", x=layers, y=align.key_control.numpy()),
        go.Bar(name="V, other problem's teacher", x=layers, y=align.value_control.numpy()),
    ])
    fig.update_layout(barmode="group", yaxis=dict(title="mean diagonal - mean off-diagonal cos"),
                      title=title or "student vs compressed teacher cache: diagonal score per layer")
    return fig


def fig_trajectory(proj: TrajectoryProjection, example: int = 0, dims: int = 2, slot_mask: Tensor | None = None):
    """One example's latents in PC space: a line through the slots for each iteration (colour), grey lines
    joining each slot across iterations; marker labels are slot numbers."""
    import plotly.graph_objects as go

    c = proj.coords[:, example]  # [I, M, k]
    I, M, k = c.shape
    dims = min(dims, k)
    scatter = go.Scatter3d if dims == 3 else go.Scatter
    mode_kw = {} if dims == 3 else {"textposition": "top center"}
    axes = lambda pts: dict(zip("xyz", [pts[..., a].numpy() for a in range(dims)]))  # noqa: E731
    traces = []
    if I > 1:
        for j in range(M):
            traces.append(scatter(**axes(c[:, j]), mode="lines", line=dict(color="lightgrey"), showlegend=False,
                                  hoverinfo="skip"))
    for i in range(I):
        traces.append(scatter(**axes(c[i]), mode="lines+markers+text", name=proj.iteration_labels[i],
                              text=[str(j + 1) for j in range(M)], **mode_kw))
    fig = go.Figure(traces)
    ev = ", ".join(f"PC{a + 1} {float(proj.explained[a]):.0%}" for a in range(dims))
    fig.update_layout(title=f"latent trajectory, example {example} ({ev} of variance)", height=500)
    if dims == 2:
        fig.update_layout(xaxis_title="PC1", yaxis_title="PC2")
    return fig


def fig_trajectory_cloud(proj: TrajectoryProjection, max_examples: int = 200):
    """All examples: every slot at every iteration as a point, coloured by slot, one panel-free legend entry
    per iteration (marker symbol)."""
    import plotly.graph_objects as go

    c = proj.coords[:, :max_examples]
    I, B, M, _ = c.shape
    symbols = ["circle", "diamond", "square", "x", "cross", "triangle-up"]
    traces = []
    for i in range(I):
        slots = torch.arange(M).repeat(B) + 1
        traces.append(go.Scatter(x=c[i, ..., 0].flatten().numpy(), y=c[i, ..., 1].flatten().numpy(), mode="markers",
                                 name=proj.iteration_labels[i], marker=dict(color=slots.numpy(), colorscale="Viridis",
                                 size=5, opacity=0.6, symbol=symbols[i % len(symbols)],
                                 colorbar=dict(title="slot") if i == 0 else None)))
    fig = go.Figure(traces)
    fig.update_layout(title=f"all latents of {B} problems in PC space (colour: slot, symbol: iteration)",
                      xaxis_title="PC1", yaxis_title="PC2", height=500)
    return fig


def fig_deltas(deltas: Tensor, iteration_labels: list[str]):
    import plotly.graph_objects as go

    M = deltas.shape[1]
    fig = go.Figure([go.Scatter(x=[f"{j + 1}" for j in range(M)], y=deltas[t].numpy(), mode="lines+markers",
                                name=f"{iteration_labels[t]} -> {iteration_labels[t + 1]}")
                     for t in range(deltas.shape[0])])
    fig.update_layout(title="relative change of each slot's hidden state per iteration",
                      xaxis_title="slot", yaxis_title="||h_t - h_t-1|| / ||h_t-1||")
    return fig


def fig_probe(result: ProbeResult, step: int = -1, control: bool = False):
    """Layer x slot heatmap of held-out probe scores for one target step (or its shuffled control)."""
    import plotly.graph_objects as go

    k = step % len(result.step_names)
    z = (result.control if control else result.score)[k]
    L1, M = z.shape
    metric = result.metric
    fig = go.Figure(go.Heatmap(z=z.numpy(), x=[str(j + 1) for j in range(M)],
                               y=["embedding"] + [f"layer {i}" for i in range(1, L1)], colorscale="Viridis",
                               zmin=0, zmax=1 if metric == "accuracy" else None, colorbar=dict(title=metric),
                               texttemplate="%{z:.2f}"))
    what = "shuffled-label control" if control else "held-out"
    fig.update_layout(title=f"linear probe {metric} ({what}), {result.step_names[k]} ({result.target}); "
                            f"chance {float(result.chance[k]):.2f}",
                      xaxis_title="latent slot", yaxis_title="hidden state", height=180 + 30 * L1)
    return fig


def fig_probe_summary(result: ProbeResult):
    """Per target step: best held-out probe, best shuffled control, and majority-class chance."""
    import plotly.graph_objects as go

    rows = result.best()
    x = [r["step"] for r in rows]
    fig = go.Figure([
        go.Bar(name="probe at the site chosen on training problems (held-out)", x=x,
               y=[r[result.metric] for r in rows], text=[f"L{r['layer']} s{r['slot'] + 1}" for r in rows]),
        go.Bar(name="max over sites (held-out, optimistic)", x=x, y=[r["max_over_sites"] for r in rows]),
        go.Bar(name="shuffled labels (same site)", x=x, y=[r["control"] for r in rows]),
        go.Bar(name="shuffled labels (max over sites)", x=x, y=[r["control_max"] for r in rows]),
        go.Bar(name="majority class", x=x, y=[r["chance"] for r in rows]),
    ])
    fig.update_layout(barmode="group", title=f"linear probes on latent hidden states: {result.target}",
                      yaxis_title=result.metric)
    return fig


# ------------------------------------------------------------------------------------------------ widgets

def explore(fn: Callable, **controls):
    """Widgets that re-draw ``fn(**values)`` into an output area below them whenever a control changes.

    ``controls``: ``(lo, hi)`` or ``(lo, hi, value)`` -> integer slider; a list (of values or
    ``(label, value)`` pairs) -> dropdown; a bool -> checkbox; an ipywidgets widget is used as is. Initial
    values come from ``fn``'s defaults. Nothing is drawn when the cell runs: the static figure above the
    widgets is the default view, and a notebook executed headless (papermill, nbmake) never waits on
    output-widget messages (``ipywidgets.interact`` draws at once into an Output widget, which can stall
    nbclient). Returns the widget box (make it the cell's last expression, or ``display`` it), or None when
    ipywidgets is not installed.
    """
    import inspect

    try:
        import ipywidgets as W
    except ImportError:
        print("ipywidgets is not installed: the static figures are all there is")
        return None
    defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def make(name, spec):
        if isinstance(spec, W.ValueWidget):
            return spec
        if isinstance(spec, bool):
            return W.Checkbox(value=defaults.get(name, spec), description=name)
        if isinstance(spec, tuple):
            lo, hi = spec[0], spec[1]
            value = spec[2] if len(spec) > 2 else defaults.get(name, lo)
            return W.IntSlider(min=lo, max=hi, value=min(max(value, lo), hi), description=name,
                               continuous_update=False)
        options = list(spec)
        values = [o[1] if isinstance(o, tuple) else o for o in options]
        value = defaults.get(name, values[0])
        return W.Dropdown(options=options, value=value if value in values else values[0], description=name)

    widgets = {name: make(name, spec) for name, spec in controls.items()}
    out = W.Output()

    def redraw(_=None):
        with out:
            out.clear_output(wait=True)
            fn(**{name: w.value for name, w in widgets.items()})

    for w in widgets.values():
        w.observe(redraw, names="value")
    box = W.VBox([W.HBox(list(widgets.values())), out])
    box.redraw = redraw  # for tests and for drawing once by hand
    return box
