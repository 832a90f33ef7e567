import pytest
import torch

from kava_lab.backbone import TinyConfig
from kava_lab.config import LatentConfig, LossConfig, get_preset
from kava_lab.encoding import Collator, encode
from kava_lab.losses import codi_loss, kava_objective, kv_content_floor, kv_loss
from kava_lab.student import Student
from kava_lab.synthetic import make_synthetic
from kava_lab.train import KaVaObjective, apply_lora


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "mse"])
def test_kv_loss_zero_when_equal_and_ignores_masked_slots(kind):
    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 2, 5, 4), torch.randn(3, 2, 2, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    assert kv_loss(k, v, k, v, mask, kind=kind) == 0
    # garbage in masked slots changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, :, :, 3:] += 100.0
    v2[1, :, :, 3:] -= 100.0
    assert kv_loss(k2, v2, k, v, mask, kind=kind) == 0
    # but in a valid slot it does
    k2[0, 0, 0, 0] += 1.0
    assert kv_loss(k2, v2, k, v, mask, kind=kind) > 0


def test_kv_loss_layer_std_normalises_scale():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 2, 4, 8)
    t[:, 1] *= 100  # one layer with a much larger scale
    s = t + 0.1 * t.std(dim=(0, 2, 3, 4), keepdim=True) * torch.randn_like(t)
    mask = torch.ones(2, 4, dtype=torch.bool)
    per_layer = [kv_loss(s[:, i:i + 1], s[:, i:i + 1], t[:, i:i + 1], t[:, i:i + 1], mask, "mse") for i in range(3)]
    assert max(per_layer) / min(per_layer) < 2  # comparable after normalisation
    raw = kv_loss(s, s, t, t, mask, "mse", layer_std=False)
    assert raw > 10 * kv_loss(s, s, t, t, mask, "mse")


def test_kv_content_floor_is_the_loss_of_predicting_the_other_problems_mean():
    torch.manual_seed(0)
    shared = torch.randn(1, 2, 2, 5, 4) * 3  # what every problem's compressed cache shares
    own = torch.randn(4, 2, 2, 5, 4)  # what is specific to each problem
    t_k, t_v = shared + own, shared - own
    mask = torch.ones(4, 5, dtype=torch.bool)
    floor = kv_content_floor(t_k, t_v, mask, "mse")
    # by hand: each row predicted by the mean of the three others
    loo = lambda t: torch.stack([t[[j for j in range(4) if j != i]].mean(0) for i in range(4)])
    assert torch.allclose(floor, kv_loss(loo(t_k), loo(t_v), t_k, t_v, mask, "mse"))
    # a student that knows each problem beats the floor; one that reproduces only the shared part does not
    knows = kv_loss(t_k + 0.1 * torch.randn_like(t_k), t_v, t_k, t_v, mask, "mse")
    shared_only = kv_loss(shared.expand_as(t_k), shared.expand_as(t_v), t_k, t_v, mask, "mse")
    assert knows < 0.1 * floor and shared_only > 0.5 * floor
    # a masked-out row's garbage neither enters the other rows' means nor the loss
    mask[2, 3:] = False
    t_k2 = t_k.clone()
    t_k2[2, :, :, 3:] = 1e6
    assert torch.allclose(kv_content_floor(t_k2, t_v, mask, "mse"), kv_content_floor(t_k, t_v, mask, "mse"))


def test_kava_objective_logs_the_kv_floor_outside_the_loss(small_llama):
    b = small_llama
    cfg = get_preset("tiny", "kava")
    cfg = cfg.__class__(**{**cfg.__dict__, "latent": LatentConfig(mode="jacobi", M=4, T=1)})
    objective = KaVaObjective(Student(b.model, cfg.latent, b.eos_id, b.eot_id), cfg)
    with torch.no_grad():
        terms = objective(*_batches(b, 4))
    assert terms["kv_floor"] > 0 and not terms["kv_floor"].requires_grad
    loss = terms["teacher_ce"] + terms["student_ce"] + cfg.loss.a1 * terms["codi"] + cfg.loss.a2 * terms["kv"]
    assert torch.allclose(terms["loss"], loss)


def test_teacher_targets_carry_no_gradient():
    t = torch.randn(1, 2, 1, 3, 4, requires_grad=True)
    s = torch.randn(1, 2, 1, 3, 4, requires_grad=True)
    kv_loss(s, s, t, t, torch.ones(1, 3, dtype=torch.bool)).backward()
    assert t.grad is None and s.grad is not None
    h_t = torch.randn(2, 3, 8, requires_grad=True)
    h_s = torch.randn(2, 3, 8, requires_grad=True)
    codi_loss(h_s, h_t).backward()
    assert h_t.grad is None and h_s.grad is not None


