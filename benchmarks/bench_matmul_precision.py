"""Does bf16 matmul precision (oneDNN on CPUs with AMX / AVX512-BF16) speed up a tiny-model training pass?

    python benchmarks/bench_matmul_precision.py [--batch 32] [--seq 300] [--rounds 5] [--threads 1]

A script, not a test; no lever of the kit, a measurement of one it could add (issue 8). Two parts, every
variant alternated round by round in one process, so machine load hits them alike; medians over rounds:

1. one linear layer of the tiny model's teacher-pass shape (``[B*S, 128] x [128, 384]``, forward and both
   backward matmuls) under ``torch.backends.mkldnn.matmul.fp32_precision`` = ``ieee`` (full fp32) and ``bf16``
   (fp32 tensors, bf16 products inside oneDNN, fp32 accumulation);
2. forward + backward of the whole tiny model (random weights, the cached tiny backbone's shape) on
   ``[B, S]`` random tokens with its LM loss, for attention ``sdpa`` and ``eager`` under both precisions,
   with each variant's time over the default (``sdpa``, ``ieee``).

It prints the CPU flags that decide it (``amx_bf16``, ``avx512_bf16``). bf16 products change the maths (about 3
significant digits per product), so a lever built on it would need an accuracy check, not only this timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(line for line in fh if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags) or "none of them"


def set_precision(mode: str) -> None:
    torch.backends.mkldnn.matmul.fp32_precision = mode


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_linear(batch: int, seq: int, rounds: int) -> dict:
    x = torch.randn(batch * seq, 128)
    w = torch.randn(384, 128)
    g = torch.randn(batch * seq, 384)
    parts = {"forward x W^T": lambda: F.linear(x, w), "grad W = g^T x": lambda: g.t() @ x,
             "grad x = g W": lambda: g @ w}
    out: dict = {}
    for r in range(rounds + 1):
        for mode in ("ieee", "bf16"):
            set_precision(mode)
            for name, fn in parts.items():
                t = timed(lambda: [fn() for _ in range(10)]) / 10
                if r:  # round 0 warms up
                    out.setdefault((name, mode), []).append(t)
    set_precision("ieee")
    return {k: statistics.median(v) for k, v in out.items()}


def bench_model(batch: int, seq: int, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    from kava_lab.backbone import load_backbone

    path = load_backbone("tiny").model.config._name_or_path  # the cached tiny model folder (built if missing)
    models = {impl: AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).train()
              for impl in ("sdpa", "eager")}
    ids = torch.randint(5, models["sdpa"].config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)

    def step(model):
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    out: dict = {}
    for r in range(rounds + 1):
        for impl, model in models.items():
            for mode in ("ieee", "bf16"):
                set_precision(mode)
                t = timed(lambda: step(model))
                if r:
                    out.setdefault((impl, mode), []).append(t)
    set_precision("ieee")
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=300, help="tokens per row (a shuffled 4-7 teacher row is ~300)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not hasattr(torch.backends.mkldnn, "matmul"):
        raise SystemExit(f"torch {torch.__version__} has no torch.backends.mkldnn.matmul.fp32_precision")
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU flags: {cpu_flags()}")

    lin = bench_linear(args.batch, args.seq, args.rounds)
    print(f"\n1. one linear layer, [{args.batch * args.seq}, 128] x [128, 384] (ms, median of {args.rounds})")
    print("| matmul | ieee | bf16 | speed-up |\n|---|---|---|---|")
    for name in dict.fromkeys(k[0] for k in lin):
        a, b = lin[(name, "ieee")], lin[(name, "bf16")]
        print(f"| {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f}x |")

    res = bench_model(args.batch, args.seq, args.rounds)
    base = res[("sdpa", "ieee")]
    print(f"\n2. tiny model forward + backward, batch [{args.batch}, {args.seq}] (s, median of {args.rounds})")
    print("| attention | precision | s | speed-up over sdpa/ieee |\n|---|---|---|---|")
    for (impl, mode), t in res.items():
        print(f"| {impl} | {mode} | {t:.3f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
