"""Faults that must not lose or corrupt work: NaN gradients, resume without a checkpoint, SIGTERM, a failed
save, evaluations on other sets, corrupt checkpoints, and bad CLI input. Each fails on the code before it."""

import json
import os
import signal
import threading

import pytest
import torch

from kava_lab.cli import main as cli
from kava_lab.config import RunConfig
from kava_lab.evaluate import evaluate_run
from kava_lab.train import NonFiniteLoss, checkpoint_path, load_run, read_metrics, train
from test_train import small_cfg

quiet = dict(log=lambda s: None)


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(checkpoint_path(run) / "trainable.safetensors"))


def test_nan_gradient_with_finite_loss_is_never_applied_nor_saved(tmp_path, monkeypatch):
    # Poison the gradients where training clips them (Accelerator.clip_grad_norm_): accelerate >= 1.16 no longer
    # goes through torch.nn.utils.clip_grad_norm_, so patching that one silently stopped injecting anything.
    from accelerate import Accelerator

    original = Accelerator.clip_grad_norm_
    calls = {"n": 0}

    def poisoned(self, parameters, *args, **kwargs):
        parameters = list(parameters)
        calls["n"] += 1
        if calls["n"] == 4:  # step 4: one gradient becomes NaN, every loss term stays finite
            parameters[0].grad.fill_(float("nan"))
        return original(self, parameters, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", poisoned)
    cfg = small_cfg(steps=6)  # save_every=3
    with pytest.raises(NonFiniteLoss, match="step 4: gradient norm"):
        train(cfg, tmp_path / "r", **quiet)
    assert calls["n"] == 4  # the poison was injected, at step 4
    assert json.loads((checkpoint_path(tmp_path / "r") / "step.json").read_text())["step"] == 3
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "r").values())


