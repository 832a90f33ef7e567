"""The training objective's options: the stage curriculum (schedule, student batches with the remaining CoT
written out, restricted KV target), the stage-0 cache key, the teacher's question columns reused by the student,
and the answer logits computed only on request."""

import dataclasses

import pytest
import torch

from kava_lab.backbone import TinyConfig
from kava_lab.config import CurriculumConfig, LatentConfig, get_preset
from kava_lab.encoding import Collator, encode
from kava_lab.synthetic import make_synthetic


def test_schedule():
    off = CurriculumConfig()
    assert [off.latent_steps(t) for t in (0, 500)] == [None, None]
    c = CurriculumConfig(stages=3, stage_steps=10)
    assert [c.latent_steps(t) for t in (0, 9, 10, 25, 29, 30, 1000)] == [0, 0, 1, 2, 2, None, None]


def test_student_batch_writes_the_remaining_steps(tiny_backbone):
    b = tiny_backbone
    examples = make_synthetic(4, trace="nl", min_steps=4, max_steps=4)
    items = [encode(e, b.tokenizer) for e in examples]
    for it, e in zip(items, examples):
        assert len(it.cot_step_lens) == 3 and sum(it.cot_step_lens) == len(it.cot)  # drop-last: 3 of 4 steps
        first = b.tokenizer.decode(list(it.cot[:it.cot_step_lens[0]])).strip()
        assert first == e.steps[0]
    collate = Collator.for_backbone(b)
    full = collate(items, "student", M=3)
    assert full.cot_latent_len is None
    # replacing every step is the ordinary student, token for token
    every = collate(items, "student", M=3, latent_steps=3)
    assert torch.equal(every.input_ids, full.input_ids) and torch.equal(every.labels, full.labels)
    assert every.cot_latent_len.tolist() == [len(it.cot) for it in items]
    one = collate(items, "student", M=3, latent_steps=1)
    for i, it in enumerate(items):
        rest = list(it.cot[it.cot_step_lens[0]:])
        start = one.P + 3 + 1  # after the latents and <eot>
        assert one.input_ids[i, start:start + len(rest)].tolist() == rest
        assert one.labels[i, start:start + len(rest)].tolist() == rest  # the written steps are trained
        assert int(one.prompt_start[i]) == start + len(rest)
        assert int(one.cot_latent_len[i]) == it.cot_step_lens[0]


def test_kv_target_covers_only_the_replaced_steps(tiny_backbone):
    from kava_lab.compress import compress_extraction
    from kava_lab.student import Student
    from kava_lab.teacher import extract_teacher
    from kava_lab.train import KaVaObjective, make_compressor

    b = tiny_backbone
    cfg = dataclasses.replace(get_preset("tiny", "kava", trace="nl"), latent=LatentConfig(mode="jacobi", M=4, T=1))
    items = [encode(e, b.tokenizer) for e in make_synthetic(3, trace="nl", min_steps=4, max_steps=4)]
    collate = Collator.for_backbone(b)
    tb = collate(items, "teacher")
    student = Student(b.model, cfg.latent, eos_id=b.eos_id, eot_id=b.eot_id)
    objective = KaVaObjective(student, cfg)
    assert objective(tb, collate(items, "student", M=4, latent_steps=0))["kv"].item() == 0.0  # nothing replaced
    sb = collate(items, "student", M=4, latent_steps=1)
    ext = extract_teacher(b.model, tb)
    n = ext.cot_mask.shape[1]
    covered = torch.arange(n)[None] < sb.cot_latent_len[:, None]
    target = compress_extraction(dataclasses.replace(ext, cot_mask=ext.cot_mask & covered), make_compressor(cfg), 4)
    limit = sb.cot_latent_len[:, None, None, None].expand_as(target.indices)
    assert (target.indices[target.slot_mask] < limit[target.slot_mask]).all()
    assert objective(tb, sb)["kv"].item() > 0


