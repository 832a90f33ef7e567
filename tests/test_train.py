import dataclasses
import json

import pytest
import torch

from kava_lab.backbone import TinyConfig
from kava_lab.config import DataConfig, OptimConfig, RunConfig, get_preset
from kava_lab.evaluate import evaluate_run
from kava_lab.train import KaVaObjective, NonFiniteLoss, checkpoint_path, load_run, read_metrics, train

SMALL = TinyConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)


def small_cfg(method="kava", steps=6, **kw) -> RunConfig:
    cfg = get_preset("tiny", method, trace="nl", steps=steps)
    return dataclasses.replace(
        cfg, tiny=SMALL, stage0_steps=0, log_every=1, save_every=3,
        latent=dataclasses.replace(cfg.latent, M=4 if method != "codi" else 3, T=2),
        data=dataclasses.replace(cfg.data, train_limit=64, eval_limit=8),
        optim=dataclasses.replace(cfg.optim, batch_size=8, effective_batch=16), max_new_tokens=12, **kw)


def _losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run)]


@pytest.mark.parametrize("grouped", [False, True], ids=["random-batches", "group_by_length"])
def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, grouped):
    import kava_lab.train as T

    cfg = small_cfg()
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, group_by_length=grouped))
    drawn = []
    grouped_epoch = T._grouped_epoch
    monkeypatch.setattr(T, "_grouped_epoch", lambda *a: drawn.append(a[1:]) or grouped_epoch(*a))
    full = train(cfg, tmp_path / "full", log=lambda s: None)
    assert bool(drawn) == grouped  # the setting reaches the training loop's batch draw

    def crash(record):
        if record["step"] == 4:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", callback=crash, log=lambda s: None)
    ckpt = checkpoint_path(tmp_path / "cut")
    assert json.loads((ckpt / "step.json").read_text())["step"] == 4  # the crash left a resumable checkpoint
    with pytest.raises(FileExistsError):
        train(cfg, tmp_path / "cut", log=lambda s: None)
    train(cfg, tmp_path / "cut", resume=True, log=lambda s: None)
    a, b = _losses(full), _losses(tmp_path / "cut")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5)
    run_files = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"config.json", "versions.json", "metrics.jsonl", "checkpoint"} <= run_files
    rec = read_metrics(full)[-1]
    assert {"teacher_ce", "student_ce", "codi", "kv", "lr", "tokens_per_s", "step_time_s"} <= set(rec)


def test_resume_refuses_a_different_config(tmp_path):
    cfg = small_cfg(steps=3)
    train(cfg, tmp_path / "r", log=lambda s: None)
    with pytest.raises(ValueError, match="differs"):
        train(dataclasses.replace(cfg, seed=5), tmp_path / "r", resume=True, log=lambda s: None)


