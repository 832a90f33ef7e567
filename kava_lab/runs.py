"""Run folders and caches: building a run's model, checkpoints, loading a finished run, metrics, the cached
stage-0 backbone, short demo runs for notebooks called without a run folder, the one cache-key hash and the
one small-mode switch. ``train.py`` keeps the objective and the loop.

A run folder holds ``config.json``, ``versions.json``, ``metrics.jsonl`` and ``checkpoint/`` (trainable
weights, optimizer, scheduler, RNG states, step), written atomically; ``load_run`` rebuilds the student from it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .backbone import Backbone, cache_dir, load_backbone
from .config import RunConfig
from .student import Student

SMALL_ENV = "KAVA_LAB_SMALL"


def small_mode() -> bool:
    """``$KAVA_LAB_SMALL`` (what CI sets): notebooks run smoke-test sizes. "1", "true", "yes", "on" -> True;
    unset, "", "0", "false", "no", "off" -> False; anything else is an error naming the variable."""
    value = os.environ.get(SMALL_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"{SMALL_ENV}={os.environ[SMALL_ENV]!r}: expected one of 1/true/yes/on or 0/false/no/off")


def config_hash(data, length: int = 12) -> str:
    """The one cache-key digest (stage 0, the tiny backbone, demo runs): SHA-1 of the sorted JSON, truncated."""
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


class NonFiniteLoss(RuntimeError):
    """Raised when a loss term is NaN or inf; the run folder keeps the last good checkpoint."""


def apply_lora(model, cfg: RunConfig, backbone: Backbone):
    """Wrap with peft LoRA; the special-token embedding rows stay trainable."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str)
                      else list(cfg.lora.target_modules),
                      trainable_token_indices=sorted({backbone.bot_id, backbone.eot_id, backbone.latent_id,
                                                      backbone.pad_id}),
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def build_student(cfg: RunConfig, device=None, use_stage0: bool = True) -> tuple[Student, Backbone]:
    """Backbone (stage-0 checkpoint for from-scratch presets), LoRA if configured, projection.

    ``use_stage0=False`` starts from the plain backbone: enough when a full fine-tuning checkpoint will
    overwrite every weight anyway."""
    spec = str(ensure_stage0(cfg)) if cfg.stage0_steps > 0 and use_stage0 else cfg.backbone
    backbone = load_backbone(spec, tiny=cfg.tiny)
    model = backbone.model
    if cfg.lora.enabled:
        model = apply_lora(model, cfg, backbone)
    model.train()
    latent = cfg.latent if cfg.uses_latents else replace(cfg.latent, projection=False)
    torch.manual_seed(cfg.seed)  # the projection's init depends on the seed alone, not on what ran before
    student = Student(model, latent, eos_id=backbone.eos_id, eot_id=backbone.eot_id)
    if device is not None:
        student.to(device)
    return student, backbone


def load_train_examples(cfg: RunConfig):
    from .loaders import load_examples

    traces = ("equation", "nl") if cfg.data.trace == "both" else (cfg.data.trace,)
    out = []
    for trace in traces:
        out += load_examples(cfg.data.train, split=cfg.data.train_split, trace=trace, limit=cfg.data.train_limit)
    return out


def package_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "datasets", "kava_lab"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    versions["cpu"] = _cpu_model()  # another CPU can mean other float kernels, so other weights from one config
    return versions


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# ------------------------------------------------------------------------------------------ checkpoints