@pytest.mark.parametrize("kv_keys", ["post_rope", "pre_rope"])
def test_kv_target_with_one_kept_set_for_the_whole_cache(tiny_backbone, kv_keys):
    """compress.scope=all: the objective's target keeps the same CoT tokens in every layer and head, and the
    KV term with importance weights and either key layout stays finite and trains the latents."""
    from kava_lab.config import CompressConfig, LossConfig
    from kava_lab.intervene import kv_target
    from kava_lab.student import Student
    from kava_lab.train import KaVaObjective

    b = tiny_backbone
    base = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(base, latent=LatentConfig(mode="jacobi", M=4, T=1),
                              compress=dataclasses.replace(base.compress, scope="all"),
                              loss=dataclasses.replace(base.loss, kv_keys=kv_keys, kv_weight="importance", a2=10.0))
    assert isinstance(cfg.compress, CompressConfig) and isinstance(cfg.loss, LossConfig)
    items = [encode(e, b.tokenizer) for e in make_synthetic(3, trace="nl", min_steps=4, max_steps=4)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    target = kv_target(b.model, cfg, tb, 4)
    assert (target.indices == target.indices[:, :1, :1]).all()  # one set of positions per example
    student = Student(b.model, cfg.latent, b.eos_id, b.eot_id)
    terms = KaVaObjective(student, cfg)(tb, sb)
    assert torch.isfinite(terms["kv"]) and terms["kv"].item() > 0
    terms["kv"].backward()
    assert student.projection.net[0].weight.grad.abs().sum() > 0
    b.model.zero_grad()


def test_training_with_a_curriculum_logs_its_stage(tmp_path):
    from kava_lab.train import read_metrics, train

    cfg = get_preset("tiny", "kava", trace="nl", steps=4)
    cfg = dataclasses.replace(
        cfg, tiny=TinyConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128),
        stage0_steps=0, log_every=1, save_every=4, latent=dataclasses.replace(cfg.latent, M=3, T=1),
        curriculum=CurriculumConfig(stages=2, stage_steps=1),
        data=dataclasses.replace(cfg.data, train="synthetic:3-3", train_limit=32),
        optim=dataclasses.replace(cfg.optim, batch_size=8, effective_batch=8))
    train(cfg, tmp_path / "run", log=lambda s: None)
    rows = read_metrics(tmp_path / "run")
    assert [r["curriculum_stage"] for r in rows] == [0, 1, None, None]
    assert rows[0]["kv"] == 0.0 and rows[1]["kv"] > 0


def test_stage0_key_ignores_defaults_and_latent_settings():
    from kava_lab.config import RunConfig, apply_overrides, non_default
    from kava_lab.train import stage0_dir

    assert non_default(RunConfig()) == {}
    cfg = get_preset("tiny", "kava")
    same = apply_overrides(cfg, ["loss.codi_norm=examples", "latent.T=12", "curriculum.stages=3",
                                 "optim.group_by_length=true", "optim.compile=true"])
    assert stage0_dir(same) == stage0_dir(cfg)  # stage 0 resets these, so it is shared
    assert stage0_dir(apply_overrides(cfg, ["data.train=synthetic:3-6"])) != stage0_dir(cfg)
    more = apply_overrides(cfg, ["data.train_limit=160000"])  # the run's own problems decide stage 0's ...
    assert stage0_dir(more) != stage0_dir(cfg)
    # ... unless stage 0 is given its own number: then it is the usual stage 0 under a run with more problems
    assert stage0_dir(apply_overrides(more, [f"data.stage0_train_limit={cfg.data.train_limit}"])) == stage0_dir(cfg)


@pytest.mark.parametrize("task", ["synthetic", "synthetic:5-8:alternate"])
def test_stage0_key_follows_the_generator_version(monkeypatch, task):
    """A generator change (VERSION bump) must rebuild a cached stage 0, for the task specs too (it did not
    for "synthetic:5-8:alternate" before: the key only knew the bare "synthetic")."""
    from kava_lab import synthetic
    from kava_lab.config import apply_overrides
    from kava_lab.train import stage0_dir

    cfg = apply_overrides(get_preset("tiny", "kava"), [f"data.train={task}"])
    before = stage0_dir(cfg)
    monkeypatch.setattr(synthetic, "VERSION", synthetic.VERSION + 1)
    assert stage0_dir(cfg) != before


