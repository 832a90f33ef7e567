"""Training and evaluation throughput on the tiny preset, with a step-time breakdown.

    python benchmarks/bench_train.py [--task synthetic:3-6] [--steps 8] [--threads 1] [--quick] [--compile]

For every method, the median time of one optimizer step (batch 32) and its split into teacher forward,
compression, latent loop, answer pass, backward and optimizer; tokens/s (teacher + student tokens); the
KaVa step over the PCCoT step (the cost of the KV objective). Then, for the KaVa step, each against its
baseline with steps alternating in one process (machine load hits both alike): the student's prefill on the
teacher's question columns vs re-encoding the question; length-grouped batches (``optim.group_by_length``)
vs the plain draw; with ``--compile``, ``optim.compile`` vs eager. Then the KaVa step against this CPU: the
matmuls' FLOPs and time (each shape replayed outside the profiler), what they would take at the rate of one large
fp32 matmul on the same threads, and the attention kernels' time; what is left is elementwise work, copies,
autograd and Python. Last, evaluation questions/s for cot and kava. The backbone is the randomly initialised
tiny model (no stage 0 needed): timings do not depend on the weights, except generation lengths (cot runs to
its token budget). Figures are medians over repeated steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kava_lab.train as T  # noqa: E402
from kava_lab.config import apply_overrides, get_preset  # noqa: E402
from kava_lab.encoding import Collator  # noqa: E402
from kava_lab.student import Student  # noqa: E402

PARTS = ("teacher", "compress", "latent_loop", "answer", "backward", "optimizer")


@contextmanager
def timed_parts(times: dict):
    """Wrap the objective's pieces with timers (benchmark only; restored on exit)."""
    originals = (T.extract_teacher, T.compress_extraction, Student.latent_loop, Student.forward)

    def clock(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] += time.perf_counter() - t0
        return wrapper

    T.extract_teacher = clock("teacher", originals[0])
    T.compress_extraction = clock("compress", originals[1])
    Student.latent_loop = clock("latent_loop", originals[2])
    Student.forward = clock("student", originals[3])
    try:
        yield
    finally:
        T.extract_teacher, T.compress_extraction, Student.latent_loop, Student.forward = originals


def build(method: str, task: str | None):
    overrides = ["stage0_steps=0", "data.train_limit=2048"]
    if task:
        overrides += [f"data.train={task}", f"data.eval={task}"]
    cfg = apply_overrides(get_preset("tiny", method, trace="nl"), overrides)
    student, backbone = T.build_student(cfg)
    items = T.encode_all(T.load_train_examples(cfg), backbone.tokenizer, cfg)
    objective = T.KaVaObjective(student, cfg)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4)
    return cfg, student, backbone, items, objective, optimizer


