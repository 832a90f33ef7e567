"""Turn examples into teacher and student token sequences, and pad them into batches with span positions.

Teacher sequence (kava-method.md §1)::

    question | CoT (last step dropped by default) | answer prompt | answer eos
    ^ no loss  ^------------ next-token CE on everything from here on ------^

Student sequence::

    question <bot> | <latent> x M | <eot> answer prompt | answer eos
    ^ no loss                        ^-- CE on prompt, answer, eos --^

Batch layout: the *prefix* (question, plus ``<bot>`` for the student) is left-padded to a common length
``P`` and the rest is right-padded. So in every row the CoT (teacher) or the first latent slot (student)
starts at the same column ``P``, spans are read with one slice, and because position ids count only real
tokens, an example's activations do not depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .data import Example


@dataclass(frozen=True)
class EncodingConfig:
    answer_prompt: str = "The answer is:"
    drop_last: bool = True  # teacher CoT omits its final step (CODI / PCCoT; paper: 56.5 vs 51.2)
    step_separator: str = " "
    max_cot_tokens: int | None = None  # None: never truncate; else an error names the example


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example's pieces. ``answer`` ends with eos."""

    question: tuple[int, ...]
    cot: tuple[int, ...]
    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    example: Example | None = None
    cot_step_lens: tuple[int, ...] = ()  # tokens of each CoT step (sums to len(cot)); () if unknown

    @property
    def teacher_len(self) -> int:
        """Tokens of the teacher sequence [question, CoT, prompt, answer], the longest of a training step."""
        return len(self.question) + len(self.cot) + len(self.prompt) + len(self.answer)


def cot_text(example: Example, cfg: EncodingConfig = EncodingConfig()) -> str:
    steps = list(example.steps)
    if cfg.drop_last and steps:
        steps = steps[:-1]
    return cfg.step_separator.join(steps)


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()


def _step_lens(tokenizer, example: Example, cfg: EncodingConfig, n_tokens: int) -> tuple[int, ...]:
    """Tokens per CoT step, from the fast tokenizer's character offsets (() if it gives none)."""
    steps = list(example.steps[:-1] if cfg.drop_last and example.steps else example.steps)
    text = " " + cfg.step_separator.join(steps)
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):
        return ()
    starts, at = [], 1
    for step in steps:
        starts.append(at)
        at += len(step) + len(cfg.step_separator)
    lens = [0] * len(steps)
    for _, end in offsets:  # a token belongs to the last step that starts before its end
        lens[max(k for k, start in enumerate(starts) if start < end or k == 0)] += 1
    return tuple(lens) if sum(lens) == n_tokens else ()


def encode(example: Example, tokenizer, cfg: EncodingConfig = EncodingConfig(), with_cot: bool = True) -> Encoded:
    """Tokenise the pieces separately (later pieces with a leading space) so span boundaries are exact."""
    cot = _ids(tokenizer, " " + cot_text(example, cfg)) if with_cot and cot_text(example, cfg) else ()
    step_lens = _step_lens(tokenizer, example, cfg, len(cot)) if cot else ()
    if cfg.max_cot_tokens is not None and len(cot) > cfg.max_cot_tokens:
        raise ValueError(f"example {example.id!r}: CoT has {len(cot)} tokens, more than max_cot_tokens="
                         f"{cfg.max_cot_tokens}; raise the limit or filter the data")
    return Encoded(
        question=_ids(tokenizer, example.question),
        cot=cot,
        prompt=_ids(tokenizer, " " + cfg.answer_prompt),
        answer=_ids(tokenizer, " " + example.answer) + (tokenizer.eos_token_id,),
        example=example,
        cot_step_lens=step_lens,
    )


