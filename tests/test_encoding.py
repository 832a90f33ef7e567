import torch

from kava_lab.data import Example
from kava_lab.encoding import Collator, EncodingConfig, cot_text, encode
from kava_lab.synthetic import make_synthetic


def test_drop_last_knob():
    e = Example("q", ("<<1+2=3>>", "<<3*2=6>>"), "6", 6.0)
    assert cot_text(e) == "<<1+2=3>>"
    assert cot_text(e, EncodingConfig(drop_last=False)) == "<<1+2=3>> <<3*2=6>>"
    assert cot_text(Example("q", (), "6", 6.0)) == ""


def test_teacher_batch_spans(tiny_backbone):
    b = tiny_backbone
    items = [encode(e, b.tokenizer) for e in make_synthetic(5, trace="nl")]
    batch = Collator.for_backbone(b)(items, "teacher")
    for i, it in enumerate(items):
        row = batch.input_ids[i]
        assert row[batch.q_start[i]:batch.P].tolist() == list(it.question)
        assert row[batch.P:batch.P + batch.cot_len[i]].tolist() == list(it.cot)
        assert row[batch.prompt_start[i]:batch.anchor[i] + 1].tolist() == list(it.prompt)
        assert row[batch.answer_start[i]:batch.answer_end[i]].tolist() == list(it.answer)
        assert row[batch.answer_end[i] - 1] == b.eos_id
        labelled = (batch.labels[i] != -100).nonzero().flatten()
        assert labelled.min() == batch.P and labelled.max() == batch.answer_end[i] - 1
        # positions count real tokens only
        assert batch.position_ids[i, batch.q_start[i]] == 0
        assert batch.position_ids[i, batch.P] == len(it.question)


def test_student_batch_layout(tiny_backbone):
    b = tiny_backbone
    items = [encode(e, b.tokenizer) for e in make_synthetic(3)]
    M = 4
    batch = Collator.for_backbone(b)(items, "student", M=M)
    assert (batch.input_ids[:, batch.P - 1] == b.bot_id).all()
    assert (batch.input_ids[:, batch.P:batch.P + M] == b.latent_id).all()
    assert (batch.input_ids[:, batch.P + M] == b.eot_id).all()
    assert (batch.prompt_start == batch.P + M + 1).all()
    # loss only on prompt, answer and eos
    for i, it in enumerate(items):
        labelled = (batch.labels[i] != -100).nonzero().flatten()
        assert labelled.min() == batch.prompt_start[i]
        assert len(labelled) == len(it.prompt) + len(it.answer)


def test_empty_cot_is_fine(tiny_backbone):
    b = tiny_backbone
    items = [encode(Example("Tom has 3 apples.", ("<<3+1=4>>",), "4", 4.0), b.tokenizer)]
    assert items[0].cot == ()  # drop-last removed the only step
    batch = Collator.for_backbone(b)(items, "teacher")
    assert batch.cot_len.tolist() == [0] and batch.cot_mask.shape == (1, 0)
