"""Teacher mode: one forward pass over ``question + CoT + answer``, keeping what distillation needs.

Signals kept (detached, kava-method.md §1), for a padded teacher :class:`~kava_lab.encoding.Batch`:

- ``ce``: next-token cross-entropy on CoT, answer prompt, answer and eos (carries gradients);
- ``cot_keys``, ``cot_values`` ``[B, L, H_kv, N, d]``: post-RoPE keys and values of the CoT span, as the
  cache holds them, with ``cot_mask`` ``[B, N]``;
- ``answer_queries`` ``[B, L, H_q, A, d]`` (post-RoPE) of the answer span (prompt + answer + eos) with
  ``answer_mask`` ``[B, A]``, and their logits against the CoT keys ``answer_logits`` ``[B, L, H_q, A, N]``;
- ``anchor_hidden`` ``[B, L, D]``: the hidden state of every layer at the last answer-prompt token.

Queries are not in the KV cache, so they are captured by a registered attention function that records
them and delegates to the model's own implementation (sdpa or eager); the model's configuration is
restored in a ``finally`` block, so no class is patched and nothing leaks out of the context.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .backbone import forward_cached
from .encoding import Batch, Collator, EncodingConfig, encode

_CAPTURE = "kava_capture"
_state = threading.local()


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Record this layer's post-RoPE queries ``[B, H_q, S, d]``, then run the wrapped implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    store = getattr(_state, "store", None)
    if store is not None:
        store[module.layer_idx] = query.detach()
        store.setdefault("scaling", kwargs.get("scaling") or query.shape[-1] ** -0.5)
    inner = getattr(_state, "inner", "sdpa")
    if inner == "eager":  # each model family defines its own eager function next to its attention class
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


def _capture_mask(*args, **kwargs):
    """The mask the wrapped implementation expects (boolean for sdpa, additive float for eager)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS[getattr(_state, "inner", None) or "sdpa"](*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    if _CAPTURE not in AttentionInterface._global_mapping:
        AttentionInterface.register(_CAPTURE, _capture_attention)
        AttentionMaskInterface.register(_CAPTURE, _capture_mask)


@contextlib.contextmanager
def capture_queries(model):
    """Within the block, every attention layer's queries land in the yielded dict ``{layer: [B,H_q,S,d]}``."""
    _register()
    config = model.config
    previous = config._attn_implementation
    previous_inner = previous if previous in ("sdpa", "eager") else "sdpa"
    store: dict = {}
    _state.store, _state.inner = store, previous_inner
    config._attn_implementation = _CAPTURE
    try:
        yield store
    finally:
        config._attn_implementation = previous
        _state.store, _state.inner = None, None


@dataclass
class TeacherOutput:
    ce: torch.Tensor  # [] teacher CE (with grad when the model is trained)
    cot_keys: torch.Tensor  # [B, L, H_kv, N, d]
    cot_values: torch.Tensor  # [B, L, H_kv, N, d]
    cot_mask: torch.Tensor  # [B, N] bool
    answer_queries: torch.Tensor  # [B, L, H_q, A, d]
    answer_mask: torch.Tensor  # [B, A] bool
    answer_logits: torch.Tensor | None  # [B, L, H_q, A, N] = q.k * scaling (unmasked); None unless asked
    anchor_hidden: torch.Tensor  # [B, L, D]
    cot_ids: torch.Tensor  # [B, N] token ids of the CoT span (pad where masked)
    cache: object = None  # the pass's KV cache (with gradients when trained), only if asked; never saved

    _SAVED = ("cot_keys", "cot_values", "cot_mask", "answer_queries", "answer_mask", "answer_logits",
              "anchor_hidden", "cot_ids")

    def nbytes(self) -> int:
        """Bytes of the CoT K/V cache actually held for valid tokens (both K and V, all layers)."""
        from .analysis import kv_cache_bytes  # the one formula

        _, layers, heads, _, head_dim = self.cot_keys.shape
        per_token = kv_cache_bytes(1, layers, heads, head_dim, self.cot_keys.dtype)
        return int(self.cot_mask.sum()) * per_token

    def save(self, path: str | Path) -> None:
        """Write the extracted signals to a safetensors file (precompute once, reuse)."""
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k).detach().contiguous().cpu() for k in self._SAVED if getattr(self, k) is not None}
        tensors["cot_mask"] = tensors["cot_mask"].to(torch.uint8)
        tensors["answer_mask"] = tensors["answer_mask"].to(torch.uint8)
        tensors["ce"] = self.ce.detach().float().reshape(1).cpu()
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "TeacherOutput":
        from safetensors.torch import load_file

        t = load_file(str(path), device=str(device))
        missing = [f.name for f in fields(cls) if f.name not in t and f.name not in ("cache", "answer_logits")]
        if missing:
            raise ValueError(f"{path}: not a teacher extraction, missing tensors {missing}")
        t["cot_mask"], t["answer_mask"] = t["cot_mask"].bool(), t["answer_mask"].bool()
        t["ce"] = t["ce"][0]
        t.setdefault("answer_logits", None)
        return cls(**t)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, S, d]``, index ``[B, A]`` -> ``[B, H, A, d]``."""
    B, H, _, d = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], d))


def extract_teacher(model, batch: Batch, with_grad: bool = False, keep_cache: bool = False,
                    with_logits: bool = True) -> TeacherOutput:
    """Run the teacher on a padded teacher batch and return its CE and the detached signals above.
    ``keep_cache``: also return the pass's cache (the student can reuse its question columns).
    ``with_logits=False`` skips the answer->CoT logits (a float32 ``[B, L, H_q, A, N]`` einsum that only the
    notebooks read; training's compressor recomputes importance from the queries and keys)."""
    cot_n = int(batch.cot_len.max())
    a_index, a_mask = batch.answer_index()  # [B, A]
    P = batch.P
    context = contextlib.nullcontext() if with_grad else torch.no_grad()
    with context, capture_queries(model) as queries:
        out, cache = forward_cached(model, None, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, labels=batch.labels, output_hidden_states=True)
    L = len(cache.layers)
    keys = torch.stack([cache.layers[i].keys[:, :, P:P + cot_n] for i in range(L)], 1).detach()
    values = torch.stack([cache.layers[i].values[:, :, P:P + cot_n] for i in range(L)], 1).detach()
    q = torch.stack([_gather_rows(queries[i], a_index) for i in range(L)], 1)  # [B, L, H_q, A, d]
    logits = None
    if with_logits:
        h_q, h_kv = q.shape[2], keys.shape[2]
        k_rep = keys.repeat_interleave(h_q // h_kv, dim=2)  # [B, L, H_q, N, d]
        logits = torch.einsum("blhad,blhnd->blhan", q.float(), k_rep.float()) * queries["scaling"]
    hidden = torch.stack(out.hidden_states[1:], 1)  # [B, L, S, D]
    anchor = hidden.gather(2, batch.anchor[:, None, None, None].expand(-1, L, 1, hidden.shape[-1]))[:, :, 0]
    cot_ids = batch.input_ids[:, P:P + cot_n]
    return TeacherOutput(ce=out.loss, cot_keys=keys, cot_values=values, cot_mask=batch.cot_mask,
                         answer_queries=q, answer_mask=a_mask, answer_logits=logits,
                         anchor_hidden=anchor.detach(), cot_ids=cot_ids, cache=cache if keep_cache else None)


# --------------------------------------------------------------------------------------------------------
# Batched extraction (notebooks 01, 02): many examples in batches, merged into one TeacherOutput


def _pad_dim(x: Tensor, dim: int, size: int, value: float | int | bool = 0) -> Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def merge_outputs(outputs: Sequence[Any], pad_id: int = 0):
    """Concatenate teacher extractions of several batches along the batch dimension, padding the CoT
    length ``N`` and the answer length ``A`` (pads are masked: ``cot_mask``/``answer_mask`` False, ``cot_ids``
    = ``pad_id``, K/V, queries and logits 0). ``ce`` becomes the mean of the batches' CE."""
    if not outputs:
        raise ValueError("merge_outputs needs at least one extraction")
    if len(outputs) == 1:
        return outputs[0]
    n = max(o.cot_keys.shape[3] for o in outputs)
    a = max(o.answer_queries.shape[3] for o in outputs)
    cat = lambda items: torch.cat(items, dim=0)  # noqa: E731
    return TeacherOutput(
        ce=torch.stack([o.ce.detach().float() for o in outputs]).mean(),
        cot_keys=cat([_pad_dim(o.cot_keys, 3, n) for o in outputs]),
        cot_values=cat([_pad_dim(o.cot_values, 3, n) for o in outputs]),
        cot_mask=cat([_pad_dim(o.cot_mask, 1, n, False) for o in outputs]),
        answer_queries=cat([_pad_dim(o.answer_queries, 3, a) for o in outputs]),
        answer_mask=cat([_pad_dim(o.answer_mask, 1, a, False) for o in outputs]),
        answer_logits=cat([_pad_dim(_pad_dim(o.answer_logits, 3, a), 4, n) for o in outputs]),
        anchor_hidden=cat([o.anchor_hidden for o in outputs]),
        cot_ids=cat([_pad_dim(o.cot_ids, 1, n, pad_id) for o in outputs]),
    )


def _take(ext, index: Tensor):
    """Rows ``index`` of every batch-first tensor of an extraction."""
    kw = {f.name: getattr(ext, f.name) for f in fields(TeacherOutput)}
    return TeacherOutput(**{k: (v if k == "ce" or v is None else v.index_select(0, index)) for k, v in kw.items()})


def extract_many(backbone, examples: Sequence, batch_size: int = 4, cfg: EncodingConfig = EncodingConfig(),
                 sort_by_length: bool = True):
    """Teacher extraction over ``examples`` in batches of ``batch_size``, merged into one extraction in the
    order of ``examples``. Returns ``(TeacherOutput, [Encoded, ...])``.

    ``sort_by_length`` batches examples of similar length together (less padding, faster); the result is
    put back in the input order, and an example's signals do not depend on its batch (see encoding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    encoded = [encode(e, backbone.tokenizer, cfg) for e in examples]
    if not encoded:
        raise ValueError("extract_many needs at least one example")
    collate = Collator.for_backbone(backbone)
    total = [x.teacher_len for x in encoded]
    order = sorted(range(len(encoded)), key=lambda i: total[i]) if sort_by_length else list(range(len(encoded)))
    outs = []
    for start in range(0, len(order), batch_size):
        batch = collate([encoded[i] for i in order[start:start + batch_size]], mode="teacher")
        outs.append(extract_teacher(backbone.model, batch))
    merged = merge_outputs(outs, pad_id=backbone.pad_id)
    if order != list(range(len(order))):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        merged = _take(merged, inverse)
    return merged, encoded