def one_step(cfg, backbone, items, objective, optimizer, i: int, times: dict, share: bool = True,
             grouped: bool = False) -> int:
    """Training step ``i`` on the batch training draws at that step (length-grouped when ``grouped``)."""
    collate = Collator.for_backbone(backbone)
    lengths = tuple(it.teacher_len for it in items) if grouped else None
    chunk = [items[k] for k in T._batch_indices(len(items), 0, i, cfg.optim.batch_size, 1, 0, lengths)]
    tb = collate(chunk, "teacher")
    sb = collate(chunk, "student", M=cfg.latent.M) if cfg.uses_latents else None
    tokens = int(tb.attention_mask.sum()) + (int(sb.attention_mask.sum()) if sb is not None else 0)
    original = T.question_columns
    if not share:
        T.question_columns = lambda *a: None
    try:
        t0 = time.perf_counter()
        terms = objective(tb, sb)
        times["forward"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        terms["loss"].backward()
        times["backward"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["optimizer"] += time.perf_counter() - t0
    finally:
        T.question_columns = original
    return tokens


def bench_method(method, task, steps, warmup=2):
    cfg, student, backbone, items, objective, optimizer = build(method, task)
    for i in range(warmup):
        one_step(cfg, backbone, items, objective, optimizer, i, defaultdict(float))
    rows = []
    for i in range(steps):
        times = defaultdict(float)
        with timed_parts(times):
            t0 = time.perf_counter()
            tokens = one_step(cfg, backbone, items, objective, optimizer, warmup + i, times)
            total = time.perf_counter() - t0
        parts = {"teacher": times["teacher"] if cfg.uses_latents else times["forward"],
                 "compress": times["compress"], "latent_loop": times["latent_loop"],
                 "answer": times["student"] - times["latent_loop"], "backward": times["backward"],
                 "optimizer": times["optimizer"]}
        rows.append({"total": total, "tokens": tokens, **parts})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    med["tokens_per_s"] = statistics.median(r["tokens"] / r["total"] for r in rows)
    return med, (cfg, student, backbone, items, objective, optimizer)


def bench_sharing(built, steps):
    cfg, student, backbone, items, objective, optimizer = built
    on, off = [], []
    for i in range(steps):  # alternate, so load changes hit both
        for share, out in ((True, on), (False, off)):
            t0 = time.perf_counter()
            one_step(cfg, backbone, items, objective, optimizer, i, defaultdict(float), share=share)
            out.append(time.perf_counter() - t0)
    return statistics.median(on), statistics.median(off)


def bench_compile(task, steps, warmup=3):
    """The KaVa step with optim.compile (each layer's MLP and norms compiled) against eager: two copies of the
    same run, steps alternating, so machine load hits both alike. Returns (compiled s, eager s, compile s)."""
    from kava_lab.backbone import compile_blocks

    eager = build("kava", task)
    compiled = build("kava", task)
    compile_blocks(compiled[1].model)

    def step(built, i):
        cfg, _student, backbone, items, objective, optimizer = built
        t0 = time.perf_counter()
        one_step(cfg, backbone, items, objective, optimizer, i, defaultdict(float))
        return time.perf_counter() - t0

    compile_s = sum(step(compiled, i) for i in range(warmup))  # the first calls compile (dynamic shapes)
    on, off = [], []
    for i in range(warmup, warmup + steps):
        on.append(step(compiled, i))
        off.append(step(eager, i))
    return statistics.median(on), statistics.median(off), compile_s


def bench_grouping(built, steps):
    """KaVa tokens/s with optim.group_by_length against the plain draw: same model, steps alternating."""
    cfg, student, backbone, items, objective, optimizer = built
    on, off = [], []
    for i in range(steps):
        for grouped, out in ((True, on), (False, off)):
            t0 = time.perf_counter()
            tokens = one_step(cfg, backbone, items, objective, optimizer, i, defaultdict(float), grouped=grouped)
            out.append(tokens / (time.perf_counter() - t0))
    return statistics.median(on), statistics.median(off)


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def sgemm_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of one large fp32 matmul ``[n, n] @ [n, n]`` on the current threads: what this CPU can do."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _replay_seconds(key: str, shapes: list) -> float:
    """Seconds one call of matmul ``key`` on inputs of ``shapes`` takes outside the profiler (median of 5)."""
    if key == "aten::addmm":
        shapes = shapes[1:3]
    a, b = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    op = torch.bmm if key == "aten::bmm" else torch.mm
    op(a, b)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        op(a, b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_roofline(built, steps: int) -> dict:
    """Where a KaVa step's time goes against what the CPU can do, per step: the matmuls' FLOPs (torch's profiler
    counts them from the shapes) and their time, each recorded shape replayed outside the profiler (the
    profiler's per-op cost would inflate it), and the attention kernels' time under the profiler (few, long
    calls). The rest of the step is elementwise work, copies, autograd bookkeeping and Python."""
    from torch.profiler import ProfilerActivity, profile

    cfg, _student, backbone, items, objective, optimizer = built
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        for i in range(steps):
            one_step(cfg, backbone, items, objective, optimizer, 1000 + i, defaultdict(float))
    flops = mm = attention = 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key in MATMULS:
            flops += evt.flops
            mm += evt.count * _replay_seconds(evt.key, evt.input_shapes)
        elif "scaled_dot_product" in evt.key:
            attention += evt.self_cpu_time_total / 1e6
    return {"matmul_flops": flops / steps, "matmul": mm / steps, "attention": attention / steps}


def bench_eval(method, task, n):
    from kava_lab.evaluate import evaluate
    from kava_lab.loaders import load_examples

    cfg, student, backbone, *_ = build(method, task)
    examples = load_examples(cfg.data.eval, split="val", trace=cfg.data.trace, limit=n)
    t0 = time.perf_counter()
    summary = evaluate(student, backbone, cfg, examples, batch_size=64)
    seconds = time.perf_counter() - t0
    return n / seconds, summary["forward_passes"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=None, help="synthetic task, e.g. synthetic:3-6 (default: the preset's)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-n", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also time the KaVa step with optim.compile")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, kava and pccot only")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 2 if args.quick else args.steps
    methods = ("pccot", "kava") if args.quick else ("cot", "nocot", "codi", "pccot", "kava")
    print(f"tiny preset, random backbone, task={args.task or 'preset'}, batch 32, {steps} timed steps per method, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':>7} {'step s':>7} {'tok/s':>7}  " + " ".join(f"{p:>11}" for p in PARTS))
    results = {}
    for method in methods:
        med, built = bench_method(method, args.task, steps)
        results[method] = (med, built)
        print(f"{method:>7} {med['total']:7.3f} {med['tokens_per_s']:7.0f}  "
              + " ".join(f"{med[p]:11.3f}" for p in PARTS), flush=True)
    ratio = results["kava"][0]["total"] / results["pccot"][0]["total"]
    print(f"KaVa step / PCCoT step: {ratio:.2f} (the cost of the KV objective; goal <= 1.15)")
    on, off = bench_sharing(results["kava"][1], steps)
    print(f"KaVa step, student prefill on the teacher's question columns: {on:.3f} s; re-encoding the question: "
          f"{off:.3f} s; speed-up {off / on:.2f}x")
    on, off = bench_grouping(results["kava"][1], steps)
    print(f"KaVa tokens/s with optim.group_by_length: {on:.0f}; random batches: {off:.0f}; speed-up {on / off:.2f}x "
          "(padding removed; the tokens counted are real ones)")
    if args.compile:
        on, off, compile_s = bench_compile(args.task, steps)
        print(f"KaVa step with optim.compile: {on:.3f} s; eager: {off:.3f} s; speed-up {off / on:.2f}x after "
              f"{compile_s:.0f} s of warm-up steps (compilation)")
    r, step_s = bench_roofline(results["kava"][1], steps), results["kava"][0]["total"]
    peak = sgemm_peak()
    rest = step_s - r["matmul"] - r["attention"]
    print(f"KaVa step ({step_s:.3f} s) against this CPU: matmuls {r['matmul_flops'] / 1e9:.1f} GFLOP in "
          f"{r['matmul']:.3f} s ({r['matmul_flops'] / r['matmul'] / 1e9:.0f} GFLOP/s; one 2048^3 fp32 matmul on "
          f"these threads: {peak / 1e9:.0f} GFLOP/s, at which they would take {r['matmul_flops'] / peak:.3f} s), "
          f"attention kernels {r['attention']:.3f} s, the rest (elementwise, copies, autograd, Python) {rest:.3f} s")
    for method in ("cot", "kava") if not args.quick else ("kava",):
        qps, passes = bench_eval(method, args.task, 16 if args.quick else args.eval_n)
        print(f"evaluation {method}: {qps:.1f} questions/s ({passes:.1f} forward passes per question)")


if __name__ == "__main__":
    main()
