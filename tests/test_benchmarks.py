"""benchmarks/bench_train.py's roofline figures: what they count, on one real KaVa step (not its timings)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replayed_matmuls_cover_mm_addmm_and_bmm(bench):
    assert bench._replay_seconds("aten::mm", [[64, 32], [32, 16]]) > 0
    assert bench._replay_seconds("aten::addmm", [[16], [64, 32], [32, 16]]) > 0  # bias first, as aten records it
    assert bench._replay_seconds("aten::bmm", [[2, 64, 32], [2, 32, 16]]) > 0
    assert bench.sgemm_peak(n=128, reps=2) > 0


def test_roofline_counts_a_kava_steps_matmul_flops(bench):
    """The profiler's matmul FLOPs for a KaVa step lie between the teacher's linear layers' count (forward and
    the two backward matmuls: 3x) and 3x the count over every position of both batches, the student's counted
    once per latent pass, with the output layer (a bound far above what the step does)."""
    torch.manual_seed(0)
    built = bench.build("kava", None)
    cfg, _student, backbone, items, _objective, _optimizer = built
    r = bench.bench_roofline(built, steps=1)
    c = backbone.model.config
    h, f = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    per_token = 2 * c.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * f)  # forward FLOPs of the linears
    collate = bench.Collator.for_backbone(backbone)
    chunk = [items[k] for k in bench.T._batch_indices(len(items), 0, 1000, cfg.optim.batch_size, 1, 0, None)]
    teacher = collate(chunk, "teacher").input_ids.numel()
    student = collate(chunk, "student", M=cfg.latent.M).input_ids.numel() * (cfg.latent.T + 1)
    upper = 3 * (teacher + student) * (per_token + 2 * h * c.vocab_size)
    assert 3 * teacher * per_token < r["matmul_flops"] < upper
    assert r["matmul"] > 0 and r["attention"] > 0