def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, module: nn.Module, optimizer, scheduler, step: int) -> None:
    """Write ``checkpoint/`` atomically: a temp folder, then two renames (old kept until the new is in place)."""
    from safetensors.torch import save_file

    final, tmp, old = run_dir / "checkpoint", run_dir / f"checkpoint.tmp-{os.getpid()}", run_dir / "checkpoint.old"
    state = trainable_state(module)
    bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteLoss(f"refusing to save step {step} to {run_dir}: non-finite weights in {bad[:3]}; the "
                            "last good checkpoint is kept")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(state, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / "state.pt")
        (tmp / "step.json").write_text(json.dumps({"step": step}))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(run_dir).free if run_dir.exists() else 0
        raise OSError(f"could not write the step-{step} checkpoint to {run_dir} ({exc}); {free / 2**20:.0f} MiB "
                      "free on that disk: is it full? The previous checkpoint is untouched") from exc
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_path(run_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a crash between the two renames
        if (run_dir / name / "step.json").exists():
            return run_dir / name
    return None


def load_trainable(module: nn.Module, ckpt: Path) -> None:
    from safetensors.torch import load_file

    path = ckpt / "trainable.safetensors"
    try:
        saved = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or garbage files
        raise ValueError(f"{path}: unreadable checkpoint weights ({exc}); the file is truncated or corrupt") from exc
    bad = [name for name, t in saved.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: non-finite values in {bad[:3]}: this checkpoint is corrupt")
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise ValueError(f"{ckpt}: checkpoint does not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].dtype))


# ------------------------------------------------------------------------------------------------ stage 0

def stage0_config(cfg: RunConfig) -> RunConfig:
    """CoT training of the from-scratch backbone on both trace styles: the shared starting point.

    Never length-grouped: on both trace styles, grouping by length puts equation and NL traces in different
    batches, and the tiny stage 0 trained so decodes 28.0% of its CoTs against 92.0%
    (results/tiny-stage0-gbl-cot.json); a run's ``optim.group_by_length`` applies to its own training only."""
    from .config import with_method

    optim = replace(cfg.optim, steps=cfg.stage0_steps, lr=cfg.stage0_lr or cfg.optim.lr, group_by_length=False)
    limit = cfg.data.train_limit if cfg.data.stage0_train_limit is None else cfg.data.stage0_train_limit
    data = replace(cfg.data, trace="both", train_limit=limit, stage0_train_limit=None)
    base = replace(cfg, stage0_steps=0, stage0_lr=None, seed=0, data=data,
                   optim=optim, compress=type(cfg.compress)(),
                   loss=type(cfg.loss)(), latent=type(cfg.latent)(),
                   curriculum=type(cfg.curriculum)())
    return with_method(replace(base, method="cot"), "cot")


def stage0_dir(cfg: RunConfig) -> Path:
    from .config import non_default

    s0 = stage0_config(cfg)
    # The same weights with or without compilation, and for any split of the effective batch into processes or
    # micro-batches (a layout, not the maths): a 2-process run finds the 1-process run's stage 0.
    s0 = replace(s0, optim=replace(s0.optim, compile=False, batch_size=s0.optim.effective_batch))
    # Only fields that differ from their defaults: adding a defaulted config field keeps every cache key.
    key = {k: v for k, v in non_default(s0).items() if k not in ("method", "preset", "log_every", "save_every",
                                                                  "max_new_tokens")}
    if s0.data.train == "synthetic" or s0.data.train.startswith("synthetic:"):  # "synthetic:5-8:alternate" too
        from .synthetic import VERSION

        key["synthetic_version"] = VERSION
    return cache_dir() / f"stage0-{config_hash(key, 12)}"


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """The first 12 hex digits of the sha256 over a saved model's ``*.safetensors`` files (None when there are
    none): which build of a model a result came from. A cached stage 0 rebuilt on another machine is not the
    same model (the tiny stage 0 scored 92.0% CoT on one build and 78.3% on a rebuild, same code and config),
    so results to be compared must share a fingerprint, not just a cache key."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def ensure_stage0(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """Train (or reuse, or resume) the cached stage-0 backbone; returns the saved model folder."""
    folder = stage0_dir(cfg)
    model_dir = folder / "model"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if (model_dir / "config.json").exists():
            return model_dir
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would wait here for the one training it
            raise RuntimeError(f"stage 0 for this config is not built yet ({folder}); build it in one process first "
                               "(e.g. run the same command without torchrun/accelerate launch, or "
                               "scripts/experiment.py --procs N, which does), then launch the processes")
        from .train import train  # training proper lives in train.py

        s0 = stage0_config(cfg)
        log(f"stage 0: training the {cfg.backbone} backbone with CoT for {s0.optim.steps} steps -> {folder}")
        student, backbone = build_student(s0)
        train(s0, folder / "run", resume="auto", student_backbone=(student, backbone), log=log, progress=progress)
        tmp = folder / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        student.model.save_pretrained(tmp)
        backbone.tokenizer.save_pretrained(tmp)
        tmp.rename(model_dir)
    return model_dir


def target_teacher(cfg: RunConfig, student: Student):
    """The model whose compressed CoT cache the run's KV loss aimed at, for oracles and probes: the student's
    own model (the shared teacher, the paper), or for ``loss.teacher=frozen`` the model as training started
    (the stage-0 checkpoint or the backbone, rebuilt; a fresh LoRA adapter starts as the identity)."""
    if cfg.loss.teacher != "frozen" or not cfg.uses_latents:
        return student.model
    device = next(student.model.parameters()).device
    return build_student(cfg, device=device)[0].model.eval().requires_grad_(False)


def load_run(run_dir: str | Path, device=None) -> tuple[Student, Backbone, RunConfig]:
    """Rebuild a trained student from its run folder (config + checkpoint) for evaluation or probing."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no config.json")
    cfg = RunConfig.load(run_dir / "config.json")
    ckpt = checkpoint_path(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet")
    # A full fine-tuning checkpoint holds every weight, so the stage-0 cache is not needed (a run folder
    # copied to another machine loads without retraining stage 0); LoRA checkpoints need their base.
    student, backbone = build_student(cfg, device=device, use_stage0=cfg.lora.enabled)
    load_trainable(student, ckpt)
    student.eval()
    return student, backbone, cfg


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ------------------------------------------------------------------------ short demo runs for notebooks

def demo_config(method: str = "kava", small: bool | None = None, steps: int | None = None,
                stage0_steps: int | None = None, trace: str | None = None,
                train_limit: int | None = None) -> RunConfig:
    """The config of a short tiny run for notebooks called without a run folder.

    Default: the tiny preset with ``steps=100`` of ``method``. Its stage 0 (CoT pretraining of the
    from-scratch backbone) is the preset's own when that is already in the cache (no cost: data and batch
    are left as the preset has them, since the stage-0 cache key includes them), else a short one of
    ``stage0_steps=200``. Small mode (``KAVA_LAB_SMALL=1``): 20 stage-0 steps + 20 steps of batch 8 on 500
    problems, a smoke test whose latents carry little.
    """
    from .config import get_preset

    small = small_mode() if small is None else small
    cfg = get_preset("tiny", method, trace=trace)
    steps = steps if steps is not None else (20 if small else 100)
    optim = replace(cfg.optim, steps=steps)
    data = cfg.data
    if small:
        optim = replace(optim, batch_size=8, effective_batch=8)
        data = replace(data, train_limit=500)
    if train_limit is not None:
        data = replace(data, train_limit=train_limit)
    cfg = replace(cfg, log_every=10, save_every=max(steps, 1), data=data, optim=optim)
    if stage0_steps is None:
        full_cached = (stage0_dir(cfg) / "model" / "config.json").exists()
        stage0_steps = 20 if small else (cfg.stage0_steps if full_cached else 200)
    return replace(cfg, stage0_steps=stage0_steps)


def _finished_steps(run_dir: Path) -> int | None:
    """The step of ``run_dir``'s last checkpoint, or None when it has no config or checkpoint."""
    ckpt = checkpoint_path(run_dir) if (run_dir / "config.json").exists() else None
    return None if ckpt is None else json.loads((ckpt / "step.json").read_text())["step"]


def demo_run(method: str = "kava", small: bool | None = None, log: Callable[[str], None] = print,
             root: str | Path | None = None, reuse=(), **overrides) -> Path:
    """A run folder to probe when none is given: the first of ``reuse`` that holds a finished latent run
    (e.g. notebook 03's ``runs/03/run``), else a short tiny run trained (or reused, or resumed) in
    ``<cache>/probe-demo/<method>-<digest>`` (or under ``root``). ``overrides`` go to :func:`demo_config`.
    Says which through ``log``."""
    from . import synthetic
    from .train import train  # train imports this module

    for candidate in map(Path, reuse):
        step = _finished_steps(candidate)
        c = RunConfig.load(candidate / "config.json") if step is not None else None
        if c is not None and c.uses_latents and step >= c.optim.steps:
            log(f"reusing the finished {c.method} run {candidate.resolve()} ({c.optim.steps} steps, stage 0: "
                f"{c.stage0_steps} steps)")
            return candidate
    cfg = demo_config(method, small=small, **overrides)
    key = {**cfg.to_dict(), "synthetic_version": getattr(synthetic, "VERSION", None)}  # never reuse stale data
    folder = Path(root) if root is not None else cache_dir() / "probe-demo"
    run_dir = folder / f"{method}-{config_hash(key, 10)}"
    step = _finished_steps(run_dir)
    if step is not None and step >= cfg.optim.steps and RunConfig.load(run_dir / "config.json") == cfg:
        log(f"reusing the cached {method} demo run {run_dir} ({cfg.optim.steps} steps, stage 0: "
            f"{cfg.stage0_steps} steps)")
        return run_dir
    log(f"training a short {method} demo run into {run_dir}: stage 0 {cfg.stage0_steps} steps (cached when "
        f"already built), then {cfg.optim.steps} steps on {cfg.data.train_limit} problems")
    return train(cfg, run_dir, resume="auto", log=log)
