"""Latent interventions: exact key re-rotation, each intervention's effect on the cache, and evaluation rates.

Tiny random Llama (GQA) and Qwen2 models built on the spot; no downloads.
"""

import dataclasses

import pytest
import torch

from kava_lab.backbone import TinyConfig, build_tiny, forward_cached, load_backbone
from kava_lab.config import LatentConfig, get_preset
from kava_lab.data import Example
from kava_lab.encoding import Collator, encode, without_answer
from kava_lab.evaluate import donor_rates, evaluate
from kava_lab.intervene import (apply_intervention, apply_target, donor_index, kv_target, rotary_module, rotate_keys,
                                slot_permutations)
from kava_lab.student import Student, stack_kv
from kava_lab.synthetic import counterfactual_answer, make_synthetic, parse_step

SMALL = TinyConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def backbone(request, tmp_path_factory):
    path = build_tiny(tmp_path_factory.mktemp(request.param), SMALL, family=request.param)
    torch.manual_seed(0)
    return load_backbone(str(path))


def _student(bb, M=4, T=2):
    torch.manual_seed(0)
    return Student(bb.model, LatentConfig(mode="jacobi", M=M, T=T), eos_id=bb.eos_id, eot_id=bb.eot_id).eval()


def _batch(bb, examples, M=4):
    items = [without_answer(encode(e, bb.tokenizer, with_cot=False)) for e in examples]
    return Collator.for_backbone(bb)(items, "student", M=M)


def _keys_at(bb, embeds, positions):
    """Layer-0.. keys of ``embeds`` [1, n, D] run alone at ``positions`` [1, n]: [1, L, H, n, d]."""
    _, cache = forward_cached(bb.model, None, inputs_embeds=embeds, position_ids=positions)
    return stack_kv(cache, 0, embeds.shape[1])[0]


@torch.no_grad()
def test_rotating_a_key_equals_computing_it_at_the_new_position(backbone):
    torch.manual_seed(1)
    x = torch.randn(1, 1, SMALL.hidden_size)  # a single token: its layer-0 key depends only on its position
    rotary = rotary_module(backbone.model)
    assert rotary is not None
    k5 = _keys_at(backbone, x, torch.tensor([[5]]))[:, :1]  # layer 0
    k12 = _keys_at(backbone, x, torch.tensor([[12]]))[:, :1]
    moved = rotate_keys(k5, torch.tensor([[7]]), rotary)
    assert torch.allclose(moved, k12, atol=1e-5)
    assert not torch.allclose(k5, k12, atol=1e-3)  # the rotation is not a no-op
    back = rotate_keys(k12, torch.tensor([[-12]]), rotary)
    zero = _keys_at(backbone, x, torch.tensor([[0]]))[:, :1]
    assert torch.allclose(back, zero, atol=1e-5)


@torch.no_grad()
def test_donor_swaps_latent_kv_and_leaves_the_question_alone(backbone):
    student = _student(backbone)
    examples = make_synthetic(3, split="test", trace="nl")
    batch = _batch(backbone, examples)
    state = student.latent_loop(batch)
    P, M = batch.P, batch.M
    k0, v0 = stack_kv(state.cache, 0, P + M)
    apply_intervention("donor", backbone.model, state, batch)
    k1, v1 = stack_kv(state.cache, 0, P + M)
    assert torch.equal(k1[..., :P, :], k0[..., :P, :]) and torch.equal(v1[..., :P, :], v0[..., :P, :])
    idx = donor_index(3)
    assert torch.equal(v1[..., P:, :], v0[idx][..., P:, :])  # values move unchanged
    pos = batch.position_ids[:, P:P + M]
    rotary = rotary_module(backbone.model)
    expected = rotate_keys(k0[idx][..., P:, :], pos - pos[idx], rotary)  # re-rotated to the receiver
    assert torch.allclose(k1[..., P:, :], expected, atol=1e-5)
    if int((pos - pos[idx]).abs().max()) > 0:
        assert not torch.allclose(k1[..., P:, :], k0[idx][..., P:, :], atol=1e-4)


