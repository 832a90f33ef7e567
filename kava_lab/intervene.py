"""Interventions on the latent cache: do the answers read the latents?

After the latent loop the cache holds ``[question, <bot>, M latents]`` and the answer is decoded on top of
it. An intervention replaces the M latent columns of every layer before the answer is decoded:

- ``donor``: example ``i`` gets the latent K/V of example ``(i + 1) mod B`` of the same batch; the answer
  still reads its own question. If the answer reads the latents, accuracy falls, and on synthetic problems
  the prediction tends to the *counterfactual answer* (this problem's final step applied to the donor's
  intermediate result, :func:`kava_lab.synthetic.counterfactual_answer`).
- ``zero``: the K/V the model computes from all-zero latent inputs on the example's own question cache
  (one extra forward pass, not counted in the reported forward passes).
- ``mean``: the batch mean of the latent K/V (per layer, KV head and slot): the slots' typical content with
  the example-specific part removed.
- ``shuffle-slots``: the M slots permuted within each example (a seeded permutation per example): does the
  answer read the slots as an ordered sequence?
- ``hide``: the M latent columns masked out of the answer's attention (it reads ``[question, <bot>]`` and its
  own tokens): the accuracy of the route that does not go through the latents at all. Not a cache edit: the
  mask is applied by :meth:`kava_lab.student.Student.generate` (``hide_latents``).

One oracle, never a method's accuracy (it reads the gold chain of thought):

- ``target``: the latent K/V replaced by the compressed teacher cache the KV loss aims at (the gold CoT,
  teacher-forced, compressed as in training): the accuracy a student that met its KV target exactly would
  get with these weights. Low means the target itself does not hold the answer (then no amount of KV
  matching helps); high with a low untouched accuracy means the student has not reached its target. Keys
  are placed as the loss compares them: post-RoPE as the teacher cached them (``loss.kv_keys=post_rope``),
  or rotated to the slot positions (``pre_rope``). Slots the target leaves empty keep the student's own.

Keys in the cache are post-RoPE. Moved keys are first rotated back to position zero, then rotated to the
position of the slot they land in, so an intervention changes content, not position (exact for rotary
models: rotations compose). For a model without a rotary embedding module, keys move as they are.
"""

from __future__ import annotations

import torch

from .backbone import forward_cached
from .encoding import Batch
from .student import fork_cache, stack_kv

INTERVENTIONS = ("donor", "zero", "mean", "shuffle-slots", "hide")
ORACLES = ("target",)  # read the gold CoT: diagnostics, never a method's accuracy


def rotary_module(model):
    """The model's rotary embedding module (``...RotaryEmbedding``), or None."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    return None


def rotate_keys(keys: torch.Tensor, positions: torch.Tensor, rotary) -> torch.Tensor:
    """Rotate keys ``[B, L, H, M, d]`` by ``positions`` ``[B, M]`` or ``[B, L, H, M]`` (negative: rotate
    back), Llama convention.

    ``R(a) R(b) = R(a + b)``, so a post-RoPE key at position p rotated by ``-p`` is the pre-RoPE key, and
    rotated by ``q - p`` it is the key the model would compute at position q.
    """
    if rotary is None:
        return keys
    B, L, H, M, d = keys.shape
    if positions.dim() == 2:
        positions = positions[:, None, None, :].expand(B, L, H, M)
    probe = keys[:, 0, 0]  # dtype and device only
    cos, sin = rotary(probe, positions.reshape(B, L * H * M).to(probe.device))  # [B, L*H*M, r]
    scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    cos, sin = (cos / scale).view(B, L, H, M, -1), (sin / scale).view(B, L, H, M, -1)
    r = cos.shape[-1]
    rot, rest = keys[..., :r], keys[..., r:]
    half = r // 2
    rotated = rot * cos + torch.cat([-rot[..., half:], rot[..., :half]], -1) * sin
    return torch.cat([rotated, rest], -1) if rest.shape[-1] else rotated


def donor_index(batch_size: int, device=None) -> torch.Tensor:
    """Example ``i``'s donor is ``(i + 1) mod B`` (itself when ``B == 1``)."""
    return (torch.arange(batch_size, device=device) + 1) % batch_size


def slot_permutations(batch_size: int, M: int, seed: int = 0) -> torch.Tensor:
    """``[B, M]`` seeded permutations, none the identity when ``M > 1``."""
    g = torch.Generator().manual_seed(seed)
    perms = []
    for _ in range(batch_size):
        p = torch.randperm(M, generator=g)
        while M > 1 and bool((p == torch.arange(M)).all()):
            p = torch.randperm(M, generator=g)
        perms.append(p)
    return torch.stack(perms)


