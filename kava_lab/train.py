"""The training loop, readable top to bottom: one objective, five methods, on ``accelerate``.

One CPU or GPU by default; ``accelerate launch --num_processes N -m kava_lab.cli train ...`` (GPUs) or
``torchrun --nproc_per_node N -m kava_lab.cli train ...`` (CPU processes over gloo) runs several processes with
no code change: each takes its slice of every global batch, so N processes with accumulation A see the same
examples per step as one process with accumulation N x A. bf16 autocast on CUDA, gradient accumulation to an effective batch, AdamW with warmup and
cosine decay, gradient clipping, LoRA through peft for pretrained backbones (special-token rows
trainable), full fine-tuning for the tiny preset.

A run folder holds ``config.json``, ``versions.json`` (packages, threads, processes), ``metrics.jsonl``
(every loss term, lr, tokens/s, step time) and ``checkpoint/`` (trainable weights, optimizer, scheduler,
RNG states, step), written atomically. ``train(cfg, out, resume=True)`` continues a run exactly. A
non-finite loss stops the run naming the step and the term, keeping the last good checkpoint; any other
crash also leaves one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .compress import compress_extraction, compressor_from_config, extraction_importance
from .config import RunConfig
from .encoding import Collator, Encoded, encode
from .losses import codi_loss, full_mask, importance_weights, kava_objective, kv_content_floor, kv_loss
from .step_loss import step_decoding_loss
from .runs import (  # noqa: F401  (re-exported: run folders live in runs.py)
    NonFiniteLoss, _set_rng_state, apply_lora, build_student, checkpoint_path, ensure_stage0, load_run,
    load_trainable, load_train_examples, package_versions, read_metrics, save_checkpoint, stage0_config, stage0_dir,
    trainable_state,
)
from .student import Student, fork_cache
from .teacher import extract_teacher


# ------------------------------------------------------------------------------------------ the objective

def make_compressor(cfg: RunConfig):
    """The run's compressor (:func:`kava_lab.compress.compressor_from_config` of ``cfg.compress``)."""
    return compressor_from_config(cfg.compress)


def pre_rope_keys(model, student_keys, teacher_keys, indices, student_batch, teacher_batch):
    """Rotate student latent keys and kept teacher keys ``[B, L, H, M, d]`` back to position 0.

    Student slot ``j`` sits at ``position_ids[:, P + j]``; a kept teacher entry at CoT index ``i`` (``indices``
    ``[B, L, H, M]``) at the teacher's ``position_ids[:, P_t + i]``. A model without rotary embeddings is
    returned unchanged."""
    from .intervene import kept_positions, rotary_module, rotate_keys

    rotary = rotary_module(model)
    if rotary is None:
        return student_keys, teacher_keys
    P, M = student_batch.P, student_batch.M
    s_pos = student_batch.position_ids[:, P:P + M]  # [B, M]
    t_pos = kept_positions(indices, teacher_batch)  # [B, L, H, M]
    return rotate_keys(student_keys, -s_pos, rotary), rotate_keys(teacher_keys.detach(), -t_pos, rotary)


def question_columns(cache, teacher_batch, student_batch):
    """The teacher cache cropped to the question, for the student's prefill; None when the layouts differ.

    Both batches left-pad their prefix, so every question sits in columns ``[0, P_t)`` of the teacher batch
    and ``[0, P_s - 1)`` of the student batch (``<bot>`` follows it): the same columns when
    ``P_s == P_t + 1`` and the rows hold the same examples."""
    if cache is None or student_batch.P != teacher_batch.P + 1 or len(student_batch) != len(teacher_batch):
        return None
    if not torch.equal(student_batch.input_ids[:, :teacher_batch.P], teacher_batch.input_ids[:, :teacher_batch.P]):
        return None
    question = fork_cache(cache)
    question.crop(-(question.get_seq_length() - teacher_batch.P))
    return question