@pytest.mark.parametrize("mode", ["jacobi", "sequential"])
def test_sharing_the_teachers_question_cache_changes_neither_losses_nor_gradients(tiny_backbone, mode):
    """The student's prefill on the teacher's question columns equals re-encoding the question."""
    from kava_lab.student import Student
    from kava_lab.train import KaVaObjective, question_columns

    b = tiny_backbone
    cfg = get_preset("tiny", "kava" if mode == "jacobi" else "codi", trace="nl")
    cfg = dataclasses.replace(cfg, latent=dataclasses.replace(cfg.latent, M=4, T=2))
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl", min_steps=2, max_steps=5)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    student = Student(b.model, cfg.latent, eos_id=b.eos_id, eot_id=b.eot_id)
    objective = KaVaObjective(student, cfg)
    results = []
    for share in (True, False):
        import kava_lab.train as T
        original = T.question_columns
        if not share:
            T.question_columns = lambda *a: None
        try:
            student.zero_grad()
            terms = objective(tb, sb)
            terms["loss"].backward()
        finally:
            T.question_columns = original
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in terms.items()}, grads))
    (shared, g1), (separate, g2) = results
    for k in separate:
        assert shared[k] == pytest.approx(separate[k], rel=1e-5, abs=1e-6), k
    assert g1.keys() == g2.keys()
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-6), n
    assert question_columns(None, tb, sb) is None
    assert question_columns(object(), tb, collate(items[:2], "student", M=4)) is None  # other rows: no sharing


def test_a_teacher_without_weight_runs_without_a_graph_and_changes_no_gradient(tiny_backbone, monkeypatch):
    """loss.teacher_weight=0 skips the teacher's graph (and the shared question columns): the losses and every
    gradient equal those of the same objective run through a teacher pass with a graph."""
    import kava_lab.train as T
    from kava_lab.student import Student
    from kava_lab.train import KaVaObjective

    b = tiny_backbone
    cfg = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(cfg, latent=dataclasses.replace(cfg.latent, M=4, T=2),
                              loss=dataclasses.replace(cfg.loss, teacher_weight=0.0, kv_weight="importance"))
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl", min_steps=2, max_steps=5)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    objective = KaVaObjective(Student(b.model, cfg.latent, eos_id=b.eos_id, eot_id=b.eot_id), cfg)
    original, calls = T.extract_teacher, []

    def with_graph(model, batch, **kw):
        calls.append(kw["with_grad"])
        return original(model, batch, **{**kw, "with_grad": True, "keep_cache": True})

    results = []
    for force_graph in (False, True):
        if force_graph:
            monkeypatch.setattr(T, "extract_teacher", with_graph)
        objective.zero_grad()
        terms = objective(tb, sb)
        terms["loss"].backward()
        assert terms["teacher_ce"].requires_grad == force_graph
        grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in terms.items()}, grads))
    (frozen, g1), (graph, g2) = results
    assert calls == [False]  # the objective asked for no graph
    for k in graph:
        assert frozen[k] == pytest.approx(graph[k], rel=1e-5, abs=1e-6), k
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-6), n


def test_a_frozen_teacher_keeps_its_start_weights_and_trains_nothing(tiny_backbone):
    """loss.teacher=frozen: the teacher pass runs on a copy of the model as training starts. At the start it
    gives the shared objective's student terms (teacher_weight=0, same weights); the copy holds no trainable
    parameter, and after the student's weights move the copy's targets stay those of the start weights."""
    import copy

    from kava_lab.student import Student
    from kava_lab.train import KaVaObjective

    b = tiny_backbone
    model = copy.deepcopy(b.model)  # this test moves weights: keep the shared fixture intact
    cfg = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(cfg, latent=dataclasses.replace(cfg.latent, M=4, T=2),
                              loss=dataclasses.replace(cfg.loss, teacher_weight=0.0))
    frozen_cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, teacher="frozen"))
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl", min_steps=2, max_steps=5)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    student = Student(model, cfg.latent, eos_id=b.eos_id, eot_id=b.eot_id)
    shared, frozen = KaVaObjective(student, cfg), KaVaObjective(student, frozen_cfg)
    assert {id(p) for p in frozen.parameters() if p.requires_grad} == {id(p) for p in student.parameters()}
    frozen.train()
    assert not frozen.frozen_teacher.training and student.training
    a, c = shared(tb, sb), frozen(tb, sb)
    for k in ("teacher_ce", "student_ce", "kv", "codi", "loss"):
        assert a[k].item() == pytest.approx(c[k].item(), rel=1e-5, abs=1e-6), k
    assert not c["teacher_ce"].requires_grad
    with torch.no_grad():  # move the student's weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a, c = shared(tb, sb), frozen(tb, sb)
    assert c["teacher_ce"].item() != pytest.approx(a["teacher_ce"].item(), rel=1e-3)  # the copy did not move
    assert c["student_ce"].item() == pytest.approx(a["student_ce"].item(), rel=1e-5)  # the student is shared
    with pytest.raises(ValueError, match="loss.teacher"):
        KaVaObjective(student, dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, teacher="ema")))


