"""KaVa training throughput, peak memory and MFU on whatever device torch finds (issue 8, the GPU part).

    python benchmarks/bench_device.py [--steps 30] [--skip 5] [--methods kava,pccot] [--json FILE] [--quick]

Two backbones, both built here with random weights (nothing downloads and no weights need to travel):

- ``smollm2-135m-shape``: the SmolLM2-135M architecture (Llama, 30 layers, hidden 576, 9 query and 3 KV heads
  of 64, MLP 1536, tied embeddings, 134.5M parameters with the vocabulary padded to 49,152 rows so the LM head
  costs what the real one does), trained as the ``smollm2-135m`` preset trains it: LoRA r=128 on every linear
  layer, bf16 autocast on CUDA, M=24 latents, T=3, batch 32. The tokenizer is the tiny word-level one (its ~140
  ids are the only rows read), the problems are the synthetic ones, so sequence lengths are the tiny task's
  (~100-300 tokens, near GSM8k-AUG's equation traces), not GSM8k's.
- ``tiny``: the tiny preset (4 layers, hidden 128, full fine-tuning, batch 32), random weights, no stage 0.

Every step goes through ``kava_lab.train.train``, the product's loop (accelerate, autocast, clipping, AdamW).
Figures are medians over the steps after ``--skip``, from the run's own metrics: s/step, tokens/s (teacher +
student tokens that are not padding), peak CUDA memory, and MFU = 6 * N * tokens/s / peak FLOP/s. N counts
every parameter that does work (the tied embedding is counted once, as the LM head); 6N per token is the usual
training convention and a rough one here: LoRA skips the frozen weights' gradients (nearer 4N), while the
Jacobi passes recompute the latent positions T+1 times and are counted once. The peak defaults to 989 TFLOP/s
(H100/H200 SXM, dense bf16) on a device whose name says H100 or H200; pass ``--peak-tflops`` otherwise (no MFU
on CPU unless given). ``--quick``: the large shape with 2 layers and 4,096 vocabulary rows, 4 steps, to check
the script on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kava_lab.backbone import TinyConfig, build_tiny, load_backbone  # noqa: E402
from kava_lab.config import DataConfig, apply_overrides, get_preset  # noqa: E402
from kava_lab.runs import read_metrics  # noqa: E402
from kava_lab.train import train  # noqa: E402

SMOLLM2_135M = TinyConfig(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                          max_positions=2048)
SMOLLM2_VOCAB = 49152
PEAKS_TFLOPS = {"H200": 989.0, "H100": 989.0}  # dense bf16, SXM parts (NVIDIA data sheets)


def build_large_shape(folder: Path, shape: TinyConfig, vocab: int) -> Path:
    """A random model of ``shape`` with the tiny tokenizer, its embedding padded to ``vocab`` rows; saved."""
    from transformers import AutoModelForCausalLM

    build_tiny(folder, shape)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if model.get_input_embeddings().weight.shape[0] < vocab:
        # rows past the tokenizer are never read, but the LM head pays for them
        model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(folder)
    return folder


def working_params(spec: str) -> int:
    """Parameters of the backbone ``spec`` (tied weights are one parameter: counted once)."""
    return sum(p.numel() for p in load_backbone(spec).model.parameters())


def time_run(cfg, work: Path, name: str, skip: int) -> dict:
    run_dir = work / name
    t0 = time.perf_counter()
    train(cfg, run_dir, log=lambda s: None)
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir)[skip:]
    if not rows:
        raise ValueError(f"{name}: no steps after --skip {skip} (ran {cfg.optim.steps})")
    out = {"steps_timed": len(rows), "s_per_step": statistics.median(r["step_time_s"] for r in rows),
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows), "wall_s": round(wall, 1),
           "final_loss": rows[-1]["loss"]}
    if "peak_mem_gb" in rows[-1]:
        out["peak_mem_gb"] = max(r["peak_mem_gb"] for r in rows)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the medians (warm-up)")
    ap.add_argument("--methods", default="kava,pccot")
    ap.add_argument("--backbones", default="smollm2-135m-shape,tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--work", default=None, help="folder for the built model and the runs (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--quick", action="store_true",
                    help="2 layers and a 4,096-row vocabulary for the large shape, 4 steps, skip 1: a CPU smoke run")
    args = ap.parse_args(argv)
    steps, skip = (4, 1) if args.quick else (args.steps, args.skip)
    shape = replace(SMOLLM2_135M, num_layers=2) if args.quick else SMOLLM2_135M
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAKS_TFLOPS.items() if k in device), None)
    import accelerate
    import peft
    import transformers

    env = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__, "threads": torch.get_num_threads(),
           "peak_tflops": peak, "steps": steps, "skip": skip, "batch": args.batch}
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_device-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"env": env, "runs": {}}
    for backbone in args.backbones.split(","):
        if backbone == "smollm2-135m-shape":
            folder = work / "smollm2-135m-shape"
            if not (folder / "config.json").exists():
                build_large_shape(folder, shape, 4096 if args.quick else SMOLLM2_VOCAB)
            n_params = working_params(str(folder))
            base = lambda m: replace(get_preset("smollm2-135m", m), backbone=str(folder), stage0_steps=0,  # noqa: E731
                                     data=DataConfig(train="synthetic", train_limit=4096, eval="synthetic",
                                                     trace="nl"))
        elif backbone == "tiny":
            n_params = working_params("tiny")
            base = lambda m: apply_overrides(get_preset("tiny", m), ["stage0_steps=0", "data.train_limit=4096"])  # noqa: E731
        else:
            raise ValueError(f"unknown backbone {backbone!r}; expected smollm2-135m-shape or tiny")
        for method in args.methods.split(","):
            cfg = base(method)
            cfg = replace(cfg, log_every=10**6, save_every=10**6,
                          optim=replace(cfg.optim, steps=steps, batch_size=args.batch, effective_batch=args.batch))
            fig = time_run(cfg, work, f"{backbone}-{method}", skip)
            fig["params"] = n_params
            fig["lora"] = cfg.lora.enabled
            if peak:
                fig["mfu"] = 6 * n_params * fig["tokens_per_s"] / (peak * 1e12)
            results["runs"][f"{backbone}/{method}"] = fig
            print(f"{backbone:>20} {method:>6}: {fig['s_per_step']:.3f} s/step, {fig['tokens_per_s']:,.0f} tokens/s"
                  + (f", peak {fig['peak_mem_gb']:.2f} GiB" if "peak_mem_gb" in fig else "")
                  + (f", MFU {fig['mfu'] * 100:.2f}% (6N convention)" if "mfu" in fig else "")
                  + f", N={n_params / 1e6:.1f}M, LoRA={cfg.lora.enabled}, {fig['wall_s']:.0f} s wall", flush=True)
        k, p = results["runs"].get(f"{backbone}/kava"), results["runs"].get(f"{backbone}/pccot")
        if k and p:
            print(f"{backbone:>20}: KaVa step / PCCoT step {k['s_per_step'] / p['s_per_step']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