class KaVaObjective(nn.Module):
    """One training step's forward: teacher CE (+ signals), compression, student, all loss terms."""

    def __init__(self, student: Student, cfg: RunConfig):
        super().__init__()
        self.student = student
        self.cfg = cfg
        for name in ("a_target", "a_tf", "a_direct"):
            weight = getattr(cfg.loss, name)
            if weight < 0 or (weight and not cfg.uses_latents):
                raise ValueError(f"loss.{name} must be >= 0 and needs a latent method, found {weight} with "
                                 f"method {cfg.method!r}")
        layers = student.model.config.num_hidden_layers
        if not 0 <= cfg.loss.kv_from_layer < layers:
            raise ValueError(f"loss.kv_from_layer must be in [0, {layers - 1}] (the model has {layers} layers), "
                             f"found {cfg.loss.kv_from_layer}")
        # the compressed target feeds the KV term (a2), the read-out loss (a_target) and the forced pass (a_tf)
        self.compressor = make_compressor(cfg) if max(cfg.loss.a2, cfg.loss.a_target, cfg.loss.a_tf) > 0 else None
        if cfg.loss.teacher not in ("shared", "frozen"):
            raise ValueError(f"loss.teacher must be 'shared' or 'frozen', found {cfg.loss.teacher!r}")
        # a submodule (devices follow it) whose weights require no grad, so the optimizer never sees them
        self.frozen_teacher = (copy.deepcopy(student.model).eval().requires_grad_(False)
                               if cfg.loss.teacher == "frozen" and cfg.uses_latents else None)
        if cfg.loss.answer_after < 0 or (cfg.loss.answer_after and not cfg.uses_latents):
            raise ValueError(f"loss.answer_after must be >= 0 and needs a latent method, found "
                             f"{cfg.loss.answer_after} with method {cfg.method!r}")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_teacher is not None:
            self.frozen_teacher.eval()
        return self

    def forward(self, teacher_batch, student_batch=None, step: int | None = None) -> dict[str, torch.Tensor]:
        """``step``: the 0-based optimizer step (for ``loss.answer_after``; None: past any warm-up)."""
        cfg, model = self.cfg, self.student.model
        if not cfg.uses_latents:  # cot / nocot: plain next-token CE in teacher mode
            out = model(input_ids=teacher_batch.input_ids, attention_mask=teacher_batch.attention_mask,
                        position_ids=teacher_batch.position_ids, labels=teacher_batch.labels)
            return kava_objective(cfg.loss, out.loss)
        # loss.teacher_weight=0 or a frozen teacher: nothing trains through the teacher pass (its signals are
        # detached), so it runs without a graph and the student re-encodes its question: no teacher backward
        graph = cfg.loss.teacher_weight != 0 and self.frozen_teacher is None
        teacher_model = model if self.frozen_teacher is None else self.frozen_teacher
        teacher = extract_teacher(teacher_model, teacher_batch, with_grad=graph, keep_cache=graph, with_logits=False)
        student = self.student(student_batch, question_cache=question_columns(teacher.cache, teacher_batch,
                                                                               student_batch))
        teacher.cache = None
        codi = (codi_loss(student.anchor_hidden, teacher.anchor_hidden, cfg.loss.codi_norm)
                if cfg.loss.a1 > 0 else None)
        kv = target_ce = kv_tf = None
        if self.compressor is not None:
            kv_source = teacher
            if student_batch.cot_latent_len is not None:  # curriculum: only the replaced steps are a target
                n = teacher.cot_mask.shape[1]
                covered = torch.arange(n, device=teacher.cot_mask.device)[None] < student_batch.cot_latent_len[:, None]
                kv_source = dataclasses.replace(teacher, cot_mask=teacher.cot_mask & covered)
            with torch.no_grad():
                target = compress_extraction(kv_source, self.compressor, student_batch.M, order=cfg.compress.order,
                                             scope=cfg.compress.scope)
            if cfg.loss.a2 > 0:
                kv, kv_floor = self._kv_terms(student.latent_keys, student.latent_values, target, kv_source,
                                              student_batch, teacher_batch)
            if cfg.loss.a_tf > 0:
                kv_tf = self._forced_kv(student, target, kv_source, student_batch, teacher_batch)
            if cfg.loss.a_target > 0:
                target_ce = self._target_ce(student, target, student_batch, teacher_batch)
        step_ce = (step_decoding_loss(model, student.latents, teacher_batch, student_batch.cot_latent_len)
                   if cfg.loss.a_step > 0 else None)
        # loss.a_direct: the answer read from [question, <bot>] alone (a fork: the latent cache stays as it is)
        direct_ce = (self.student.answer(student_batch, fork_cache(student.latent_cache), hide_latents=True)[0]
                     if cfg.loss.a_direct > 0 else None)
        warm = step is not None and step < cfg.loss.answer_after  # KV/CODI warm-up: the answer CE trains nothing
        terms = kava_objective(cfg.loss, teacher.ce, student.ce, codi, kv, step_ce,
                               answer_weight=0.0 if warm else 1.0, target_ce=target_ce, kv_tf=kv_tf,
                               direct_ce=direct_ce)
        if kv is not None:
            terms["kv_floor"] = kv_floor  # diagnostic only: not in the loss (losses.kv_content_floor)
        return terms

    def _kv_terms(self, s_keys, s_values, target, kv_source, student_batch, teacher_batch):
        """The KV loss ``[]`` between latent K/V ``s_keys`` / ``s_values`` ``[B, L, H, M, d]`` and ``target``, and
        its content-free floor."""
        cfg, model = self.cfg, self.student.model
        t_keys = target.keys
        if cfg.loss.kv_keys == "pre_rope":
            s_keys, t_keys = pre_rope_keys(model, s_keys, t_keys, target.indices, student_batch, teacher_batch)
        elif cfg.loss.kv_keys != "post_rope":
            raise ValueError(f"loss.kv_keys must be 'post_rope' or 'pre_rope', found {cfg.loss.kv_keys!r}")
        weights = None
        if cfg.loss.kv_weight == "importance":  # the entries the teacher's answer reads dominate
            with torch.no_grad():
                weights = importance_weights(extraction_importance(kv_source), target.indices, target.slot_mask)
        elif cfg.loss.kv_weight != "uniform":
            raise ValueError(f"loss.kv_weight must be 'uniform' or 'importance', found {cfg.loss.kv_weight!r}")
        t_values, mask = target.values, target.slot_mask
        lo = cfg.loss.kv_from_layer
        if lo:  # compare layers lo.. only ([B, L, H, M(, d)] tensors sliced on L)
            mask = full_mask(mask, t_keys)[:, lo:]
            s_keys, s_values, t_keys, t_values = s_keys[:, lo:], s_values[:, lo:], t_keys[:, lo:], t_values[:, lo:]
            weights = None if weights is None else weights[:, lo:]
        kv = kv_loss(s_keys, s_values, t_keys, t_values, mask,
                     kind=cfg.loss.kv_loss, layer_std=cfg.loss.layer_std, weights=weights)
        return kv, kv_content_floor(t_keys, t_values, mask, kind=cfg.loss.kv_loss,
                                    layer_std=cfg.loss.layer_std, weights=weights)

    def _forced_kv(self, student, target, kv_source, student_batch, teacher_batch) -> torch.Tensor:
        """``loss.a_tf``: the KV loss ``[]`` of a teacher-forced latent pass. The final latent inputs run once more
        over ``[question, <bot>, target in the M slots]`` (the ``target`` oracle's layout, detached), slot j
        reading the question, the target slots < j and itself (:meth:`Student.forced_pass`), so each slot learns
        to write its target from the true compressed past, as CoT training reads the true tokens before each
        position."""
        cache = self._target_cache(student, target, student_batch, teacher_batch)
        f_keys, f_values = self.student.forced_pass(student_batch, cache, student.latents)
        return self._kv_terms(f_keys, f_values, target, kv_source, student_batch, teacher_batch)[0]

    def _target_ce(self, student, target, student_batch, teacher_batch) -> torch.Tensor:
        """``loss.a_target``: the answer CE ``[]`` read from ``[question, <bot>, target in the M slots]`` (the
        ``target`` oracle's layout, :func:`kava_lab.intervene.target_in_slots`). The target is detached, so this
        trains how the answer pass reads latent slots (and the question columns it attends to)."""
        cache = self._target_cache(student, target, student_batch, teacher_batch)
        return self.student.answer(student_batch, cache)[0]

    def _target_cache(self, student, target, student_batch, teacher_batch):
        """A fork of the student's ``[question, <bot>, M latents]`` cache with the (detached) target in the slots,
        keys placed as the KV loss compares them (:func:`kava_lab.intervene.target_in_slots`)."""
        from .intervene import target_in_slots, write_latents

        keys, values = target_in_slots(self.student.model, student.latent_keys, student.latent_values, target,
                                       student_batch, teacher_batch, self.cfg.loss.kv_keys)
        cache = fork_cache(student.latent_cache)
        write_latents(cache, student_batch.P, student_batch.M, keys.detach(), values.detach())
        return cache