@torch.no_grad()
def test_mean_shuffle_and_zero(backbone):
    student = _student(backbone, M=5)
    batch = _batch(backbone, make_synthetic(4, split="test", trace="nl"), M=5)
    P, M = batch.P, batch.M
    rotary = rotary_module(backbone.model)
    pos = batch.position_ids[:, P:P + M]

    state = student.latent_loop(batch)
    k0, v0 = stack_kv(state.cache, P, P + M)
    apply_intervention("mean", backbone.model, state, batch)
    _, v1 = stack_kv(state.cache, P, P + M)
    assert torch.allclose(v1, v0.mean(0, keepdim=True).expand_as(v0), atol=1e-6)

    state = student.latent_loop(batch)
    apply_intervention("shuffle-slots", backbone.model, state, batch, seed=3)
    k2, v2 = stack_kv(state.cache, P, P + M)
    perm = slot_permutations(4, M, seed=3)
    assert not (perm == torch.arange(M)).all(1).any()  # no example keeps its order
    for b in range(4):
        assert torch.equal(v2[b], v0[b][:, :, perm[b]])
        free = rotate_keys(k0[b:b + 1][:, :, :, perm[b]], -pos[b:b + 1, perm[b]], rotary)
        assert torch.allclose(k2[b:b + 1], rotate_keys(free, pos[b:b + 1], rotary), atol=1e-5)

    state = student.latent_loop(batch)
    apply_intervention("zero", backbone.model, state, batch)
    k3, _ = stack_kv(state.cache, P, P + M)
    _, question = forward_cached(student.model, None, input_ids=batch.input_ids[:, :P],
                                 attention_mask=batch.attention_mask[:, :P], position_ids=batch.position_ids[:, :P])
    zeros = torch.zeros(4, M, SMALL.hidden_size)
    _, ref = forward_cached(student.model, question, inputs_embeds=zeros,
                            attention_mask=batch.attention_mask[:, :P + M], position_ids=pos)
    assert torch.allclose(k3, stack_kv(ref, P, P + M)[0], atol=1e-5)
    with pytest.raises(ValueError, match="unknown intervention"):
        apply_intervention("swap", backbone.model, state, batch)


@torch.no_grad()
def test_hide_masks_the_latent_columns_out_of_the_answer(backbone):
    """``hide``: the answer decoded with the latent columns masked out does not change whatever the slots hold
    (here 50x noise written into them), while the same noise read unmasked changes it; it is a mask, so
    apply_intervention refuses it, and evaluate reports it like any intervention."""
    from kava_lab.intervene import write_latents

    student = _student(backbone, M=4)
    examples = make_synthetic(8, split="test", trace="nl")
    batch = _batch(backbone, examples, M=4)
    P, M = batch.P, batch.M
    gen = torch.Generator().manual_seed(0)

    def noise(state, b):
        keys, values = stack_kv(state.cache, P, P + M)
        write_latents(state.cache, P, M, 50 * torch.randn(keys.shape, generator=gen),
                      50 * torch.randn(values.shape, generator=gen))

    hidden = student.generate(batch, max_new_tokens=4, hide_latents=True).tokens
    assert student.generate(batch, max_new_tokens=4, latent_hook=noise, hide_latents=True).tokens == hidden
    assert student.generate(batch, max_new_tokens=4, latent_hook=noise).tokens != hidden
    state = student.latent_loop(batch)
    with pytest.raises(ValueError, match="hide_latents"):
        apply_intervention("hide", backbone.model, state, batch)
    cfg = dataclasses.replace(get_preset("tiny", "kava", trace="nl"), latent=LatentConfig(mode="jacobi", M=4, T=2),
                              max_new_tokens=4)
    summary = evaluate(student, backbone, cfg, examples, batch_size=8, intervene="hide")
    assert summary["intervention"] == "hide" and summary["n"] == 8