def test_answer_logits_only_on_request_and_the_objective_skips_them(tiny_backbone, tmp_path):
    from kava_lab.teacher import TeacherOutput, extract_teacher

    b = tiny_backbone
    items = [encode(e, b.tokenizer) for e in make_synthetic(2, trace="nl")]
    tb = Collator.for_backbone(b)(items, "teacher")
    full, lean = extract_teacher(b.model, tb), extract_teacher(b.model, tb, with_logits=False)
    assert full.answer_logits is not None and lean.answer_logits is None
    assert torch.equal(full.cot_keys, lean.cot_keys)
    lean.save(tmp_path / "x.safetensors")
    assert TeacherOutput.load(tmp_path / "x.safetensors").answer_logits is None


def test_compiled_blocks_give_the_same_losses_and_gradients(family_paths):
    """optim.compile (torch.compile of each layer's MLP and norms) changes speed, not the maths."""
    from kava_lab.backbone import compile_blocks, load_backbone
    from kava_lab.student import Student
    from kava_lab.train import KaVaObjective

    b = load_backbone(str(family_paths["llama"]))  # its own copy: compilation is in place
    cfg = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(cfg, latent=dataclasses.replace(cfg.latent, M=4, T=2))
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl", min_steps=2, max_steps=5)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    objective = KaVaObjective(Student(b.model, cfg.latent, eos_id=b.eos_id, eot_id=b.eot_id), cfg)
    results = []
    for compiled in (False, True):
        if compiled:
            assert compile_blocks(b.model) == 3 * b.num_layers
            assert sum(getattr(m, "_compiled_call_impl", None) is not None for m in b.model.modules()) == 3 * b.num_layers
        objective.zero_grad()
        terms = objective(tb, sb)
        terms["loss"].backward()
        results.append(({k: v.item() for k, v in terms.items()},
                        {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}))
    (eager, g1), (comp, g2) = results
    for k in eager:
        assert comp[k] == pytest.approx(eager[k], rel=1e-4, abs=1e-6), k
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-3, atol=1e-5), n
    assert not any(k.startswith("_orig_mod") for k in b.model.state_dict())  # checkpoints load either way


@pytest.mark.parametrize("kv_keys", ["post_rope", "pre_rope"])
def test_read_out_loss_is_the_answer_ce_from_the_target_oracle_cache(tiny_backbone, kv_keys):
    """loss.a_target: the term is the answer CE the ``target`` oracle's cache gives (question, <bot>, the KV target
    in the slots, placed as the KV loss compares keys), it enters the loss with weight a_target, and it trains
    the read-out only: no gradient reaches the latent projection (the target is detached). With a2=0 the target
    is still built, with no KV term."""
    from kava_lab.config import LossConfig
    from kava_lab.intervene import apply_target, kv_target
    from kava_lab.student import Student
    from kava_lab.train import KaVaObjective

    b = tiny_backbone
    base = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(base, latent=LatentConfig(mode="jacobi", M=4, T=1),
                              loss=dataclasses.replace(base.loss, kv_keys=kv_keys, a2=10.0, a_target=0.5))
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl", min_steps=3, max_steps=5)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    student = Student(b.model, cfg.latent, b.eos_id, b.eot_id).eval()
    terms = KaVaObjective(student, cfg)(tb, sb)
    rest = terms["teacher_ce"] + terms["student_ce"] + cfg.loss.a1 * terms["codi"] + 10.0 * terms["kv"]
    assert torch.allclose(terms["loss"], rest + 0.5 * terms["target_ce"])
    with torch.no_grad():  # the oracle's cache, built by the evaluation code
        state = student.latent_loop(sb)
        apply_target(b.model, state, sb, kv_target(b.model, cfg, tb, 4), tb, kv_keys)
        oracle_ce = student.answer(sb, state.cache)[0]
    assert torch.allclose(terms["target_ce"], oracle_ce, atol=1e-4)
    assert terms["target_ce"].item() != terms["student_ce"].item()  # other slots (random weights: barely)
    b.model.zero_grad()
    student.projection.zero_grad()
    terms["target_ce"].backward()
    grads = [p.grad for p in student.projection.parameters()]
    assert all(g is None or g.abs().sum() == 0 for g in grads)  # the latents are not what it trains
    assert b.model.get_output_embeddings().weight.grad.abs().sum() > 0
    b.model.zero_grad()
    only = KaVaObjective(student, dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, a2=0.0)))(tb, sb)
    assert "kv" not in only and torch.isfinite(only["target_ce"])
    nocot = get_preset("tiny", "nocot", trace="nl")
    for bad in (dataclasses.replace(cfg, loss=LossConfig(a_target=-1.0)),
                dataclasses.replace(nocot, loss=LossConfig(a_target=1.0))):
        with pytest.raises(ValueError, match="a_target"):
            KaVaObjective(student, bad)


