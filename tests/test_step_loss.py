"""The optional step-level auxiliary loss: which latent writes which CoT step, the tokens it is asked to write,
and that the term moves the latent loop (it is a training signal, not a logged number)."""

import dataclasses

import pytest
import torch

from kava_lab.config import LatentConfig, get_preset
from kava_lab.encoding import Collator, encode
from kava_lab.step_loss import step_decoding_loss, step_sequences, step_slots
from kava_lab.synthetic import make_synthetic


def test_steps_spread_over_the_slots():
    assert step_slots(3, 12) == [3, 7, 11]
    assert step_slots(1, 12) == [11]
    assert step_slots(12, 12) == list(range(12))
    many = step_slots(14, 12)  # more steps than slots: they share, in order, and none falls off either end
    assert many[0] == 0 and many[-1] == 11 and many == sorted(many)


def _items(b, n=3, steps=4):
    return [encode(e, b.tokenizer) for e in make_synthetic(n, trace="nl", min_steps=steps, max_steps=steps)]


def test_each_sequence_is_one_replaced_step(tiny_backbone):
    b = tiny_backbone
    items = _items(b)
    tb = Collator.for_backbone(b)(items, "teacher")
    rows, slots, tokens = step_sequences(tb, M=12)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 4 steps, the last dropped from the CoT
    assert slots.tolist() == [3, 7, 11] * 3
    for r, t, j in zip(rows.tolist(), tokens, [0, 1, 2] * 3):
        assert b.tokenizer.decode(t.tolist()).strip() == items[r].example.steps[j]
    # a curriculum that replaced only the first step of row 0 and two of the others
    covered = torch.tensor([items[0].cot_step_lens[0], sum(items[1].cot_step_lens[:2]), sum(items[2].cot_step_lens[:2])])
    rows, slots, _ = step_sequences(tb, M=12, covered=covered)
    assert rows.tolist() == [0, 1, 1, 2, 2] and slots.tolist() == [11, 5, 11, 5, 11]


def test_the_term_trains_the_latent_loop_and_enters_the_loss(tiny_backbone):
    from kava_lab.student import Student
    from kava_lab.train import KaVaObjective

    b = tiny_backbone
    base = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(base, latent=LatentConfig(mode="jacobi", M=4, T=2),
                              loss=dataclasses.replace(base.loss, a_step=0.5))
    items = _items(b)
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    student = Student(b.model, cfg.latent, eos_id=b.eos_id, eot_id=b.eot_id)
    terms = KaVaObjective(student, cfg)(tb, sb)
    assert torch.isfinite(terms["step_ce"]) and terms["step_ce"] > 0
    rest = sum(v for k, v in terms.items() if k in ("teacher_ce", "student_ce")) + 10 * terms["codi"] + terms["kv"]
    assert torch.allclose(terms["loss"], rest + 0.5 * terms["step_ce"])
    student.zero_grad()
    terms["step_ce"].backward()
    grads = [p.grad for p in student.projection.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    off = KaVaObjective(student, dataclasses.replace(cfg, loss=base.loss))(tb, sb)
    assert "step_ce" not in off  # off by default


def test_a_tokenizer_without_offsets_is_named(tiny_backbone):
    b = tiny_backbone
    items = [dataclasses.replace(it, cot_step_lens=()) for it in _items(b, n=2)]
    tb = Collator.for_backbone(b)(items, "teacher")
    with pytest.raises(ValueError, match="step boundaries"):
        step_decoding_loss(b.model, torch.zeros(2, 4, b.model.config.hidden_size), tb)