@torch.no_grad()
@pytest.mark.parametrize("kv_keys", ["post_rope", "pre_rope"])
def test_target_oracle_puts_the_kv_loss_target_in_the_latent_slots(backbone, kv_keys):
    """The oracle's latent columns are the compressed teacher cache of the gold CoT, as in training: exactly
    the target for post-RoPE keys; for pre-RoPE keys the same position-free key, rotated to its slot. The
    question columns are untouched, and a slot the target leaves empty (CoT shorter than M) keeps the
    student's own entry."""
    cfg = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, kv_keys=kv_keys))
    M = 30  # more slots than the shortest CoT has tokens: some slots stay the student's
    student = _student(backbone, M=M)
    examples = make_synthetic(3, split="test", trace="nl", min_steps=1, max_steps=3)
    batch = _batch(backbone, examples, M=M)
    tbatch = Collator.for_backbone(backbone)([encode(e, backbone.tokenizer, with_cot=True) for e in examples],
                                             "teacher")
    target = kv_target(backbone.model, cfg, tbatch, M)
    assert not target.slot_mask.all()
    state = student.latent_loop(batch)
    P = batch.P
    k0, v0 = stack_kv(state.cache, 0, P + M)
    apply_target(backbone.model, state, batch, target, tbatch, kv_keys)
    k1, v1 = stack_kv(state.cache, 0, P + M)
    assert torch.equal(k1[..., :P, :], k0[..., :P, :])
    valid = target.slot_mask
    assert torch.equal(v1[..., P:, :][valid], target.values[valid])
    assert torch.equal(v1[..., P:, :][~valid], v0[..., P:, :][~valid])
    rotary = rotary_module(backbone.model)
    if kv_keys == "post_rope":
        assert torch.equal(k1[..., P:, :][valid], target.keys[valid])
    else:
        B, L, H, _ = target.indices.shape
        t_pos = tbatch.position_ids[:, tbatch.P:].gather(1, target.indices.reshape(B, -1)).view(B, L, H, M)
        s_pos = batch.position_ids[:, P:P + M]
        free_placed = rotate_keys(k1[..., P:, :], -s_pos, rotary)
        free_target = rotate_keys(target.keys, -t_pos, rotary)
        assert torch.allclose(free_placed[valid], free_target[valid], atol=1e-5)
        assert not torch.allclose(k1[..., P:, :][valid], target.keys[valid], atol=1e-3)
    with pytest.raises(ValueError, match="kv_keys"):
        apply_target(backbone.model, state, batch, target, tbatch, "rope")


def test_counterfactual_answer_and_parse_step():
    assert parse_step("<<12+5=17>>") == (12.0, "+", 5.0, 17.0)
    assert parse_step("After giving away 2, she has 13 - 2 = 11 cookies left.") == (13.0, "-", 2.0, 11.0)
    assert parse_step("no equation") is None
    mine = Example(question="q1", steps=("<<3*4=12>>", "<<12+5=17>>"), answer="17", answer_value=17.0)
    donor = Example(question="q2", steps=("<<7-2=5>>", "<<5*3=15>>"), answer="15", answer_value=15.0)
    assert counterfactual_answer(mine, donor) == 5 + 5  # my "+5" applied to the donor's value before its last step
    assert counterfactual_answer(donor, mine) == 12 * 3


def test_donor_rates_count_only_distinguishable_rows():
    rows = [
        {"id": "a", "donor_id": "b", "gold": 1.0, "donor_gold": 2.0, "counterfactual": 3.0, "pred": 3.0},
        {"id": "b", "donor_id": "c", "gold": 4.0, "donor_gold": 5.0, "counterfactual": 6.0, "pred": 5.0},
        {"id": "c", "donor_id": "a", "gold": 7.0, "donor_gold": 8.0, "counterfactual": 7.0, "pred": 7.0},  # ambiguous
        {"id": "d", "donor_id": "d", "gold": 1.0, "donor_gold": 1.0, "counterfactual": 2.0, "pred": 1.0},  # self
    ]
    rates = donor_rates(rows)
    assert rates["donor_rows"] == 2
    assert rates["counterfactual_rate"] == 0.5 and rates["donor_answer_rate"] == 0.5
    assert rates["gold_rate_on_donor_rows"] == 0.0