def test_resume_needs_a_checkpoint_and_a_used_folder_is_refused(tmp_path):
    cfg = small_cfg(steps=2)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(cfg, tmp_path / "empty", resume=True, **quiet)
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for resume in (False, True):
        with pytest.raises((FileExistsError, FileNotFoundError), match="metrics.jsonl"):
            train(cfg, used, resume=resume, **quiet)
    assert (used / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # nothing appended
    assert not (used / "config.json").exists()


def test_sigterm_saves_the_last_completed_step(tmp_path):
    cfg = small_cfg(steps=6)

    def stop(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    from kava_lab.train import Terminated

    with pytest.raises(Terminated):
        train(cfg, tmp_path / "r", callback=stop, **quiet)
    assert json.loads((checkpoint_path(tmp_path / "r") / "step.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
    train(cfg, tmp_path / "r", resume=True, **quiet)
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == list(range(1, 7))


def test_a_failed_save_says_disk_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    cfg = small_cfg(steps=6)
    train(cfg, tmp_path / "r", **quiet)  # a good checkpoint at step 6
    good = _weights(tmp_path / "r")
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    from kava_lab.train import save_checkpoint

    student, _, cfg2 = load_run(tmp_path / "r")
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(OSError, match="disk"):
        save_checkpoint(tmp_path / "r", student, opt, sched, 7)
    assert not list((tmp_path / "r").glob("checkpoint.tmp-*"))
    assert all(torch.equal(good[k], v) for k, v in _weights(tmp_path / "r").items())


def test_other_eval_sets_never_overwrite_the_runs_own_eval(tmp_path):
    cfg = small_cfg(steps=2)
    run = train(cfg, tmp_path / "r", **quiet)
    own = evaluate_run(run, limit=4)
    other = evaluate_run(run, eval_source="synthetic:3-3", split="val", limit=4)
    assert json.loads((run / "eval.json").read_text())["eval_source"] == own["eval_source"]
    assert (run / "eval-synthetic_3-3-val.json").exists() and (run / "predictions-synthetic_3-3-val.jsonl").exists()
    assert other["eval_split"] == "val"
    assert evaluate_run(run, split="val", limit=4, write=False)["eval_split"] == "val"  # --split alone is honoured


def test_corrupt_checkpoints_and_configs_are_named(tmp_path):
    cfg = small_cfg(steps=3)
    run = train(cfg, tmp_path / "r", **quiet)
    ckpt = checkpoint_path(run)
    weights = ckpt / "trainable.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trainable.safetensors"):
        load_run(run)
    from safetensors.torch import load_file, save_file

    weights.write_bytes(data)
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="non-finite"):
        load_run(run)
    weights.write_bytes(data)
    (ckpt / "state.pt").write_bytes((ckpt / "state.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match="state.pt"):
        train(RunConfig.load(run / "config.json").__class__.load(run / "config.json"), run, resume=True, **quiet)
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="config.json"):
        load_run(run)


def test_cli_rejects_bad_input_with_a_clear_line(tmp_path, capsys):
    assert cli(["train", "--out", str(tmp_path / "a"), "--steps", "-5"]) == 2
    assert "optim.steps must be at least 1" in capsys.readouterr().err
    assert cli(["train", "--preset", "nope", "--out", str(tmp_path / "b")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli(["train", "--out", str(tmp_path / "c"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    cfg = small_cfg(steps=2)
    train(cfg, tmp_path / "d", **quiet)
    with pytest.raises(SystemExit, match="--method pccot"):
        cli(["train", "--out", str(tmp_path / "d"), "--resume", "--method", "pccot"])
    assert threading.current_thread() is threading.main_thread()


def test_empty_data_is_refused_by_name(tmp_path):
    import dataclasses

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = small_cfg(steps=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(empty), train_split=None))
    with pytest.raises(ValueError, match="empty"):
        train(cfg, tmp_path / "r", **quiet)


def test_notebooks_carry_a_cell_timeout_that_fits_their_default_run():
    """`pytest --nbmake notebooks/` as typed uses nbmake's 300 s cell default unless the notebook says
    otherwise; notebook 03 trains stage 0 (6-12 min on 2 cores) in one cell."""
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "notebooks").glob("0*.ipynb")):
        timeout = json.loads(path.read_text())["metadata"].get("execution", {}).get("timeout", 300)
        assert timeout >= 1200, (path.name, timeout)


def test_progress_bar_counts_the_steps(tmp_path, capsys):
    train(small_cfg(steps=3), tmp_path / "r", progress=True, log=lambda s: None)
    err = capsys.readouterr().err
    assert "kava steps" in err and "3/3" in err


def test_a_non_utf8_byte_is_named_and_lenient_mode_reports_it(tmp_path):
    from kava_lab.data import DataError
    from kava_lab.loaders import load_examples

    good = '{"question": "Q?", "answer": "1 + 1 = 2\\n#### 2"}'
    path = tmp_path / "train.jsonl"
    path.write_bytes((good + "\n").encode() + b'{"question": "caf\xe9", "answer": "#### 1"}\n' + (good + "\n").encode())
    with pytest.raises(DataError, match=r"train.jsonl, line 2: expected UTF-8 text, found byte 0xe9"):
        load_examples(str(path), trace="nl")
    with pytest.warns(Warning):
        loaded = load_examples(str(path), trace="nl", lenient=True)
    assert len(loaded) == 2 and len(loaded.report.skipped) == 1
    bad_array = tmp_path / "svamp.json"
    bad_array.write_bytes(b'[\n{"Body": "x\xff"}]')
    with pytest.raises(DataError, match="svamp.json, line 2: expected UTF-8"):
        load_examples(str(bad_array), trace="nl")


def test_a_question_longer_than_the_positions_is_refused_by_id():
    from kava_lab.data import Example
    from kava_lab.evaluate import check_positions

    examples = [Example(question="q", steps=(), answer="1", answer_value=1.0, id="short"),
                Example(question="q", steps=(), answer="1", answer_value=1.0, id="long")]
    with pytest.raises(ValueError, match="'long' with 600 tokens"):
        check_positions(examples, [10, 600], 20, 512)
    with pytest.warns(UserWarning, match="'short'"):
        check_positions(examples[:1], [500], 20, 512)
    check_positions(examples[:1], [10], 20, 512)  # fits: silent


def test_broken_model_folders_and_gguf_files_are_named(tmp_path):
    import shutil

    from kava_lab.backbone import TinyConfig, build_tiny, load_backbone

    folder = build_tiny(tmp_path / "m", TinyConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                                                   intermediate_size=64))
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(folder / f, bare / f)
    with pytest.raises(FileNotFoundError, match="no-tokenizer.*no tokenizer"):
        load_backbone(str(bare))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(256))
    with pytest.raises((ValueError, OSError), match="broken.gguf"):
        load_backbone(str(gguf))