def test_objective_reports_every_term():
    one = torch.tensor(1.0)
    terms = kava_objective(LossConfig(a1=10, a2=2), one, one * 2, one * 3, one * 4)
    assert set(terms) == {"teacher_ce", "student_ce", "codi", "kv", "loss"}
    assert terms["loss"].item() == 1 + 2 + 30 + 8
    warm = kava_objective(LossConfig(a1=10, a2=2), one, one * 2, one * 3, one * 4, answer_weight=0.0)
    assert warm["student_ce"].item() == 2 and warm["loss"].item() == 1 + 30 + 8  # logged, not trained


def test_answer_warm_up_trains_only_the_distillation_terms(small_llama):
    """loss.answer_after=2: at optimizer steps 0-1 the student's answer CE is logged but sends no gradient
    (only teacher CE, CODI and KV do); from step 2 on it is back in the loss."""
    b = small_llama
    cfg = get_preset("tiny", "kava")
    cfg = cfg.__class__(**{**cfg.__dict__, "latent": LatentConfig(mode="jacobi", M=4, T=1),
                           "loss": LossConfig(a1=10.0, a2=1.0, answer_after=2)})
    objective = KaVaObjective(Student(b.model, cfg.latent, b.eos_id, b.eot_id), cfg)
    tb, sb = _batches(b, 4)
    torch.manual_seed(0)
    for step, with_answer in ((1, False), (2, True), (None, True)):
        terms = objective(tb, sb, step=step)
        rest = terms["teacher_ce"] + 10.0 * terms["codi"] + terms["kv"]
        expected = rest + terms["student_ce"] if with_answer else rest
        assert torch.allclose(terms["loss"], expected), step
        assert terms["student_ce"].item() > 0
    with pytest.raises(ValueError, match="answer_after"):
        KaVaObjective(objective.student, cfg.__class__(**{**cfg.__dict__, "loss": LossConfig(answer_after=-1)}))


@pytest.fixture(scope="module")
def small_llama(family_paths):
    from kava_lab.backbone import load_backbone

    return load_backbone(str(family_paths["llama"]))


def _batches(b, M):
    items = [encode(e, b.tokenizer) for e in make_synthetic(3, trace="nl")]
    collate = Collator.for_backbone(b)
    return collate(items, "teacher"), collate(items, "student", M=M)


def test_gradients_flow_through_all_jacobi_passes(small_llama):
    """Only the KV loss: the <latent> placeholder embedding reaches the final latent cache only through the
    prefill and every Jacobi pass, so a gradient on its row means the chain is differentiable end to end."""
    b = small_llama
    cfg = get_preset("tiny", "kava")
    cfg = cfg.__class__(**{**cfg.__dict__, "latent": LatentConfig(mode="jacobi", M=4, T=3),
                           "loss": LossConfig(a1=0.0, a2=1.0, teacher_weight=0.0)})
    student = Student(b.model, cfg.latent, b.eos_id, b.eot_id)
    objective = KaVaObjective(student, cfg)
    tb, sb = _batches(b, 4)
    terms = objective(tb, sb)
    (terms["kv"]).backward()
    emb = b.model.get_input_embeddings().weight.grad
    assert emb[b.latent_id].abs().sum() > 0
    assert student.projection.net[0].weight.grad.abs().sum() > 0
    b.model.zero_grad()


def test_lora_and_special_token_rows_get_gradients(family_paths):
    from kava_lab.backbone import load_backbone

    b = load_backbone(str(family_paths["llama"]))
    cfg = get_preset("smollm2-135m", "kava")
    cfg = cfg.__class__(**{**cfg.__dict__, "latent": LatentConfig(mode="jacobi", M=4, T=2)})
    model = apply_lora(b.model, cfg, b)
    student = Student(model, cfg.latent, b.eos_id, b.eot_id)
    objective = KaVaObjective(student, cfg)
    tb, sb = _batches(b, 4)
    objective(tb, sb)["loss"].backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert lora_b and all(g is not None for g in lora_b) and any(g.abs().sum() > 0 for g in lora_b)
    token_rows = [g for n, g in grads.items() if "trainable_tokens" in n]
    assert token_rows and any(g is not None and g.abs().sum() > 0 for g in token_rows)
    frozen = [n for n, p in student.named_parameters() if not p.requires_grad]
    assert any("q_proj.base_layer" in n for n in frozen)  # base weights stay frozen