def test_evaluate_reports_interventions_and_accuracy_by_steps(backbone):
    cfg = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(cfg, latent=LatentConfig(mode="jacobi", M=4, T=1), max_new_tokens=4)
    student = _student(backbone, M=4, T=1)
    examples = make_synthetic(6, split="test", trace="nl", min_steps=2, max_steps=3)
    plain = evaluate(student, backbone, cfg, examples, batch_size=3)
    assert set(plain["accuracy_by_steps"]) <= {"2", "3"} and plain["intervention"] is None
    swapped = evaluate(student, backbone, cfg, examples, batch_size=3, intervene="donor")
    assert swapped["intervention"] == "donor" and "counterfactual_rate" in swapped
    assert swapped["forward_passes"] == plain["forward_passes"]
    with pytest.raises(ValueError, match="needs a latent method"):
        evaluate(student, backbone, get_preset("tiny", "nocot"), examples, intervene="zero")


def test_evaluate_interventions_reports_each_kind_beside_the_plain_run(backbone):
    from kava_lab.evaluate import evaluate_interventions

    cfg = dataclasses.replace(get_preset("tiny", "kava", trace="nl"), latent=LatentConfig(mode="jacobi", M=4, T=1),
                              max_new_tokens=3)
    student = _student(backbone, M=4, T=1)
    examples = make_synthetic(4, split="test", trace="nl")
    out = evaluate_interventions(student, backbone, cfg, examples, batch_size=4)
    assert list(out) == ["plain", "donor", "zero", "mean", "shuffle-slots", "hide", "target"]
    assert out["target"]["intervention"] == "target" and out["target"]["n"] == 4
    no_kv = dataclasses.replace(cfg, method="pccot", loss=dataclasses.replace(cfg.loss, a2=0.0))
    assert "target" not in evaluate_interventions(student, backbone, no_kv, examples, batch_size=4)
    no_trace = [dataclasses.replace(e, steps=()) for e in examples]  # an eval-only set: no CoT to compress
    assert "target" not in evaluate_interventions(student, backbone, cfg, no_trace, batch_size=4)
    assert list(evaluate_interventions(student, backbone, cfg, examples, kinds=())) == ["plain"]
    assert list(evaluate_interventions(student, backbone, get_preset("tiny", "nocot"), examples)) == ["plain"]


def test_pre_rope_kv_keys_remove_the_position_and_train(backbone):
    """With kv_keys=pre_rope, a student key equal to the teacher's pre-RoPE key gives zero key loss wherever
    either sits; the objective runs and the KV term changes."""
    from kava_lab.encoding import encode as enc
    from kava_lab.train import KaVaObjective, pre_rope_keys

    rotary = rotary_module(backbone.model)
    torch.manual_seed(0)
    k = torch.randn(2, 2, 2, 3, 16)
    s_pos, t_pos = torch.tensor([[10, 11, 12], [20, 21, 22]]), torch.tensor([[3, 5, 9], [4, 4, 7]])
    student_keys, teacher_keys = rotate_keys(k, s_pos, rotary), rotate_keys(k, t_pos, rotary)
    assert not torch.allclose(student_keys, teacher_keys, atol=1e-3)
    assert torch.allclose(rotate_keys(student_keys, -s_pos, rotary), rotate_keys(teacher_keys, -t_pos, rotary),
                          atol=1e-5)

    cfg = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(cfg, latent=LatentConfig(mode="jacobi", M=3, T=1))
    items = [enc(e, backbone.tokenizer) for e in make_synthetic(3, trace="nl")]
    collate = Collator.for_backbone(backbone)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=3)
    terms = {}
    for keys in ("post_rope", "pre_rope"):
        c = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, kv_keys=keys))
        torch.manual_seed(0)
        student = Student(backbone.model, c.latent, eos_id=backbone.eos_id, eot_id=backbone.eot_id)
        terms[keys] = KaVaObjective(student, c)(tb, sb)["kv"].item()
    assert terms["pre_rope"] != pytest.approx(terms["post_rope"], rel=1e-4)
    with pytest.raises(ValueError, match="kv_keys"):
        c = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, kv_keys="rope"))
        KaVaObjective(Student(backbone.model, c.latent, backbone.eos_id, backbone.eot_id), c)(tb, sb)
    assert pre_rope_keys is not None