def test_direct_route_loss_is_the_answer_ce_with_the_latent_slots_masked_out(tiny_backbone):
    """loss.a_direct: the term is the answer CE read from [question, <bot>] with the M latent slots masked out of
    the answer's attention: it does not change when other K/V sit in the slots, it differs from the answer CE
    through the latents, it enters the loss with weight a_direct, and it trains no part of the latent loop (no
    gradient reaches the projection). A negative weight or a method without latents is refused."""
    from kava_lab.config import LossConfig
    from kava_lab.intervene import write_latents
    from kava_lab.student import Student, fork_cache, stack_kv
    from kava_lab.train import KaVaObjective

    b = tiny_backbone
    base = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(base, latent=LatentConfig(mode="jacobi", M=4, T=1),
                              loss=dataclasses.replace(base.loss, a_direct=0.5))
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl", min_steps=3, max_steps=5)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    student = Student(b.model, cfg.latent, b.eos_id, b.eot_id).eval()
    terms = KaVaObjective(student, cfg)(tb, sb)
    rest = terms["teacher_ce"] + terms["student_ce"] + cfg.loss.a1 * terms["codi"] + cfg.loss.a2 * terms["kv"]
    assert torch.allclose(terms["loss"], rest + 0.5 * terms["direct_ce"])
    with torch.no_grad():
        state = student.latent_loop(sb)
        keys = stack_kv(state.cache, sb.P, sb.P + 4)[0]
        noise = fork_cache(state.cache)
        write_latents(noise, sb.P, 4, 50 * torch.randn_like(keys), 50 * torch.randn_like(keys))
        hidden = student.answer(sb, fork_cache(noise), hide_latents=True)[0]
        seen = student.answer(sb, fork_cache(noise))[0]
    assert torch.allclose(terms["direct_ce"], hidden, atol=1e-5)  # the slots' contents do not reach it
    assert abs(seen.item() - hidden.item()) > 1e-3  # unmasked, the same noise does
    student.zero_grad()
    terms["direct_ce"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.projection.parameters())
    assert b.model.get_output_embeddings().weight.grad.abs().sum() > 0
    b.model.zero_grad()
    nocot = get_preset("tiny", "nocot", trace="nl")
    for bad in (dataclasses.replace(cfg, loss=LossConfig(a_direct=-1.0)),
                dataclasses.replace(nocot, loss=LossConfig(a_direct=1.0))):
        with pytest.raises(ValueError, match="a_direct"):
            KaVaObjective(student, bad)


def test_forced_pass_loss_is_the_kv_loss_of_the_teacher_forced_slots(tiny_backbone):
    """loss.a_tf: the term is the KV loss (same keys, weights, normalisation) between what the final latent inputs
    write over [question, <bot>, target in the slots] (Student.forced_pass) and the target; it enters the loss
    with weight a_tf and, unlike the read-out loss, trains the latent loop (the projection gets a gradient). It
    needs no KV term (a2=0) and refuses a negative weight or a method without latents."""
    from kava_lab.config import LossConfig
    from kava_lab.intervene import kv_target, target_in_slots, write_latents
    from kava_lab.student import Student, fork_cache
    from kava_lab.teacher import extract_teacher
    from kava_lab.train import KaVaObjective

    b = tiny_backbone
    base = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(base, latent=LatentConfig(mode="jacobi", M=4, T=1),
                              loss=dataclasses.replace(base.loss, kv_keys="pre_rope", kv_weight="importance",
                                                       a2=10.0, a_tf=3.0))
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl", min_steps=3, max_steps=5)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    student = Student(b.model, cfg.latent, b.eos_id, b.eot_id).eval()
    objective = KaVaObjective(student, cfg)
    terms = objective(tb, sb)
    rest = terms["teacher_ce"] + terms["student_ce"] + cfg.loss.a1 * terms["codi"] + 10.0 * terms["kv"]
    assert torch.allclose(terms["loss"], rest + 3.0 * terms["kv_tf"])
    assert torch.isfinite(terms["kv_tf"]) and terms["kv_tf"].item() != terms["kv"].item()
    with torch.no_grad():  # the same term rebuilt by hand from the evaluation code's target
        out = student(sb)
        target = kv_target(b.model, cfg, tb, 4)
        keys, values = target_in_slots(b.model, out.latent_keys, out.latent_values, target, sb, tb, "pre_rope")
        cache = fork_cache(out.latent_cache)
        write_latents(cache, sb.P, sb.M, keys, values)
        f_keys, f_values = student.forced_pass(sb, cache, out.latents)
        extraction = extract_teacher(b.model, tb, with_grad=False, keep_cache=False, with_logits=False)
        by_hand = objective._kv_terms(f_keys, f_values, target, extraction, sb, tb)[0]
    assert torch.allclose(terms["kv_tf"], by_hand, atol=1e-5)
    b.model.zero_grad()
    student.projection.zero_grad()
    terms["kv_tf"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.projection.parameters())
    b.model.zero_grad()
    student.projection.zero_grad()
    only = KaVaObjective(student, dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, a2=0.0)))(tb, sb)
    assert "kv" not in only and torch.isfinite(only["kv_tf"])
    nocot = get_preset("tiny", "nocot", trace="nl")
    for bad in (dataclasses.replace(cfg, loss=LossConfig(a_tf=-1.0)),
                dataclasses.replace(nocot, loss=LossConfig(a_tf=1.0))):
        with pytest.raises(ValueError, match="a_tf"):
            KaVaObjective(student, bad)


