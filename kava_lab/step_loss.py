"""An optional step-level auxiliary loss (SIM-CoT-style): each latent must be able to write one CoT step.

KaVa's terms supervise the latents as a whole (the compressed KV cache, the answer anchor); nothing asks a
given latent to hold a given intermediate result, and on the tiny tasks the answer learns to ignore them.
SIM-CoT (arXiv 2509.20317) adds an auxiliary decoder that, from one latent alone, decodes the CoT step it
stands for. Here the backbone itself is that decoder (weights shared; SIM-CoT trains a separate copy and drops
it at inference). Inference is unchanged.

The ``k`` CoT steps the latents replace (the teacher's CoT: the last step is dropped by default) are spread
evenly over the ``M`` slots, step ``j`` on slot ``ceil((j + 1) M / k) - 1``, so the last step sits on the last
slot. Each pair becomes one short sequence ``[z_slot, step tokens[:-1]]`` (positions from 0, no question)
trained with next-token CE on the step's tokens; ``z`` is the latent input of the last pass, so gradients
reach the projection and every pass that produced it. Weight: ``loss.a_step`` (0, off, in every preset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .encoding import Batch


def step_slots(k: int, M: int) -> list[int]:
    """Slot of each of ``k`` steps among ``M`` latents: ``ceil((j + 1) M / k) - 1``, increasing, last = M - 1."""
    return [-(-(j + 1) * M // k) - 1 for j in range(k)]


def step_sequences(teacher_batch: Batch, M: int, covered: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The (row, slot, step tokens) triples of a teacher batch.

    ``covered`` ``[B]``: CoT tokens the latents replace (a curriculum's ``cot_latent_len``); default the whole
    CoT. Only steps that end within it count. Returns rows ``[n]``, slots ``[n]`` and ``n`` token tensors."""
    if len(teacher_batch.step_lens) != len(teacher_batch):
        raise ValueError("the teacher batch carries no CoT step boundaries; collate it with mode='teacher'")
    rows, slots, tokens = [], [], []
    P = teacher_batch.P
    for b, lens in enumerate(teacher_batch.step_lens):
        limit = int(teacher_batch.cot_len[b] if covered is None else covered[b])
        if limit and not lens:
            ex = teacher_batch.examples[b] if teacher_batch.examples else None
            raise ValueError(f"example {getattr(ex, 'id', b)!r}: a step-level loss needs the CoT's step boundaries, "
                             "and this tokenizer gives no character offsets")
        ends = torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()
        k = sum(1 for end in ends if end <= limit)
        start = 0
        for j, slot in enumerate(step_slots(k, M) if k else []):
            rows.append(b)
            slots.append(slot)
            tokens.append(teacher_batch.input_ids[b, P + start:P + ends[j]])
            start = ends[j]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(slots, dtype=torch.long), tokens


def step_decoding_loss(model, latents: torch.Tensor, teacher_batch: Batch,
                       covered: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token CE of every replaced CoT step decoded from its latent alone.

    latents: ``[B, M, D]`` (the student's last-pass inputs, with gradients). Returns a scalar (0 with a graph
    when the batch has no step to decode)."""
    rows, slots, tokens = step_sequences(teacher_batch, latents.shape[1], covered)
    if not tokens:
        return latents.sum() * 0.0
    logits, labels = step_decoder_logits(model, latents[rows.to(latents.device), slots.to(latents.device)], tokens)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def step_decoder_logits(model, z: torch.Tensor, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step decoder: each sequence ``[z_i, tokens_i[:-1]]`` (positions from 0, no question) through ``model``.

    z: ``[n, D]`` one latent per step; ``tokens``: ``n`` step token tensors. Returns logits ``[n, W, V]``
    (position i predicts token i) and labels ``[n, W]`` (-100 past each step's end)."""
    device = z.device
    n, width = len(tokens), max(len(t) for t in tokens)
    ids = torch.zeros(n, width, dtype=torch.long, device=device)  # [n, W] step tokens, right-padded
    labels = torch.full((n, width), -100, dtype=torch.long, device=device)
    mask = torch.zeros(n, width, dtype=torch.long, device=device)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = t
        labels[i, :len(t)] = t
        mask[i, :len(t)] = 1
    embeds = model.get_input_embeddings()(ids[:, :-1])  # [n, W-1, D]
    inputs = torch.cat([z[:, None].to(embeds.dtype), embeds], 1)  # [n, W, D]
    positions = torch.arange(width, device=device)[None].expand(n, -1)
    return model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).logits, labels