def test_nan_loss_stops_with_step_and_term_and_keeps_good_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg(steps=6)
    original = KaVaObjective.forward
    calls = {"n": 0}

    def poisoned(self, tb, sb=None, step=None):
        terms = original(self, tb, sb, step=step)
        calls["n"] += 1
        if calls["n"] == 5:  # step 3, first micro-batch (2 micro-batches per step)
            terms["kv"] = terms["kv"] * float("nan")
        return terms

    monkeypatch.setattr(KaVaObjective, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 3: loss term 'kv'"):
        train(cfg, tmp_path / "nan", log=lambda s: None)
    ckpt = checkpoint_path(tmp_path / "nan")
    assert json.loads((ckpt / "step.json").read_text())["step"] == 2
    monkeypatch.setattr(KaVaObjective, "forward", original)
    student, _, _ = load_run(tmp_path / "nan")
    assert all(torch.isfinite(p).all() for p in student.parameters())


@pytest.mark.parametrize("method", ["cot", "nocot", "codi", "pccot", "kava"])
def test_every_method_trains_and_evaluates(tmp_path, method):
    cfg = small_cfg(method, steps=2)
    run = train(cfg, tmp_path / method, log=lambda s: None)
    summary = evaluate_run(run, limit=4)
    assert summary["n"] == 4 and summary["latency_ms"] > 0
    assert (run / "eval.json").exists() and (run / "predictions.jsonl").exists()
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    from kava_lab.data import answers_match
    from kava_lab.evaluate import kv_bytes_per_token

    student, backbone, cfg = load_run(run)
    tok, per_token = backbone.tokenizer, kv_bytes_per_token(student.model)
    ids = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    # exact counts: latent passes (1 prefill + T Jacobi passes, or 1 + M sequential steps) plus one pass per
    # generated token; the cache holds the prompt plus every generated token
    base = {"cot": 0, "nocot": 0, "codi": 1 + cfg.latent.M, "pccot": 1 + cfg.latent.T, "kava": 1 + cfg.latent.T}[method]
    for r in rows:
        prompt = ids(r["question"]) + (1 + cfg.latent.M + 1 + ids(" " + cfg.encoding.answer_prompt)
                                       if cfg.uses_latents else 0)
        assert r["kv_bytes"] % per_token == 0
        generated = r["kv_bytes"] // per_token - prompt
        assert 1 <= generated <= cfg.max_new_tokens
        assert r["forward_passes"] == base + generated, (r["forward_passes"], base, generated)
        assert r["correct"] == answers_match(r["pred"], r["gold"])
    assert summary["accuracy"] == sum(r["correct"] for r in rows) / 4
    assert summary["forward_passes"] == sum(r["forward_passes"] for r in rows) / 4


def test_config_round_trips(tmp_path):
    cfg = small_cfg()
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        RunConfig.from_dict({"nonsense": 1})


def test_methods_are_settings_of_one_objective():
    kava, pccot, codi = (get_preset("tiny", m) for m in ("kava", "pccot", "codi"))
    assert kava.latent.mode == pccot.latent.mode == "jacobi" and codi.latent.mode == "sequential"
    assert kava.loss.a2 > 0 and pccot.loss.a2 == 0 and codi.loss.a2 == 0
    assert pccot.loss.a1 == 1 and codi.latent.M == 6
    assert get_preset("tiny", "cot").latent.mode == "none"
    with pytest.raises(ValueError, match="unknown method"):
        get_preset("tiny", "magic")


def test_demo_run_trains_once_then_reuses(tmp_path):
    """Notebook 04's fallback: a short tiny run trained into a folder keyed by its config, reused on the
    next call; a finished latent run given in ``reuse`` wins over both."""
    from kava_lab.runs import demo_config, demo_run

    cfg = demo_config("kava", small=True, steps=2, stage0_steps=2, train_limit=16)
    assert (cfg.method, cfg.optim.steps, cfg.stage0_steps, cfg.optim.batch_size) == ("kava", 2, 2, 8)
    said = []
    first = demo_run("kava", small=True, root=tmp_path, log=said.append, steps=2, stage0_steps=2, train_limit=16)
    assert "training a short kava demo run" in said[0]
    said.clear()
    again = demo_run("kava", small=True, root=tmp_path, log=said.append, steps=2, stage0_steps=2, train_limit=16)
    assert again == first and said[0].startswith("reusing the cached kava demo run"), said
    said.clear()
    assert demo_run("kava", small=True, root=tmp_path / "other", log=said.append, reuse=[tmp_path / "none", first],
                    steps=3) == first
    assert said[0].startswith("reusing the finished kava run"), said


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding():
    """optim.group_by_length: each epoch draws every example at most once (all but n % B), batches of one
    process and of different ranks are disjoint, the stream is a pure function of the step (resume-safe), and
    a batch's padding falls well below random batching's."""
    import random

    from kava_lab.train import GROUP_WINDOW, _batch_indices

    rng = random.Random(0)
    lengths = tuple(rng.randint(40, 200) for _ in range(1000))
    B, world = 16, 2
    per_epoch = len(lengths) // B  # 62 batches; 8 examples sit out
    seen = []
    for micro in range(per_epoch // world):
        ranks = [_batch_indices(len(lengths), 3, micro, B, world, r, lengths) for r in range(world)]
        assert not set(ranks[0]) & set(ranks[1])
        seen += ranks[0] + ranks[1]
    assert len(seen) == len(set(seen)) == per_epoch * B
    assert _batch_indices(len(lengths), 3, 5, B, world, 1, lengths) == _batch_indices(len(lengths), 3, 5, B, world, 1,
                                                                                        lengths)  # pure: resume-safe
    next_epoch = [i for m in range(per_epoch // world, per_epoch) for r in range(world)
                  for i in _batch_indices(len(lengths), 3, m, B, world, r, lengths)]
    assert len(set(next_epoch)) == len(next_epoch)
    assert next_epoch != seen[:len(next_epoch)]  # another epoch, another order

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches) / \
            sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = [_batch_indices(len(lengths), 0, m, B, 1, 0, lengths) for m in range(per_epoch)]
    plain = [_batch_indices(len(lengths), 0, m, B, 1, 0) for m in range(per_epoch)]
    assert padding(plain) > 0.3 and padding(grouped) < 0.05
    # batches are not ordered by length: the epoch does not sweep from long to short problems
    means = [sum(lengths[i] for i in b) / B for b in grouped][:GROUP_WINDOW]  # one window, were it unshuffled
    assert means != sorted(means) and means != sorted(means, reverse=True)


def test_stage0_rebuilt_on_the_same_threads_is_the_same_model(tmp_path, monkeypatch):
    """Two builds of one stage-0 config in fresh caches, same thread count: bit-identical weights (the records'
    ``stage0_sha`` may then be compared across machines); versions.json says the threads it trained on."""
    from kava_lab.runs import ensure_stage0, weights_fingerprint

    cfg = dataclasses.replace(small_cfg("cot"), stage0_steps=4)
    shas = []
    for i in range(2):
        monkeypatch.setenv("KAVA_LAB_CACHE", str(tmp_path / f"cache{i}"))
        model = ensure_stage0(cfg, log=lambda s: None, progress=False)
        shas.append(weights_fingerprint(model))
        versions = json.loads((model.parent / "run" / "versions.json").read_text())
        assert versions["torch_threads"] == torch.get_num_threads() and versions["processes"] == 1
    assert shas[0] == shas[1] and shas[0] is not None
