"""Benchmark kava_lab.compress: vectorised R-KV vs a per-example/per-head loop, scaling in N, and the cost of
compression next to one teacher forward pass.

    python benchmarks/bench_compress.py                 # SmolLM2-135M-shaped batch, then the real models
    python benchmarks/bench_compress.py --skip-models   # compression only
    python benchmarks/bench_compress.py --device cuda

A script, not a test. Prints one table per part:

1. time per batch (whole extraction, all layers: score + select + gather) of ``compress_extraction`` and of
   a plain Python loop over examples, layers and KV heads that forms the full N x N cosine matrix, at N and
   at 10x N (the loop is timed on a subset of examples there and scaled, as it says);
   target: 10x the tokens costs at most 15x the time for the vectorised path;
2. the largest intermediate tensor of the vectorised path (recorded op by op with a dispatch mode), and
   peak CUDA memory on CUDA;
3. compression time as a fraction of one plain teacher forward (``model(input_ids, attention_mask)`` under
   ``torch.no_grad()``) on a random-token batch of B x (question + N + answer) tokens, for the tiny preset
   and SmolLM2-135M; target < 5% for SmolLM2. Skipped with a printed reason when the backbone module or a
   model is unavailable.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kava_lab.compress import compress_extraction, get_compressor


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------


def make_ext(b, n_layers, h_kv, h_q, n, a, d, dtype, device, seed=0):
    """A random teacher-shaped extraction with padded CoTs (lengths in [n/2, n], the longest exactly n)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, n // 2), n + 1, (b,), generator=g)
    lens[0] = n
    alens = torch.randint(max(1, a // 2), a + 1, (b,), generator=g)
    alens[0] = a
    ext = SimpleNamespace(
        cot_keys=torch.randn(b, n_layers, h_kv, n, d, generator=g, dtype=torch.float32).to(dtype),
        cot_values=torch.randn(b, n_layers, h_kv, n, d, generator=g, dtype=torch.float32).to(dtype),
        cot_mask=torch.arange(n)[None, :] < lens[:, None],
        answer_queries=torch.randn(b, n_layers, h_q, a, d, generator=g, dtype=torch.float32).to(dtype),
        answer_mask=torch.arange(a)[None, :] < alens[:, None],
    )
    return SimpleNamespace(**{k: v.to(device) for k, v in vars(ext).items()})


def ext_nbytes(ext) -> int:
    return sum(v.numel() * v.element_size() for v in vars(ext).values())


# ---------------------------------------------------------------------------------------------------------
# the loop baseline: per example, per layer, per KV head, full cosine matrix
# ---------------------------------------------------------------------------------------------------------


def loop_compress(ext, M, lam, examples=None):
    """R-KV the obvious way. Returns (keys, values, indices) lists; only used for timing and a parity check."""
    keys, values, q_all = ext.cot_keys, ext.cot_values, ext.answer_queries
    b, n_layers, h_kv, n, d = keys.shape
    g = q_all.shape[2] // h_kv
    out = []
    for bi in range(b) if examples is None else range(examples):
        valid = ext.cot_mask[bi].nonzero().squeeze(-1)
        qvalid = ext.answer_mask[bi].nonzero().squeeze(-1)
        for li in range(n_layers):
            for h in range(h_kv):
                K = keys[bi, li, h, valid].float()  # [n, d]
                Q = q_all[bi, li, h * g : (h + 1) * g][:, qvalid].float()  # [G, a, d]
                logits = (Q @ K.T / math.sqrt(d)).amax(dim=0)  # [a, n]
                imp = torch.softmax(logits, dim=-1).mean(dim=0)
                Kn = K / K.norm(dim=-1, keepdim=True).clamp(min=1e-8)
                C = Kn @ Kn.T  # [n, n]
                C.fill_diagonal_(0.0)
                red = torch.softmax(-C.sum(dim=0) / len(valid), dim=0)  # mean over n, as §3
                s = lam * imp + (1 - lam) * red
                top = torch.topk(s, min(M, len(valid))).indices.sort().values
                pos = valid[top]
                out.append((keys[bi, li, h, pos], values[bi, li, h, pos], pos))
    return out


# ---------------------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, reps, device, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any (non-view) op produces: the biggest intermediate of a vectorised path."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.shape, self.op = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):  # views allocate nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.nbytes:
                self.nbytes, self.shape, self.op = t.numel() * t.element_size(), tuple(t.shape), str(func)
        return out


def fmt_s(x):
    return f"{x * 1e3:9.1f} ms" if x < 10 else f"{x:9.2f} s "


def mib(x):
    return f"{x / 2**20:,.1f} MiB"


def table(rows, headers):
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print()


# ---------------------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------------------


def part_scaling(args, device, dtype):
    comp = get_compressor("rkv", lam=args.lam)
    shape = dict(b=args.batch, n_layers=args.layers, h_kv=args.kv_heads, h_q=args.q_heads, a=args.answer,
                 d=args.head_dim, dtype=dtype, device=device)
    rows, vec, mem_rows = [], {}, []
    for n, loop_examples, loop_reps in ((args.n, None, args.loop_reps),
                                        (args.n * args.scale, args.loop_examples_large, 1)):
        ext = make_ext(n=n, **shape)
        # parity: the loop and the vectorised path keep the same tokens (first example)
        vec_out = compress_extraction(ext, comp, args.M)
        ref = loop_compress(ext, args.M, args.lam, examples=1)
        k0 = vec_out.slot_mask[0, 0, 0].sum().item()
        same = all(torch.equal(vec_out.indices[0, i // args.kv_heads, i % args.kv_heads, :k0], r[2])
                   for i, r in enumerate(ref))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t_vec = timeit(lambda: compress_extraction(ext, comp, args.M), args.reps, device)
        cuda_peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None
        with LargestTensor() as big:
            compress_extraction(ext, comp, args.M)
        mem_rows.append([n, mib(ext_nbytes(ext)), f"{big.shape} {big.op}", mib(big.nbytes),
                         "n/a (CPU)" if cuda_peak is None else mib(cuda_peak)])

        ex = args.batch if loop_examples is None else min(loop_examples, args.batch)
        t_loop = timeit(lambda: loop_compress(ext, args.M, args.lam, examples=ex), loop_reps, device,
                        warmup=0) * args.batch / ex
        note = f"{loop_reps} rep(s), all {args.batch} examples" if ex == args.batch else \
            f"{loop_reps} rep, {ex} of {args.batch} examples timed, scaled x{args.batch / ex:g}"
        vec[n] = t_vec
        rows.append([n, fmt_s(t_vec), fmt_s(t_loop), f"{t_loop / t_vec:8.1f}x", "yes" if same else "NO",
                     f"median of {args.reps}", note])
        del ext, vec_out

    print(f"## 1. R-KV (lam={args.lam}) on a whole extraction: B={args.batch}, L={args.layers}, "
          f"H_kv={args.kv_heads}, H_q={args.q_heads}, d={args.head_dim}, A={args.answer}, M={args.M}, "
          f"{str(dtype).replace('torch.', '')}, {device}")
    table(rows, ["N", "vectorised", "loop", "loop/vec", "same picks", "vec timing", "loop timing"])
    n0, n1 = args.n, args.n * args.scale
    ratio = vec[n1] / vec[n0]
    limit = 1.5 * args.scale
    print(f"scaling: {args.scale}x the tokens (N {n0} -> {n1}) costs {ratio:.2f}x the time "
          f"(target <= {limit:g}x): {'PASS' if ratio <= limit else 'FAIL'}\n")
    print("## 2. memory of the vectorised path (largest single tensor any op produces)")
    table(mem_rows, ["N", "extraction in", "largest intermediate (shape, op)", "size", "CUDA peak extra"])
    return ratio <= limit


def part_models(args, device, dtype):
    print(f"## 3. compression vs one teacher forward: B={args.batch} x (question {args.question} + N {args.n} "
          f"+ answer {args.answer}) tokens, M={args.M}, rkv lam={args.lam}")
    if args.skip_models:
        print("skipped: --skip-models\n")
        return None
    try:
        from kava_lab.backbone import load_backbone
    except Exception as exc:  # the backbone module is optional for this benchmark
        print(f"skipped: cannot import kava_lab.backbone.load_backbone ({type(exc).__name__}: {exc})\n")
        return None
    rows, verdict = [], None
    for preset in args.models.split(","):
        try:
            t0 = time.perf_counter()
            bb = load_backbone(preset)
            load_s = time.perf_counter() - t0
        except Exception as exc:
            print(f"{preset}: skipped, backbone unavailable ({type(exc).__name__}: {exc})")
            continue
        model = bb.model.to(device).eval()
        cfg = model.config
        n_layers = cfg.num_hidden_layers
        h_q = cfg.num_attention_heads
        h_kv = getattr(cfg, "num_key_value_heads", None) or h_q
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_q
        mdtype = next(model.parameters()).dtype
        seq = args.question + args.n + args.answer
        g = torch.Generator().manual_seed(0)
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (args.batch, seq), generator=g).to(device)
        am = torch.ones_like(ids)

        def forward():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=am)

        with torch.no_grad():
            model(input_ids=ids[:1, :16], attention_mask=am[:1, :16])  # warm-up
        t_fwd = timeit(forward, args.model_reps, device, warmup=0)
        ext = make_ext(b=args.batch, n_layers=n_layers, h_kv=h_kv, h_q=h_q, n=args.n, a=args.answer, d=d,
                       dtype=mdtype, device=device)
        comp = get_compressor("rkv", lam=args.lam)
        t_cmp = timeit(lambda: compress_extraction(ext, comp, args.M), args.reps, device)
        frac = t_cmp / t_fwd
        target = "< 5%: " + ("PASS" if frac < 0.05 else "FAIL") if "smollm2" in preset.lower() else "-"
        if "smollm2" in preset.lower():
            verdict = frac < 0.05
        rows.append([preset, f"L={n_layers} H_q={h_q} H_kv={h_kv} d={d} {str(mdtype).replace('torch.', '')}",
                     f"{load_s:.1f} s", fmt_s(t_fwd), fmt_s(t_cmp), f"{100 * frac:.2f}%", target])
        del model, bb, ext
    if rows:
        table(rows, ["preset", "shape", "load", "forward", "compress", "compress/forward", "target"])
    print(f"(forward: median of {args.model_reps}, plain model(input_ids, attention_mask) under no_grad; "
          f"compress: median of {args.reps}, extraction of the model's shape, random values)\n")
    return verdict


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--n", type=int, default=200, help="CoT tokens")
    p.add_argument("--scale", type=int, default=10, help="second size is scale * n")
    p.add_argument("--answer", type=int, default=8, help="answer-span queries")
    p.add_argument("--question", type=int, default=60, help="question tokens (teacher forward only)")
    p.add_argument("--M", type=int, default=24)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5, help="repetitions of the vectorised path (median)")
    p.add_argument("--loop-reps", type=int, default=2, help="repetitions of the loop baseline at N")
    p.add_argument("--loop-examples-large", type=int, default=4,
                   help="examples the loop baseline is timed on at scale*N (then scaled to the batch)")
    p.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated load_backbone presets")
    p.add_argument("--model-reps", type=int, default=2, help="repetitions of the teacher forward (median)")
    p.add_argument("--skip-models", action="store_true", help="skip part 3 (teacher forward comparison)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"# bench_compress  machine: {platform.machine()} {platform.processor() or ''}, "
          f"os.cpu_count()={os.cpu_count()}, torch.get_num_threads()={torch.get_num_threads()}, "
          f"torch {torch.__version__}, device {device}{gpu}, load average {os.getloadavg()[0]:.2f} "
          f"(timings on a shared machine are noisy: rerun when the load is high)\n")
    part_scaling(args, device, dtype)
    part_models(args, device, dtype)


if __name__ == "__main__":
    main()
