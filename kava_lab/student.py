"""Student mode: reason silently over M continuous latent tokens, then answer (kava-method.md §2).

Jacobi mode (PCCoT / KaVa)::

    prefill [question, <bot>, <latent> x M]           -> h          (1 pass)
    z_1 = P(h(<bot>)),  z_i = P(h(<latent>_{i-1}))                    (shifted by one)
    for t in 1..T: run z on the cache of [question, <bot>] -> o;  z_1 stays, z_{i+1} = P(o_i)
    the M latent K/V of the last pass are the student's latent cache
    answer: [<eot>, prompt, answer, eos] on top of that cache

Sequential mode (CODI): prefill ``[question, <bot>]``, then one latent per pass, ``z_{i+1} = P(h_i)``,
reusing the growing cache (M passes). Gradients flow through every pass.

All tensors follow the cache layout ``[batch, kv_heads, tokens, head_dim]``; per-layer K/V are stacked
into ``[B, L, H_kv, M, d]``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .backbone import forward_cached
from .config import LatentConfig
from .encoding import Batch


class Projection(nn.Module):
    """``Linear(d,d) -> GELU -> Linear(d,d) -> LayerNorm(d)`` on last-layer hidden states (or identity)."""

    def __init__(self, d: int, enabled: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d)) if enabled else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, n, D]
        if self.net is None:
            return h
        return self.net(h.to(self.net[0].weight.dtype)).to(h.dtype)


class SoftToken(nn.Module):
    """``softmax(lm_head(h) / tau) @ E``: the token-embedding mixture the model predicts from last-layer hidden
    states (``latent.input=soft_token``). No parameters of its own: it reads the backbone's output and input
    embeddings, so training it trains the backbone's."""

    def __init__(self, model: nn.Module, tau: float = 1.0):
        super().__init__()
        if not tau > 0:
            raise ValueError(f"latent.tau must be > 0, found {tau}")
        self.tau = tau
        self._model = [model]  # a list, so the backbone is not registered twice as a submodule

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, n, D]
        model = self._model[0]
        logits = model.get_output_embeddings()(h)  # [B, n, V]
        weights = torch.softmax(logits.float() / self.tau, -1).to(h.dtype)
        return weights @ model.get_input_embeddings().weight  # [B, n, D]


def latent_input(model: nn.Module, cfg: LatentConfig, d: int) -> nn.Module:
    """The map from a latent pass's last-layer hidden states to the next pass's inputs (``latent.input``)."""
    if cfg.input == "projection":
        return Projection(d, cfg.projection)
    if cfg.input == "soft_token":
        return SoftToken(model, cfg.tau)
    raise ValueError(f"latent.input must be 'projection' or 'soft_token', found {cfg.input!r}")


def fork_cache(cache):
    """A cache that shares ``cache``'s tensors but whose updates leave ``cache`` untouched."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new


def without_latents(batch: Batch) -> torch.Tensor:
    """``batch.attention_mask`` ``[B, S]`` with the M latent columns ``[P, P + M)`` masked out: what an answer reads
    when its latents are hidden (``loss.a_direct``, the ``hide`` intervention)."""
    mask = batch.attention_mask.clone()
    mask[:, batch.P:batch.P + batch.M] = 0
    return mask


def stack_kv(cache, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of columns ``[start, stop)`` of every layer: two ``[B, L, H_kv, n, d]`` tensors."""
    keys = torch.stack([layer.keys[:, :, start:stop] for layer in cache.layers], 1)
    values = torch.stack([layer.values[:, :, start:stop] for layer in cache.layers], 1)
    return keys, values


@dataclass
class LatentState:
    """What the latent loop leaves behind."""

    cache: object  # cache holding [question, <bot>, M latents]
    latents: torch.Tensor  # [B, M, D] inputs of the last pass
    forward_passes: int
    # per iteration (prefill = 0, then each Jacobi pass / sequential step): latent inputs and last-layer outputs
    trajectory: list[dict] = field(default_factory=list)


