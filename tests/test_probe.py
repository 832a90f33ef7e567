"""Probes on tiny random models: shapes, the norm/head lookup, known alignment and planted probe signals."""

from __future__ import annotations

import math

import pytest
import torch

from kava_lab import probe
from kava_lab.backbone import TinyConfig, build_tiny, load_backbone
from kava_lab.config import LatentConfig, get_preset
from kava_lab.student import Student
from kava_lab.synthetic import make_synthetic

TINY = TinyConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is fastest, and immune to a busy CPU's thread-pool spin-waits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    return load_backbone(str(build_tiny(tmp_path_factory.mktemp("probe") / "llama", TINY)))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def _student(backbone, mode="jacobi", M=4, T=2):
    torch.manual_seed(0)
    return Student(backbone.model, LatentConfig(mode=mode, M=M, T=T), eos_id=backbone.eos_id,
                   eot_id=backbone.eot_id).eval()


def _cfg(mode, M=4, T=2):
    method = "codi" if mode == "sequential" else "kava"
    cfg = get_preset("tiny", method)
    from dataclasses import replace

    return replace(cfg, latent=LatentConfig(mode=mode, M=M, T=T))


# ------------------------------------------------------------------------------------- norm and head

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_lens_reproduces_logits(llama, family):
    model = llama.model if family == "llama" else _gpt2()
    assert probe.final_norm(model) is not None
    assert probe.lm_head(model) is model.get_output_embeddings()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    # transformers 5 returns the last hidden state after the final norm: the check must see that,
    # and the lens must not apply the norm a second time.
    assert probe.last_hidden_is_normed(model) is True
    torch.testing.assert_close(probe.logit_lens(model, out.hidden_states[-1]), out.logits, atol=1e-4, rtol=1e-4)
    # an explicitly un-normed input gets the norm
    pre = torch.randn(1, 3, model.config.hidden_size)
    norm = probe.final_norm(model)
    torch.testing.assert_close(probe.logit_lens(model, pre, normed=False),
                               model.get_output_embeddings()(norm(pre)), atol=1e-5, rtol=1e-5)