@torch.no_grad()
def apply_intervention(kind: str, model, state, batch: Batch, seed: int = 0) -> None:
    """Replace the latent columns ``[P, P + M)`` of every layer of ``state.cache`` in place."""
    if kind not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {kind!r}; expected one of {INTERVENTIONS}")
    if kind == "hide":
        raise ValueError("'hide' masks the latent columns instead of replacing them: "
                         "Student.generate(batch, hide_latents=True)")
    P, M = batch.P, batch.M
    cache = state.cache
    positions = batch.position_ids[:, P:P + M]  # [B, M]
    if kind == "zero":
        question = fork_cache(cache)
        question.crop(-(question.get_seq_length() - P))  # keep [question, <bot>]
        D = state.latents.shape[-1]
        zeros = torch.zeros(len(batch), M, D, dtype=state.latents.dtype, device=state.latents.device)
        _, question = forward_cached(model, question, inputs_embeds=zeros,
                                     attention_mask=batch.attention_mask[:, :P + M], position_ids=positions)
        new_k, new_v = stack_kv(question, P, P + M)
    else:
        keys, values = stack_kv(cache, P, P + M)  # [B, L, H, M, d]
        rotary = rotary_module(model)
        free = rotate_keys(keys, -positions, rotary)  # position-free keys
        if kind == "donor":
            idx = donor_index(len(batch), keys.device)
            free, values = free[idx], values[idx]
        elif kind == "mean":
            free = free.mean(0, keepdim=True).expand_as(free)
            values = values.mean(0, keepdim=True).expand_as(values)
        else:  # shuffle-slots
            perm = slot_permutations(len(batch), M, seed).to(keys.device)  # [B, M]
            index = perm[:, None, None, :, None].expand_as(free)
            free, values = free.gather(3, index), values.gather(3, index)
        new_k = rotate_keys(free, positions, rotary)
        new_v = values
    write_latents(cache, P, M, new_k, new_v)


def write_latents(cache, P: int, M: int, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
    """Columns ``[P, P + M)`` of every layer of ``cache`` <- ``new_k`` / ``new_v`` ``[B, L, H, M, d]``
    (appended when the cache holds exactly ``P`` columns)."""
    for layer_index, layer in enumerate(cache.layers):
        layer.keys = torch.cat([layer.keys[:, :, :P], new_k[:, layer_index].to(layer.keys.dtype),
                                layer.keys[:, :, P + M:]], 2)
        layer.values = torch.cat([layer.values[:, :, :P], new_v[:, layer_index].to(layer.values.dtype),
                                  layer.values[:, :, P + M:]], 2)


def kept_positions(indices: torch.Tensor, teacher_batch: Batch) -> torch.Tensor:
    """Position ids ``[B, L, H, M]`` of kept CoT entries ``indices`` ``[B, L, H, M]`` (indices into the CoT)."""
    B, L, H, M = indices.shape
    cot_pos = teacher_batch.position_ids[:, teacher_batch.P:]  # [B, S_t - P_t]
    return cot_pos.gather(1, indices.reshape(B, -1)).view(B, L, H, M)


def compress_target(ext, cfg, M: int):
    """The KV loss's target from a teacher extraction: ``cfg.compress`` applied as in training."""
    from .compress import compress_extraction, compressor_from_config

    return compress_extraction(ext, compressor_from_config(cfg.compress), M, order=cfg.compress.order,
                               scope=cfg.compress.scope)


@torch.no_grad()
def kv_target(model, cfg, teacher_batch: Batch, M: int):
    """The compressed teacher cache the KV loss aims at for ``teacher_batch`` (gold CoT, teacher-forced):
    a :class:`kava_lab.compress.Compressed` with keys / values ``[B, L, H_kv, M, d]``, as in training."""
    from .teacher import extract_teacher

    return compress_target(extract_teacher(model, teacher_batch, with_logits=False), cfg, M)


def target_in_slots(model, keys: torch.Tensor, values: torch.Tensor, target, batch: Batch, teacher_batch: Batch,
                    kv_keys: str = "post_rope") -> tuple[torch.Tensor, torch.Tensor]:
    """The latent K/V ``[B, L, H_kv, M, d]`` with ``target``'s entries in the slots it fills, keys placed as the KV
    loss compares them (post-RoPE as cached, or pre-RoPE rotated to the slot positions); the slots the target
    leaves empty keep ``keys`` / ``values`` (the student's own)."""
    P, M = batch.P, batch.M
    t_keys, t_values = target.keys.to(keys.dtype), target.values.to(values.dtype)
    if kv_keys == "pre_rope":
        t_pos = kept_positions(target.indices, teacher_batch)  # [B, L, H, M]
        s_pos = batch.position_ids[:, P:P + M][:, None, None, :].expand_as(t_pos)
        t_keys = rotate_keys(t_keys, s_pos - t_pos, rotary_module(model))
    elif kv_keys != "post_rope":
        raise ValueError(f"kv_keys must be 'post_rope' or 'pre_rope', found {kv_keys!r}")
    valid = target.slot_mask[..., None]  # [B, L, H, M, 1]
    return torch.where(valid, t_keys, keys), torch.where(valid, t_values, values)


@torch.no_grad()
def apply_target(model, state, batch: Batch, target, teacher_batch: Batch, kv_keys: str = "post_rope") -> None:
    """The ``target`` oracle: latent columns ``[P, P + M)`` of ``state.cache`` <- ``target`` (from
    :func:`kava_lab.intervene.kv_target` on the same examples), keys placed as the KV loss compares them."""
    P, M = batch.P, batch.M
    keys, values = stack_kv(state.cache, P, P + M)  # the student's own: kept where the target has no entry
    write_latents(state.cache, P, M, *target_in_slots(model, keys, values, target, batch, teacher_batch, kv_keys))