@dataclass
class Batch:
    """A padded batch. Index tensors are ``[B]``; ``P`` is the common column where the body starts.

    Teacher: CoT occupies ``[P, P + cot_len)``. Student: latent slot ``j`` sits at column ``P + j`` and
    ``<eot>`` at ``P + M``. For both, the answer prompt is ``[prompt_start, anchor]`` and the answer (with
    eos) is ``[answer_start, answer_end)``.
    """

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S] 1 = real token
    position_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S] -100 = no loss
    P: int
    q_start: torch.Tensor  # [B]
    cot_len: torch.Tensor  # [B] (0 for the student)
    prompt_start: torch.Tensor  # [B]
    anchor: torch.Tensor  # [B] last token of the answer prompt
    answer_start: torch.Tensor  # [B]
    answer_end: torch.Tensor  # [B] exclusive
    M: int = 0
    examples: list = field(default_factory=list)
    # student batches under a curriculum: CoT tokens (from the start of the teacher's CoT) that the latents
    # replace, [B]; None when the latents replace the whole CoT (the ordinary student)
    cot_latent_len: torch.Tensor | None = None
    step_lens: list = field(default_factory=list)  # teacher batches: tokens of each CoT step, per row

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)

    @property
    def cot_mask(self) -> torch.Tensor:
        """[B, N] validity of CoT positions, N = max CoT length in the batch."""
        n = int(self.cot_len.max()) if len(self) else 0
        return torch.arange(n, device=self.cot_len.device)[None, :] < self.cot_len[:, None]

    def answer_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns of the answer span (prompt + answer + eos), ``[B, A]``, and their validity ``[B, A]``."""
        lengths = self.answer_end - self.prompt_start
        a = int(lengths.max()) if len(self) else 0
        offs = torch.arange(a, device=lengths.device)[None, :]
        mask = offs < lengths[:, None]
        index = torch.where(mask, self.prompt_start[:, None] + offs, self.prompt_start[:, None])
        return index, mask


class Collator:
    """Pads encoded examples into a teacher or a student :class:`Batch`.

    ``mode="teacher"``: question | CoT prompt answer. ``mode="student"``: question <bot> | M latents <eot>
    prompt answer. Loss on CoT+prompt+answer (teacher) or prompt+answer (student).
    """

    def __init__(self, tokenizer, bot_id: int, eot_id: int, latent_id: int, pad_id: int):
        self.tokenizer, self.bot_id, self.eot_id, self.latent_id, self.pad_id = (
            tokenizer, bot_id, eot_id, latent_id, pad_id)

    @classmethod
    def for_backbone(cls, backbone) -> "Collator":
        return cls(backbone.tokenizer, backbone.bot_id, backbone.eot_id, backbone.latent_id, backbone.pad_id)

    def __call__(self, items: list[Encoded], mode: str = "teacher", M: int = 0,
                 latent_steps: int | None = None) -> Batch:
        """``latent_steps`` (student, curriculum): the latents replace only the first ``latent_steps`` CoT
        steps; the rest of the CoT is written after ``<eot>`` and trained with CE. None: the whole CoT."""
        if mode not in ("teacher", "student"):
            raise ValueError(f"mode must be 'teacher' or 'student', found {mode!r}")
        prefixes, bodies, loss_from, explicit, replaced = [], [], [], [], []
        for it in items:
            if mode == "teacher":
                prefixes.append(list(it.question))
                bodies.append(list(it.cot) + list(it.prompt) + list(it.answer))
                loss_from.append(0)
                explicit.append([])
            else:
                rest: list[int] = []
                if latent_steps is not None and it.cot:
                    if not it.cot_step_lens:
                        name = it.example.id if it.example is not None else "?"
                        raise ValueError(f"example {name!r}: a curriculum needs the CoT's step boundaries, and "
                                         "this tokenizer gives no character offsets")
                    k = sum(it.cot_step_lens[:latent_steps])
                    rest = list(it.cot[k:])
                    replaced.append(k)
                else:
                    replaced.append(len(it.cot))
                prefixes.append(list(it.question) + [self.bot_id])
                bodies.append([self.latent_id] * M + [self.eot_id] + rest + list(it.prompt) + list(it.answer))
                loss_from.append(M + 1)
                explicit.append(rest)
        P = max(len(p) for p in prefixes)
        S = P + max(len(b) for b in bodies)
        B = len(items)
        input_ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        labels = torch.full((B, S), -100, dtype=torch.long)
        spans = {k: torch.zeros(B, dtype=torch.long) for k in
                 ("q_start", "cot_len", "prompt_start", "anchor", "answer_start", "answer_end")}
        for i, (it, pre, body) in enumerate(zip(items, prefixes, bodies)):
            row = pre + body
            start = P - len(pre)
            input_ids[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, start:start + len(row)] = 1
            labels[i, P + loss_from[i]:P + len(body)] = torch.tensor(body[loss_from[i]:], dtype=torch.long)
            cot_len = len(it.cot) if mode == "teacher" else 0
            prompt_start = P + (cot_len if mode == "teacher" else M + 1 + len(explicit[i]))
            spans["q_start"][i] = start
            spans["cot_len"][i] = cot_len
            spans["prompt_start"][i] = prompt_start
            spans["anchor"][i] = prompt_start + len(it.prompt) - 1
            spans["answer_start"][i] = prompt_start + len(it.prompt)
            spans["answer_end"][i] = prompt_start + len(it.prompt) + len(it.answer)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cot_latent_len = (torch.tensor(replaced, dtype=torch.long)
                          if mode == "student" and latent_steps is not None else None)
        return Batch(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                     P=P, M=M if mode == "student" else 0, examples=[it.example for it in items],
                     cot_latent_len=cot_latent_len,
                     step_lens=[tuple(it.cot_step_lens) for it in items] if mode == "teacher" else [], **spans)


def without_answer(item: Encoded, keep_prompt: bool = True) -> Encoded:
    """The prompt part of an example for generation: drop the answer (and optionally the answer prompt)."""
    return replace(item, answer=(), prompt=item.prompt if keep_prompt else ())