def test_norm_and_head_through_peft(llama):
    import copy

    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(llama.model)
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert probe.final_norm(wrapped) is base.model.norm
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = wrapped(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(probe.logit_lens(wrapped, out.hidden_states[-1]), out.logits, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- collect

@pytest.mark.parametrize("mode", ["jacobi", "sequential"])
def test_collect_shapes_and_hidden_rerun(llama, mode):
    M, T = 4, 2
    student = _student(llama, mode, M, T)
    examples = make_synthetic(5, split="test", trace="equation")
    data = probe.collect(student, llama, _cfg(mode, M, T), examples, batch_size=3)
    c = llama.model.config
    L, H, D = c.num_hidden_layers, c.num_key_value_heads, c.hidden_size
    d = D // c.num_attention_heads
    I = T + 1 if mode == "jacobi" else 1
    assert data.trajectory.shape == (I, 5, M, D)
    assert len(data.iteration_labels) == I
    assert data.hidden.shape == (5, L + 1, M, D)
    for name in ("student_keys", "student_values", "teacher_keys", "teacher_values"):
        assert getattr(data, name).shape == (5, L, H, M, d)
    assert data.slot_mask.shape == (5, M) and data.slot_mask.dtype == torch.bool
    assert len(data.cot_ids) == 5 and all(len(c) > 0 for c in data.cot_ids)
    # the re-run's last layer is the final latent pass's recorded output, the first its inputs
    torch.testing.assert_close(data.hidden[:, -1], data.trajectory[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(data.hidden[:, 0], data.latent_inputs, atol=1e-5, rtol=1e-5)


def test_trajectory_tensor_labels(llama):
    student = _student(llama, "jacobi", 3, 2)
    from kava_lab.encoding import Collator, encode

    items = [encode(e, llama.tokenizer) for e in make_synthetic(2, split="test")]
    batch = Collator.for_backbone(llama)(items, "student", M=3)
    with torch.no_grad():
        state = student.latent_loop(batch, record=True)
    out, labels = probe.trajectory_tensor(state.trajectory)
    inp, in_labels = probe.trajectory_tensor(state.trajectory, "inputs")
    assert out.shape[:3] == (3, 2, 3) and labels == ["prefill", "iteration 1", "iteration 2"]
    assert inp.shape[:3] == (2, 2, 3) and in_labels == ["iteration 1", "iteration 2"]


# -------------------------------------------------------------------------------------------- decoding

def test_decode_latents_topk_and_trace_match(llama):
    model = llama.model
    V, D = model.get_output_embeddings().weight.shape
    hidden = torch.randn(2, 3, 4, D)  # [I, B, M, D]
    dec = probe.decode_latents(model, hidden, k=3)
    assert dec.token_ids.shape == (2, 3, 4, 3) and dec.probs.shape == (2, 3, 4, 3)
    assert (dec.probs[..., :-1] >= dec.probs[..., 1:]).all()
    # plant the traces: example b's trace holds its own top-1 tokens at iteration 1 only
    traces = [dec.token_ids[1, b, :, 0].tolist() for b in range(3)]
    dec = probe.decode_latents(model, hidden, k=3, trace_ids=traces)
    assert dec.in_trace[1].all() and dec.topk_in_trace[1].all()
    own = torch.tensor([[t in traces[b] for t in dec.token_ids[0, b, :, 0].tolist()] for b in range(3)])
    assert torch.equal(dec.in_trace[0], own)
    other = torch.tensor([[t in traces[(b + 1) % 3] for t in dec.token_ids[1, b, :, 0].tolist()] for b in range(3)])
    assert torch.equal(dec.in_other_trace[1], other)
    rates = dec.match_rate()
    assert rates["top1"][1] == 1.0 and rates["top1"].shape == (2,)
    toks = dec.tokens(llama.tokenizer, example=0, iteration=1)
    assert len(toks) == 4 and len(toks[0]) == 3 and all(isinstance(t, str) for t in toks[0])


# ------------------------------------------------------------------------------------------- alignment

def test_diagonal_score_known_matrices():
    M = 5
    assert probe.diagonal_score(torch.eye(M)).item() == pytest.approx(1.0)
    assert probe.diagonal_score(torch.full((M, M), 0.3)).item() == pytest.approx(0.0)
    # only valid slots count: the diagonal of invalid slots is ignored
    cos = torch.eye(M)
    cos[3, 3] = cos[4, 4] = -5.0
    mask = torch.tensor([True, True, True, False, False])
    assert probe.diagonal_score(cos, mask).item() == pytest.approx(1.0)
    assert probe.diagonal_score(torch.stack([torch.eye(M), torch.zeros(M, M)])).tolist() == [1.0, 0.0]


def test_kv_alignment_identity_and_control():
    torch.manual_seed(0)
    B, L, H, M, d = 6, 3, 2, 8, 64
    k, v = torch.randn(B, L, H, M, d), torch.randn(B, L, H, M, d)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 6:] = False
    al = probe.kv_alignment(k, v, k.clone(), v.clone(), mask)
    assert al.keys.shape == (B, L, M, M) and al.key_score.shape == (L,)
    diag = torch.diagonal(al.keys[1], dim1=-2, dim2=-1)
    torch.testing.assert_close(diag, torch.ones(L, M))
    assert (al.key_score > 0.85).all() and (al.value_score > 0.85).all()
    assert al.key_control.abs().max() < 0.1 and al.value_control.abs().max() < 0.1  # unrelated caches
    assert torch.isnan(al.keys[0, :, 6:, :]).all() and not torch.isnan(al.keys[0, :, :6, :6]).any()
    # a student unrelated to the teacher: no diagonal
    al = probe.kv_alignment(torch.randn_like(k), torch.randn_like(v), k, v, mask)
    assert al.key_score.abs().max() < 0.1
    assert probe.kv_cosine(k, k).shape == (B, L, H, M, M)


def test_value_reach_exact_floor_and_planted_slot():
    torch.manual_seed(0)
    B, L, H, M, d = 40, 2, 2, 4, 8
    shared = torch.randn(1, L, H, M, d) * 3  # what every problem's target shares
    own = torch.randn(B, L, H, M, d)  # what is specific to each problem
    t = shared + own
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[:5, 3] = False
    exact = probe.value_reach(t.clone(), t, mask, kind="mse")
    assert exact.ratio.abs().max() < 1e-6 and exact.count.tolist() == [B, B, B, B - 5]
    # the other problems' mean is the floor itself
    m = mask[:, None, None, :, None].float()
    loo = ((t * m).sum(0, keepdim=True) - t * m) / (m.sum(0, keepdim=True) - m).clamp(min=1)
    torch.testing.assert_close(probe.value_reach(loo, t, mask, kind="mse").ratio, torch.ones(L, M))
    # a student that knows slot 0 of each problem and only the shared part elsewhere
    s = shared.expand_as(t).clone()
    s[:, :, :, 0] = t[:, :, :, 0]
    r = probe.value_reach(s, t, mask, kind="mse")
    assert (r.ratio[:, 0] < 0.01).all() and (r.ratio[:, 1:] > 0.9).all()
    assert len(r.summary()["ratio_by_slot"]) == M and 0 < r.summary()["ratio"] < 1
    # garbage in invalid slots changes nothing
    s2 = s.clone()
    s2[:5, :, :, 3] = 1e6
    torch.testing.assert_close(probe.value_reach(s2, t, mask, kind="mse").distance, r.distance)


def test_kv_alignment_on_collected_data(llama):
    student = _student(llama, "jacobi", 4, 1)
    data = probe.collect(student, llama, _cfg("jacobi", 4, 1), make_synthetic(4, split="test"), batch_size=4)
    al = probe.kv_alignment(data.student_keys, data.student_values, data.teacher_keys, data.teacher_values,
                            data.slot_mask)
    assert al.mean("keys").shape == (2, 4, 4)
    assert torch.isfinite(al.key_score).all() and torch.isfinite(al.value_control).all()


# ------------------------------------------------------------------------------------------ trajectories

def test_project_trajectory_finds_planted_direction():
    torch.manual_seed(0)
    I, B, M, D = 3, 5, 4, 32
    direction = torch.randn(D)
    t = torch.arange(I, dtype=torch.float)[:, None, None, None]
    hidden = 10 * t * direction + 0.01 * torch.randn(I, B, M, D)
    proj = probe.project_trajectory(hidden, n_components=3)
    assert proj.coords.shape == (I, B, M, 3) and proj.components.shape == (3, D)
    assert proj.explained[0] > 0.99 and proj.explained.sum() <= 1 + 1e-6
    pc1 = proj.coords[..., 0].mean((1, 2))
    assert torch.all(pc1[1:] - pc1[:-1] > 0) or torch.all(pc1[1:] - pc1[:-1] < 0)  # iterations move along PC1
    torch.testing.assert_close(proj.transform(hidden), proj.coords, atol=1e-4, rtol=1e-4)
    deltas = probe.iteration_deltas(hidden)
    assert deltas.shape == (I - 1, M)
    assert probe.iteration_deltas(hidden[:1].expand(3, -1, -1, -1)).abs().max() == 0


# ---------------------------------------------------------------------------------------------- probes

def test_probe_targets_last_digit_and_log_value():
    examples = make_synthetic(20, split="test", trace="equation")
    labels, names = probe.probe_targets(examples, "last_digit")
    K = max(len(e.step_values) for e in examples) + 1
    assert labels.shape == (20, K) and names[-1] == "answer"
    for e, row in zip(examples, labels.tolist()):
        for i, v in enumerate(e.step_values):
            assert row[i] == int(v) % 10
        assert all(x == -1 for x in row[len(e.step_values):K - 1])
        assert row[-1] == int(e.answer_value) % 10
    values, _ = probe.probe_targets(examples, "log_value")
    assert values[0, 0].item() == pytest.approx(math.log1p(examples[0].step_values[0]), rel=1e-5)


def test_probe_targets_holder_follows_the_walk_of_both_trace_styles():
    """``holder``: per step, who holds the count after it (the step's receiver); the answer column is the person the
    question asks about. Both trace styles give the same labels; in-order problems (one person) are refused."""
    from kava_lab.synthetic import NAMES, load_synthetic

    index = {n: i for i, (n, _, _) in enumerate(NAMES)}
    nl = load_synthetic("synthetic:3-5:shuffled", "val", "nl", 12)
    eq = load_synthetic("synthetic:3-5:shuffled", "val", "equation", 12)
    labels, names = probe.probe_targets(nl, "holder")
    assert torch.equal(labels, probe.probe_targets(eq, "holder")[0]) and names[-1] == "answer"
    for e, row in zip(nl, labels.tolist()):
        asked = e.question.split("does ")[-1].split(" have")[0]
        assert row[-1] == index[asked] == row[len(e.steps) - 1]
        assert row[0] == index[e.steps[0].split(" gives ")[1].split()[0].strip(",:")]
        giver_of_next = [index[s.strip("< ").split()[0]] for s in e.steps[1:]]
        assert row[:len(e.steps) - 1] == giver_of_next  # whoever receives at step k gives at step k + 1
        assert all(x == -1 for x in row[len(e.steps):-1])
    with pytest.raises(ValueError, match="shuffled walks"):
        probe.probe_targets(make_synthetic(4, split="test", trace="nl"), "holder")
    planted = torch.randn(len(labels), 1, 1, 16)  # more than 10 classes are probed as classes
    assert probe.linear_probes(planted, labels=labels, target="holder", n_shuffles=1, min_examples=2).metric == "accuracy"


def test_linear_probe_above_chance_on_planted_signal_and_at_chance_when_shuffled():
    torch.manual_seed(0)
    B, L1, M, D = 300, 3, 4, 24
    hidden = torch.randn(B, L1, M, D)
    labels = torch.randint(0, 10, (B, 2))
    codes = torch.randn(10, D) * 3
    hidden[:, 2, 1] += codes[labels[:, 0]]  # step 0 readable at (layer 2, slot 2) only
    labels[:5, 1] = -1  # missing steps are skipped
    res = probe.linear_probes(hidden, labels=labels, step_names=["a", "b"], n_shuffles=2)
    assert res.score.shape == (2, L1, M) and res.control.shape == (2, L1, M)
    assert res.n_train[1] + res.n_test[1] == B - 5
    assert res.score[0, 2, 1] > 0.9
    others = res.score[0].clone()
    others[2, 1] = float("nan")
    assert torch.nanmean(others) < 0.25  # chance is about 0.1
    assert res.control[0].max() < 0.3 and res.control[0, 2, 1] < 0.3
    assert res.score[1].max() < 0.3  # step 1 is planted nowhere
    best = res.best()[0]
    assert (best["layer"], best["slot"]) == (2, 1) and best["accuracy"] > 0.9 and best["control"] < 0.3
    assert 0.05 < best["chance"] < 0.3


def test_ridge_regression_probe_r2():
    torch.manual_seed(0)
    B, D = 200, 16
    hidden = torch.randn(B, 2, 1, D)
    w = torch.randn(D)
    y = (hidden[:, 1, 0] @ w + 0.1 * torch.randn(B))[:, None]
    res = probe.linear_probes(hidden, labels=y, target="log_value", n_shuffles=1)
    assert res.metric == "r2"
    assert res.score[0, 1, 0] > 0.95 and res.score[0, 0, 0] < 0.2 and res.control[0, 1, 0] < 0.2


def test_probes_on_collected_untrained_student(llama):
    student = _student(llama, "jacobi", 4, 1)
    examples = make_synthetic(16, split="test", trace="nl")
    data = probe.collect(student, llama, _cfg("jacobi", 4, 1), examples, batch_size=16)
    res = probe.linear_probes(data.hidden, examples, n_shuffles=1, min_examples=5)
    assert res.score.shape[1:] == (3, 4) and len(res.step_names) == res.score.shape[0]
    dec = probe.decode_latents(llama.model, data.trajectory, k=2, trace_ids=data.cot_ids,
                               iteration_labels=data.iteration_labels)
    assert dec.match_rate(data.slot_mask)["top1"].shape == (2,)


def test_live_controls_builds_widgets_from_specs_and_draws_only_on_change():
    """The one widget helper (viz.live_controls) takes widgets or specs; nothing is drawn when the cell runs."""
    pytest.importorskip("ipywidgets")
    from kava_lab import viz

    calls = []

    def show(example=2, kind="keys", control=False):
        calls.append((example, kind, control))

    box = viz.live_controls(show, dict(example=(0, 5), kind=["keys", "values"], control=False))
    assert calls == []  # nothing drawn when the cell runs
    slider, dropdown, checkbox = box.children[0].children
    assert (slider.value, dropdown.value, checkbox.value) == (2, "keys", False)
    slider.value = 4
    dropdown.value = "values"
    assert calls == [(4, "keys", False), (4, "values", False)]


def test_probe_figures_scale_to_the_data_and_name_what_they_show():
    """Probe accuracies of 0.03-0.14 on a fixed 0-1 colour scale all looked alike, the majority-class rate was
    called "chance", and the trajectory's grey lines had no legend entry."""
    from kava_lab import viz

    score = torch.tensor([[[0.03, 0.08], [0.14, 0.05]]])  # [K=1, L+1=2, M=2]
    res = probe.ProbeResult(target="last_digit", metric="accuracy", step_names=["step 1"], score=score,
                            control=score * 0.5, chance=torch.tensor([0.11]), n_train=torch.tensor([40]),
                            n_test=torch.tensor([10]), lambdas=torch.ones_like(score), loo=torch.ones_like(score))
    fig = viz.fig_probe(res, step=0)
    heat = fig.data[0]
    assert (heat.zmin, heat.zmax) == pytest.approx((0.03, 0.14))
    assert "majority-class rate 0.11" in fig.layout.title.text and "chance" not in fig.layout.title.text
    assert "majority 0.11" in heat.colorbar.ticktext
    names = [b.name for b in viz.fig_probe_summary(res).data] if hasattr(res, "best") and res.best() else []
    assert not names or "majority-class rate" in names
    proj = probe.project_trajectory(torch.randn(3, 2, 4, 8), n_components=2)
    traj = viz.fig_trajectory(proj, example=0)
    grey = [t for t in traj.data if t.line.color == "lightgrey"]
    assert len(grey) == 4 and sum(bool(t.showlegend) for t in grey) == 1
    assert grey[0].name == "one slot across iterations"


def test_cache_figures_keep_titles_and_distinct_ticks():
    from kava_lab import viz

    fig = viz.method_overlap(["rkv", "attention"], [[1.0, 0.4], [0.4, 1.0]])
    assert fig.layout.width >= 560 and fig.layout.margin.t >= 90 and "<br>" in fig.layout.title.text
    lay = viz.retained_by_layer({"rkv": {"per_layer": [0.704, 0.709, 0.706]}})
    assert lay.layout.yaxis.tickformat == ".1%"