def test_codi_norm_examples_measures_the_residual_against_the_spread_between_examples():
    from kava_lab.losses import codi_loss

    torch.manual_seed(0)
    shared = torch.randn(1, 2, 16) * 10  # a large state every example shares (token identity, say)
    teacher = shared + 0.1 * torch.randn(8, 2, 16)  # examples differ only a little
    student = teacher + 0.1 * torch.randn(8, 2, 16)  # an error as large as that difference
    assert codi_loss(teacher, teacher, "examples") == 0
    g, e = codi_loss(student, teacher, "global"), codi_loss(student, teacher, "examples")
    assert g < 1e-3  # as CODI normalises, the error looks negligible
    assert e > 100 * g  # measured against what differs between problems, it is not
    with pytest.raises(ValueError, match="normalisation"):
        codi_loss(student, teacher, "batch")


def test_loss_curves_draw_the_kv_floor_as_a_dotted_diagnostic():
    from kava_lab.viz import loss_curves

    history = [{"step": s, "loss": 2.0 / s, "kv": 1.0 / s, "kv_floor": 0.5} for s in (1, 2, 3)]
    traces = {t.name: t for t in loss_curves(history).data}
    assert set(traces) == {"loss", "kv", "kv_floor (not in loss)"}
    assert traces["kv_floor (not in loss)"].line.dash == "dot" and traces["kv"].line.dash is None
    assert list(traces["kv_floor (not in loss)"].y) == [0.5, 0.5, 0.5]


def test_importance_weights_follow_the_answers_attention_and_keep_the_scale():
    from kava_lab.losses import importance_weights

    importance = torch.tensor([[[[0.1, 0.6, 0.1, 0.2]]]])  # [B=1, L=1, H=1, N=4]
    indices = torch.tensor([[[[1, 3, 0]]]])  # kept entries
    mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    w = importance_weights(importance, indices, mask)
    assert torch.allclose(w, torch.tensor([[[[0.6, 0.2, 0.1]]]]) / 0.3)  # mean 1 over the kept slots
    mask[..., 2] = False  # an invalid slot weighs nothing and leaves the others' mean over valid slots
    w = importance_weights(importance, indices, mask)
    assert torch.allclose(w, torch.tensor([[[[1.5, 0.5, 0.0]]]]))
    flat = importance_weights(torch.full((1, 1, 1, 4), 0.25), indices, torch.ones(1, 1, 1, 3, dtype=torch.bool))
    assert torch.allclose(flat, torch.ones(1, 1, 1, 3))  # uniform attention: the paper's uniform loss
    # a weighted residual: only the heavily read entry is wrong -> the weighted loss is larger
    t = torch.zeros(1, 1, 1, 3, 2)
    s = t.clone()
    s[..., 0, :] = 1.0
    w = importance_weights(importance, indices, torch.ones(1, 1, 1, 3, dtype=torch.bool))
    assert kv_loss(s, s, t, t, torch.ones(1, 3, dtype=torch.bool), "mse", layer_std=False, weights=w) > \
        kv_loss(s, s, t, t, torch.ones(1, 3, dtype=torch.bool), "mse", layer_std=False)


def test_kava_objective_weights_the_kv_term_by_importance_on_request(small_llama):
    import dataclasses

    b = small_llama
    base = get_preset("tiny", "kava")
    base = base.__class__(**{**base.__dict__, "latent": LatentConfig(mode="jacobi", M=4, T=1)})
    kv = {}
    for weight in ("uniform", "importance"):
        cfg = dataclasses.replace(base, loss=dataclasses.replace(base.loss, kv_weight=weight))
        torch.manual_seed(0)
        with torch.no_grad():
            kv[weight] = KaVaObjective(Student(b.model, cfg.latent, b.eos_id, b.eot_id), cfg)(*_batches(b, 4))["kv"]
    assert kv["importance"].item() != pytest.approx(kv["uniform"].item(), rel=1e-4)
    bad = dataclasses.replace(base, loss=dataclasses.replace(base.loss, kv_weight="attention"))
    with pytest.raises(ValueError, match="kv_weight"):
        KaVaObjective(Student(b.model, bad.latent, b.eos_id, b.eot_id), bad)(*_batches(b, 4))


def test_extraction_importance_is_the_compressors_importance_per_layer(small_llama):
    from kava_lab.compress import extraction_importance
    from kava_lab.scores import importance_scores
    from kava_lab.teacher import extract_teacher

    tb, _ = _batches(small_llama, 4)
    ext = extract_teacher(small_llama.model, tb)
    imp = extraction_importance(ext)  # [B, L, H, N]
    for layer in range(ext.cot_keys.shape[1]):
        ref = importance_scores(ext.cot_keys[:, layer], ext.answer_queries[:, layer], ext.cot_mask, ext.answer_mask)
        assert torch.allclose(imp[:, layer], ref)
    assert torch.allclose(imp.sum(-1), torch.ones_like(imp.sum(-1)), atol=1e-5)