# ------------------------------------------------------------------------------------------------ data

def encode_all(examples, tokenizer, cfg: RunConfig) -> list[Encoded]:
    with_cot = cfg.method != "nocot"
    return [encode(e, tokenizer, cfg.encoding, with_cot=with_cot) for e in examples]


# -------------------------------------------------------------------------------------------- the loop

def _batch_indices(n: int, seed: int, global_micro: int, batch_size: int, world: int, rank: int,
                   lengths: tuple[int, ...] | None = None) -> list[int]:
    """Indices of one process's micro-batch: a deterministic stream of per-epoch permutations.

    With ``lengths`` (``optim.group_by_length``) the batches are drawn from :func:`_grouped_epoch` instead."""
    if lengths is not None and n >= batch_size:
        per_epoch = n // batch_size
        epoch, j = divmod(global_micro * world + rank, per_epoch)
        return _grouped_epoch(lengths, seed, epoch, batch_size)[j]
    start = (global_micro * world + rank) * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.extend(perm[offset:offset + batch_size - len(out)])
    return out


GROUP_WINDOW = 50  # batches per window sorted by length (as transformers' group_by_length mega-batches)


@functools.lru_cache(maxsize=2)
def _grouped_epoch(lengths: tuple[int, ...], seed: int, epoch: int, batch_size: int) -> list[list[int]]:
    """One epoch of length-grouped batches: a seeded permutation cut into windows of GROUP_WINDOW batches, each
    window sorted by sequence length and cut into batches, then all batches shuffled. Padding shrinks (on the
    tiny preset 36% of the teacher batch was padding) while every batch still mixes problems of one length
    band from anywhere in the data. ``len(lengths) % batch_size`` examples sit out each epoch, different ones
    every epoch."""
    n = len(lengths)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()[: n - n % batch_size]
    window = GROUP_WINDOW * batch_size
    ordered = []
    for w in range(0, len(perm), window):
        ordered.extend(sorted(perm[w:w + window], key=lambda i: lengths[i]))
    batches = [ordered[b:b + batch_size] for b in range(0, len(ordered), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def train(cfg: RunConfig, out_dir: str | Path, resume: bool | str = False,
          callback: Callable[[dict], None] | None = None, student_backbone=None,
          log: Callable[[str], None] = print, progress: bool = False) -> Path:
    """Train ``cfg`` into ``out_dir``; returns the run folder. ``callback(metrics)`` sees every logged step.

    ``resume``: False starts a new run (refused if the folder already holds a checkpoint, a config or metrics);
    True continues from the folder's checkpoint (refused if there is none); "auto" does either (caches).
    SIGTERM and SIGINT save the last completed step; a non-finite loss or gradient stops the run before the
    update, keeping the last good checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from transformers import get_cosine_schedule_with_warmup

    run_dir = Path(out_dir)
    if cfg.optim.steps < 1:
        raise ValueError(f"optim.steps must be at least 1, found {cfg.optim.steps}")
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', found {resume!r}")
    ckpt = checkpoint_path(run_dir) if run_dir.exists() else None
    if ckpt is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds a checkpoint; pass resume=True (--resume) to continue it "
                              "or choose another folder")
    leftovers = [p.name for p in (run_dir / "config.json", run_dir / "metrics.jsonl") if p.exists()]
    if ckpt is None and resume is True:
        raise FileNotFoundError(f"{run_dir}: nothing to resume, no checkpoint found (a checkpoint is written every "
                                f"{cfg.save_every} steps and on a crash){'; the folder holds ' + ', '.join(leftovers) if leftovers else ''}. "
                                "Train without --resume into a new folder")
    if ckpt is None and leftovers:
        raise FileExistsError(f"{run_dir} holds {', '.join(leftovers)} but no checkpoint: another run was started "
                              "here. Choose another folder, or delete this one to start again")
    for stale in run_dir.glob("checkpoint.tmp-*") if run_dir.exists() else ():
        shutil.rmtree(stale, ignore_errors=True)  # a save that died half-way; the real checkpoint is intact
    if ckpt is not None:
        saved = RunConfig.load(run_dir / "config.json")
        if saved != cfg:
            raise ValueError(f"{run_dir}/config.json differs from the requested config; resume with the saved one "
                             "(RunConfig.load) or choose another folder")
    run_dir.mkdir(parents=True, exist_ok=True)

    use_cuda = torch.cuda.is_available()
    # Several processes on a machine without CUDA (torchrun --nproc_per_node N): accelerate only sets up its
    # gloo process group (MULTI_CPU) when told cpu=True; otherwise every rank trains alone, as rank 0.
    multi_cpu = not use_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu, mixed_precision="bf16" if (use_cuda and cfg.optim.bf16) else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    world, rank = accelerator.num_processes, accelerator.process_index
    if not accelerator.is_main_process:
        log, progress = (lambda _s: None), False  # one voice: rank 0 logs, shows the bar, writes the files
    per_step = cfg.optim.batch_size * world
    if cfg.optim.effective_batch % per_step:
        raise ValueError(f"effective_batch={cfg.optim.effective_batch} is not a multiple of batch_size x processes "
                         f"= {per_step}")
    accum = cfg.optim.effective_batch // per_step

    if accelerator.is_main_process:
        cfg.save(run_dir / "config.json")
        # the thread count and processes too: the same config trained on 1 or 2 threads gives other weights
        # (float sums in another order), so a rebuilt stage 0 matches bit for bit only on the same layout
        versions = {**package_versions(), "torch_threads": torch.get_num_threads(), "processes": world}
        (run_dir / "versions.json").write_text(json.dumps(versions, indent=2))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    student, backbone = student_backbone or build_student(cfg)
    if cfg.optim.compile:
        from .backbone import compile_blocks

        log(f"torch.compile: {compile_blocks(student.model)} decoder-layer modules (compiled on first use)")
    examples = load_train_examples(cfg)
    if not examples:
        raise ValueError(f"no training examples: {cfg.data.train!r} split {cfg.data.train_split!r} is empty")
    items = encode_all(examples, backbone.tokenizer, cfg)
    collate = Collator.for_backbone(backbone)
    lengths = tuple(it.teacher_len for it in items) if cfg.optim.group_by_length else None
    objective = KaVaObjective(student, cfg)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.optim.warmup_ratio * cfg.optim.steps),
                                                cfg.optim.steps)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    start = 0
    if ckpt is not None:
        load_trainable(accelerator.unwrap_model(objective).student, ckpt)
        try:
            state = torch.load(ckpt / "state.pt", weights_only=False)
        except Exception as exc:
            raise ValueError(f"{ckpt / 'state.pt'}: unreadable optimizer/scheduler state ({exc}); the file is "
                             "truncated or corrupt") from exc
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = json.loads((ckpt / "step.json").read_text())["step"]
        if accelerator.is_main_process:  # drop metrics logged after the checkpoint: they will be redone
            kept = [r for r in read_metrics(run_dir) if r["step"] <= start]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        log(f"resuming {run_dir} at step {start}")
    log(f"training {cfg.method} ({cfg.preset}, trace={cfg.data.trace}, seed={cfg.seed}) for {cfg.optim.steps} "
        f"steps, {len(items)} examples, batch {cfg.optim.effective_batch} = {cfg.optim.batch_size} x {world} x {accum}")

    M = cfg.latent.M if cfg.uses_latents else 0
    metrics_file = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    completed, last_saved = start, start
    unwrapped = accelerator.unwrap_model(objective)
    previous_sigterm = _catch_sigterm()
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.optim.steps, initial=start, desc=f"{cfg.method} steps", unit="step", mininterval=2)
        if log is print:  # printed lines go above the bar, not through it; a caller's own log is kept
            log = bar.write
    try:
        for step in range(start, cfg.optim.steps):
            t0 = time.perf_counter()
            objective.train()
            sums: dict[str, float] = {}
            tokens = 0
            for micro in range(accum):
                idx = _batch_indices(len(items), cfg.seed, step * accum + micro, cfg.optim.batch_size, world, rank,
                                     lengths)
                chunk = [items[i] for i in idx]
                tb = collate(chunk, "teacher").to(accelerator.device)
                latent_steps = cfg.curriculum.latent_steps(step)
                sb = (collate(chunk, "student", M=M, latent_steps=latent_steps).to(accelerator.device)
                      if cfg.uses_latents else None)
                tokens += int(tb.attention_mask.sum()) + (int(sb.attention_mask.sum()) if sb is not None else 0)
                sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(objective)
                with sync:
                    terms = objective(tb, sb, step=step)
                    for name, value in terms.items():
                        if not torch.isfinite(value.detach()).all():
                            raise NonFiniteLoss(f"step {step + 1}: loss term '{name}' is {value.item()}")
                    accelerator.backward(terms["loss"] / accum)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.item() / accum
            if world > 1:  # log the mean over every process's micro-batches, as one process with accumulation does
                names = sorted(sums)
                reduced = accelerator.reduce(torch.tensor([sums[n] for n in names] + [float(tokens)],
                                                          device=accelerator.device), "mean").tolist()
                sums = dict(zip(names, reduced[:-1]))
                tokens = round(reduced[-1] * world)  # every process's real tokens, not rank 0's times world
            grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
            if not torch.isfinite(torch.as_tensor(grad_norm)).all():
                optimizer.zero_grad(set_to_none=True)  # the update is never applied
                raise NonFiniteLoss(f"step {step + 1}: gradient norm is {float(grad_norm)} with finite loss terms")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step + 1
            dt = time.perf_counter() - t0
            record = {"step": completed, **sums, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      **({"curriculum_stage": cfg.curriculum.latent_steps(step)} if cfg.curriculum.stages else {}),
                      "tokens_per_s": tokens / dt, "step_time_s": dt}
            if torch.cuda.is_available():
                record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
            if completed % cfg.log_every == 0 or completed == cfg.optim.steps:
                if callback is not None:
                    callback(record)
                else:
                    log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if completed % cfg.save_every == 0 or completed == cfg.optim.steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(run_dir, unwrapped.student, optimizer, scheduler, completed)
                last_saved = completed
    except BaseException as exc:
        # The model and optimizer hold the state after `completed` steps (the failing step never updated
        # them): save it so the run can be resumed, unless that step is already saved.
        if accelerator.is_main_process and completed > last_saved:
            try:
                save_checkpoint(run_dir, unwrapped.student, optimizer, scheduler, completed)
            except NonFiniteLoss as refused:  # never replace a good checkpoint with non-finite weights
                log(str(refused))
                completed = last_saved
        if isinstance(exc, NonFiniteLoss):
            raise NonFiniteLoss(f"{exc}; stopped. The last good checkpoint (step {completed}) is in "
                                f"{run_dir / 'checkpoint'}") from None
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if bar is not None:
            bar.close()
    return run_dir


def torchrun_command(nproc: int) -> list[str]:
    """The command that starts ``nproc`` processes on this machine (torchrun on a free local port); append the
    script and its arguments. Each process finds its rank in the environment and ``train`` joins them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


class Terminated(BaseException):
    """SIGTERM (what schedulers send) arrived: the loop saves its last completed step, then stops."""


def _catch_sigterm():
    """Turn SIGTERM into :class:`Terminated` in the main thread; returns the previous handler (or None)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated(f"SIGTERM received (signal {signum}); the last completed step is saved")

    return signal.signal(signal.SIGTERM, handler)