def test_kv_loss_from_a_layer_compares_only_the_layers_above(tiny_backbone):
    """loss.kv_from_layer=l: the KV term and its floor are the by-hand kv_loss / kv_content_floor of layers l.. (the
    same keys and importance weights); the answer and step terms are untouched, and a layer outside the model is
    refused. With l=1 the layer-0 K/V of the latents (a map of their inputs alone) are no longer pulled."""
    from kava_lab.compress import compress_extraction, extraction_importance
    from kava_lab.config import LossConfig
    from kava_lab.losses import full_mask, importance_weights, kv_content_floor, kv_loss
    from kava_lab.student import Student
    from kava_lab.teacher import extract_teacher
    from kava_lab.train import KaVaObjective, pre_rope_keys

    b = tiny_backbone
    base = get_preset("tiny", "kava", trace="nl")
    cfg = dataclasses.replace(base, latent=LatentConfig(mode="jacobi", M=4, T=1),
                              loss=dataclasses.replace(base.loss, kv_keys="pre_rope", kv_weight="importance", a2=10.0))
    items = [encode(e, b.tokenizer) for e in make_synthetic(4, trace="nl", min_steps=3, max_steps=5)]
    collate = Collator.for_backbone(b)
    tb, sb = collate(items, "teacher"), collate(items, "student", M=4)
    student = Student(b.model, cfg.latent, b.eos_id, b.eot_id).eval()
    full = KaVaObjective(student, cfg)(tb, sb)
    top = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, kv_from_layer=1))
    objective = KaVaObjective(student, top)
    terms = objective(tb, sb)
    assert torch.allclose(terms["student_ce"], full["student_ce"]) and terms["kv"].item() != full["kv"].item()
    with torch.no_grad():  # by hand: the same tensors, layer 0 cut off
        out = student(sb)
        extraction = extract_teacher(b.model, tb, with_grad=False, keep_cache=False, with_logits=False)
        target = compress_extraction(extraction, objective.compressor, 4, order=cfg.compress.order,
                                     scope=cfg.compress.scope)
        s_k, t_k = pre_rope_keys(b.model, out.latent_keys, target.keys, target.indices, sb, tb)
        w = importance_weights(extraction_importance(extraction), target.indices, target.slot_mask)
        mask = full_mask(target.slot_mask, t_k)
        kv = kv_loss(s_k[:, 1:], out.latent_values[:, 1:], t_k[:, 1:], target.values[:, 1:], mask[:, 1:],
                     weights=w[:, 1:])
        floor = kv_content_floor(t_k[:, 1:], target.values[:, 1:], mask[:, 1:], weights=w[:, 1:])
    assert torch.allclose(terms["kv"], kv, atol=1e-5) and torch.allclose(terms["kv_floor"], floor, atol=1e-5)
    for bad in (-1, b.model.config.num_hidden_layers):
        with pytest.raises(ValueError, match="kv_from_layer"):
            KaVaObjective(student, dataclasses.replace(cfg, loss=LossConfig(kv_from_layer=bad)))