def test_cli_eval_intervene_prints_and_writes_every_intervention(tmp_path, capsys):
    import json

    from kava_lab.cli import main
    from kava_lab.config import DataConfig, OptimConfig

    cfg = get_preset("tiny", "kava", trace="nl", steps=2)
    cfg = dataclasses.replace(cfg, tiny=SMALL, stage0_steps=0, log_every=1, save_every=2,
                              latent=LatentConfig(mode="jacobi", M=3, T=1), max_new_tokens=3,
                              data=DataConfig(train="synthetic:2-3", train_limit=16, eval="synthetic:2-3",
                                              eval_limit=6, trace="nl"),
                              optim=OptimConfig(steps=2, batch_size=8, effective_batch=8))
    from kava_lab.train import train

    run = train(cfg, tmp_path / "run", log=lambda s: None)
    assert main(["eval", str(run), "--intervene", "all"]) == 0
    out = capsys.readouterr().out
    for kind in ("plain", "donor", "zero", "mean", "shuffle-slots", "hide", "target"):
        assert kind in out
    record = json.loads((run / "interventions.json").read_text())
    assert list(record["results"]) == ["plain", "donor", "zero", "mean", "shuffle-slots", "hide", "target"]
    assert record["results"]["plain"]["n"] == 6


def test_the_target_oracle_reads_the_teacher_the_run_was_trained_against(backbone, monkeypatch):
    """``evaluate(..., teacher=m)`` compresses ``m``'s CoT cache for the ``target`` oracle (the student's own model
    by default); :func:`kava_lab.runs.target_teacher` gives the student's model for the shared teacher and, for
    ``loss.teacher=frozen``, the model as training started (rebuilt), however far the student has moved."""
    import copy

    import kava_lab.intervene as intervene
    from kava_lab import probe
    from kava_lab.runs import build_student, target_teacher

    cfg = dataclasses.replace(get_preset("tiny", "kava", trace="nl"), latent=LatentConfig(mode="jacobi", M=4, T=1),
                              max_new_tokens=2)
    student = _student(backbone, M=4, T=1)
    examples = make_synthetic(3, split="test", trace="nl")
    seen, real = [], intervene.kv_target
    monkeypatch.setattr(intervene, "kv_target", lambda model, *a: seen.append(model) or real(model, *a))
    other = copy.deepcopy(backbone.model)
    evaluate(student, backbone, cfg, examples, batch_size=3, intervene="target")
    evaluate(student, backbone, cfg, examples, batch_size=3, intervene="target", teacher=other)
    assert seen[0] is backbone.model and seen[1] is other
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    own, moved = (probe.collect(student, backbone, cfg, examples, teacher=t) for t in (None, other))
    assert torch.equal(own.student_values, moved.student_values)  # the probe's teacher alone changed
    assert not torch.allclose(own.teacher_values, moved.teacher_values)

    cfg = dataclasses.replace(get_preset("tiny", "kava", trace="nl"), stage0_steps=0)
    trained, _ = build_student(cfg)
    assert target_teacher(cfg, trained) is trained.model
    start = {k: v.clone() for k, v in trained.model.state_dict().items()}
    with torch.no_grad():  # training moves the student
        for p in trained.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    frozen = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, teacher="frozen"))
    teacher = target_teacher(frozen, trained)
    assert teacher is not trained.model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    state = teacher.state_dict()
    assert state.keys() == start.keys() and all(torch.equal(state[k], start[k]) for k in start)


def test_cli_intervene_choices_are_the_modules_interventions_and_oracles(capsys):
    """The CLI spells its --intervene choices out (building the parser must not import torch); they must stay
    the module's INTERVENTIONS + ORACLES, or a new intervention is unreachable from the command line."""
    import re

    from kava_lab.cli import main
    from kava_lab.intervene import INTERVENTIONS, ORACLES

    with pytest.raises(SystemExit):
        main(["eval", "some-run", "--intervene", "no-such-kind"])
    listed = re.search(r"choose from (.*)\)", capsys.readouterr().err).group(1)
    assert [c.strip(" '") for c in listed.split(",")] == [*INTERVENTIONS, *ORACLES, "all"]
