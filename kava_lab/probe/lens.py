"""Reading latent slots as tokens: the final norm and LM head found generically, the logit lens, and top-k
decoding of every slot at every iteration checked against the teacher's CoT (:func:`decode_latents`).

Shapes: ``I`` iterations, ``B`` examples, ``M`` slots, ``D`` hidden size, ``V`` vocabulary, ``k`` top tokens.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ..analysis import token_text


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
        texts = [[token_text(tokenizer, i) for i in row.tolist()] for row in ids]
        return [[t.strip() or repr(t) for t in row] for row in texts]  # a bare space or newline stays visible


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