@dataclass
class StudentOutput:
    ce: torch.Tensor  # [] answer CE (prompt + answer + eos)
    latent_keys: torch.Tensor  # [B, L, H_kv, M, d]
    latent_values: torch.Tensor  # [B, L, H_kv, M, d]
    anchor_hidden: torch.Tensor  # [B, L, D] at the last answer-prompt token
    forward_passes: int
    latents: torch.Tensor  # [B, M, D]
    trajectory: list[dict] = field(default_factory=list)
    latent_cache: object = None  # [question, <bot>, M latents] before the answer (a fork: the answer left it alone)


class Student(nn.Module):
    """The backbone (possibly LoRA-wrapped) plus the latent projection."""

    def __init__(self, model: nn.Module, cfg: LatentConfig, eos_id: int, eot_id: int):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.eos_id, self.eot_id = eos_id, eot_id
        d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
        self.projection = latent_input(model, cfg, d)
        if cfg.T_min is not None and not (cfg.mode == "jacobi" and 1 <= cfg.T_min <= cfg.T):
            raise ValueError(f"latent.T_min={cfg.T_min} needs latent.mode='jacobi' and 1 <= T_min <= T={cfg.T} "
                             f"(mode {cfg.mode!r})")

    def iterations(self) -> int:
        """Jacobi iterations of this call: T, or in training with ``latent.T_min`` set a draw from T_min..T
        (torch's generator, so a seeded run and its resumed checkpoint draw the same)."""
        cfg = self.cfg
        if cfg.T_min is None or not self.training:
            return cfg.T
        return int(torch.randint(cfg.T_min, cfg.T + 1, ()))

    # ----------------------------------------------------------------------------------- latent loop
    def _run(self, cache, embeds, attention_mask, position_ids):
        out, cache = forward_cached(self.model, cache, inputs_embeds=embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, output_hidden_states=True,
                                    logits_to_keep=1)  # latent passes read hidden states only: no [B, S, V] logits
        return cache, out.hidden_states[-1]

    def latent_loop(self, batch: Batch, record: bool = False, question_cache=None) -> LatentState:
        """Run the latent reasoning of a student batch (prefix + M latent columns), no answer yet.

        ``question_cache`` (training): a cache holding exactly the question columns ``[0, P - 1)`` of this
        batch, e.g. the teacher's cache cropped to its question (the teacher batch puts every question in the
        same columns). The prefill then runs ``[<bot>, latents]`` on top of it instead of re-encoding the
        question: the same values and, since both losses then read one tensor, the same gradients."""
        P, M, cfg = batch.P, batch.M, self.cfg
        if M != cfg.M:  # the batch's latent columns and the student's configured slots must be one number
            raise ValueError(f"the student batch has {M} latent columns but the student's LatentConfig.M is {cfg.M}; "
                             "collate with M=cfg.latent.M")
        ids, am, pos = batch.input_ids, batch.attention_mask, batch.position_ids
        start = 0 if question_cache is None else P - 1  # first column this prefill encodes
        if question_cache is not None and question_cache.get_seq_length() != P - 1:
            raise ValueError(f"question_cache holds {question_cache.get_seq_length()} columns; the student batch's "
                             f"question spans {P - 1}")
        trajectory: list[dict] = []
        if cfg.mode == "jacobi":
            out, cache = forward_cached(self.model, question_cache, input_ids=ids[:, start:P + M],
                                        attention_mask=am[:, :P + M], position_ids=pos[:, start:P + M],
                                        output_hidden_states=True, logits_to_keep=1)
            h = out.hidden_states[-1]  # [B, P+M-start, D]
            passes = 1
            if record:
                trajectory.append({"inputs": None, "outputs": h[:, P - start:P + M - start].detach()})
            T = self.iterations()
            if T == 0:  # pause tokens: the placeholders' own cache is the latent cache
                return LatentState(cache, self.model.get_input_embeddings()(ids[:, P:P + M]), passes, trajectory)
            z = self.projection(h[:, P - 1 - start:P + M - 1 - start])  # [B, M, D] shifted: z_1 from <bot>
            cache.crop(-M)  # keep [question, <bot>]
            for t in range(T):
                pass_cache, o = self._run(fork_cache(cache), z, am[:, :P + M], pos[:, P:P + M])
                passes += 1
                if record:
                    trajectory.append({"inputs": z.detach(), "outputs": o.detach()})
                if t < T - 1:
                    z = torch.cat([z[:, :1], self.projection(o[:, :-1])], 1)
            return LatentState(pass_cache, z, passes, trajectory)
        if cfg.mode == "sequential":
            out, cache = forward_cached(self.model, question_cache, input_ids=ids[:, start:P],
                                        attention_mask=am[:, :P], position_ids=pos[:, start:P],
                                        output_hidden_states=True, logits_to_keep=1)
            passes = 1
            z = self.projection(out.hidden_states[-1][:, P - 1 - start:P - start])  # [B, 1, D] from <bot>
            inputs = []
            for i in range(M):
                inputs.append(z)
                cache, o = self._run(cache, z, am[:, :P + i + 1], pos[:, P + i:P + i + 1])
                passes += 1
                if record:
                    trajectory.append({"inputs": z.detach(), "outputs": o.detach(), "slot": i})
                z = self.projection(o)
            return LatentState(cache, torch.cat(inputs, 1), passes, trajectory)
        raise ValueError(f"latent mode {cfg.mode!r} has no latent loop; expected 'jacobi' or 'sequential'")

    # ------------------------------------------------------------------------------------- training
    def forward(self, batch: Batch, record: bool = False, question_cache=None) -> StudentOutput:
        """Answer CE, the final latent K/V (with gradients) and anchor hidden states for a student batch.
        ``question_cache``: see :meth:`latent_loop`."""
        P, M = batch.P, batch.M
        state = self.latent_loop(batch, record=record, question_cache=question_cache)
        keys, values = stack_kv(state.cache, P, P + M)
        latent_cache = fork_cache(state.cache)
        ce, anchor_hidden = self.answer(batch, state.cache)
        return StudentOutput(ce=ce, latent_keys=keys, latent_values=values, anchor_hidden=anchor_hidden,
                             forward_passes=state.forward_passes + 1, latents=state.latents,
                             trajectory=state.trajectory, latent_cache=latent_cache)

    def answer(self, batch: Batch, cache, hide_latents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher-forced answer pass ``[<eot>, prompt, answer, eos]`` on top of ``cache`` (holding
        ``[question, <bot>, M latents]``; extended in place): the answer CE ``[]`` and the hidden states of
        every layer at the last answer-prompt token ``[B, L, D]``. ``hide_latents``: the M latent columns are
        masked out of the answer's attention (``loss.a_direct``)."""
        P, M = batch.P, batch.M
        mask = without_latents(batch) if hide_latents else batch.attention_mask  # [B, P + M + S']
        out, _ = forward_cached(self.model, cache, input_ids=batch.input_ids[:, P + M:], attention_mask=mask,
                                position_ids=batch.position_ids[:, P + M:], labels=batch.labels[:, P + M:],
                                output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[1:], 1)  # [B, L, S', D]
        anchor = (batch.anchor - (P + M))[:, None, None, None].expand(-1, hidden.shape[1], 1, hidden.shape[-1])
        return out.loss, hidden.gather(2, anchor)[:, :, 0]

    def forced_pass(self, batch: Batch, cache, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A teacher-forced latent pass (``loss.a_tf``): ``latents`` ``[B, M, D]`` run at the latent positions on
        top of ``cache`` (``[question, <bot>, M given slots]``, extended in place), under a mask by which slot j
        reads the question, the cache's slots < j and its own new column, never the other new ones. Returns the
        new columns' keys and values ``[B, L, H_kv, M, d]``: what each slot writes given the cached past."""
        P, M = batch.P, batch.M
        if cache.get_seq_length() != P + M:
            raise ValueError(f"forced_pass needs a cache of the question and {M} slots ({P + M} columns), "
                             f"found {cache.get_seq_length()}")
        B, dtype = latents.shape[0], latents.dtype
        question = batch.attention_mask[:, None, None, :P].bool().expand(B, 1, M, P)
        earlier = torch.ones(M, M, dtype=torch.bool, device=latents.device).tril(-1)  # slot j reads slots < j
        own = torch.eye(M, dtype=torch.bool, device=latents.device)
        allowed = torch.cat([question, earlier.expand(B, 1, M, M), own.expand(B, 1, M, M)], -1)  # [B, 1, M, P+2M]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=latents.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)  # additive: eager and SDPA attention read it as-is
        _, cache = forward_cached(self.model, cache, inputs_embeds=latents, attention_mask=mask,
                                  position_ids=batch.position_ids[:, P:P + M], logits_to_keep=1)
        return stack_kv(cache, P + M, P + 2 * M)

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 16, latent_hook=None,
                 hide_latents: bool = False) -> "Generation":
        """Latents, then ``[<eot>, prompt]`` in one pass, then greedy answer decoding. ``batch`` is a
        student batch whose examples carry no answer (see :func:`kava_lab.encoding.without_answer`).
        ``latent_hook(state, batch)``, if given, may edit the latent cache before the answer is decoded
        (see :mod:`kava_lab.intervene`). ``hide_latents``: the answer is decoded with the M latent columns
        masked out of its attention (the ``hide`` intervention)."""
        start = time.perf_counter()
        P, M = batch.P, batch.M
        state = self.latent_loop(batch)
        if latent_hook is not None:
            latent_hook(state, batch)
        lengths = batch.attention_mask.sum(1)  # real tokens so far (question, bot, M, eot, prompt)
        mask = without_latents(batch) if hide_latents else batch.attention_mask  # [B, P + M + s]
        gen = greedy_decode(self.model, state.cache, batch.input_ids[:, P + M:], mask,
                            batch.position_ids[:, P + M:], self.eos_id, max_new_tokens)
        gen.forward_passes = gen.forward_passes + state.forward_passes  # [B]
        gen.cache_tokens = lengths + gen.lengths
        gen.seconds = time.perf_counter() - start
        return gen


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per example (eos excluded)
    lengths: torch.Tensor  # [B] generated tokens including eos
    forward_passes: torch.Tensor  # [B]
    cache_tokens: torch.Tensor | None = None  # [B] tokens held in the KV cache at the end
    seconds: float = 0.0


@torch.no_grad()
def greedy_decode(model, cache, suffix_ids, attention_mask, suffix_positions, eos_id: int,
                  max_new_tokens: int) -> Generation:
    """Greedy decoding in a batch. ``suffix_ids`` ``[B, s]`` is fed in one pass on top of ``cache`` (may be
    None); ``attention_mask`` ``[B, cache + s]`` covers cache and suffix, right-padded rows allowed.
    Each example stops at its eos; forward passes are counted per example."""
    B = suffix_ids.shape[0]
    device = suffix_ids.device
    # Rows may be padded on either side: take the logits at each row's last real suffix token.
    suffix_mask = attention_mask[:, -suffix_ids.shape[1]:]
    last = (suffix_mask * torch.arange(1, suffix_mask.shape[1] + 1, device=device)).argmax(1)  # [B]
    out, cache = forward_cached(model, cache, input_ids=suffix_ids, attention_mask=attention_mask,
                                position_ids=suffix_positions)
    logits = out.logits[torch.arange(B, device=device), last]  # [B, V]
    next_pos = suffix_positions[torch.arange(B, device=device), last] + 1  # [B]
    mask = attention_mask
    out_ids = torch.full((B, max(max_new_tokens, 1)), eos_id, dtype=torch.long, device=device)  # [B, new]
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    passes = torch.ones(B, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # [B]
        out_ids[:, step] = torch.where(done, eos_id, nxt)  # no per-example Python in the token loop
        lengths += (~done).long()
        done = done | (nxt == eos_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # Padded suffix rows: the new token goes after the pads; pads stay masked out.
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], 1)
        out, cache = forward_cached(model, cache, input_ids=nxt[:, None], attention_mask=mask,
                                    position_ids=next_pos[:, None])
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
        passes += (~done).long()
    # tokens before each row's eos (or all of them when it never came), one conversion at the end
    rows = out_ids[:, :max_new_tokens].tolist()
    tokens = [row[:row.index(eos_id)] if eos_id in row else row for row in rows]
    return Generation(tokens=tokens, lengths=lengths, forward_passes=passes)
