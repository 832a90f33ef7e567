"""Two CPU processes (torchrun, or `accelerate launch --multi_gpu --num_processes 2`; gloo) train like one process
at the same effective batch.

`accelerate launch --num_processes 2 --cpu` is not among them: accelerate's CPU path is its simple launcher, which
starts ONE process (its multi-CPU launch goes through mpirun with a hostfile), and the run then reports
"batch 8 = 4 x 1 x 2" (one process, accumulation 2). On a CPU-only machine ``--multi_gpu`` starts torchrun's
processes and the kit's training falls back to CPU/gloo by itself.

Both runs see the same examples per optimizer step (two ranks x 4 examples vs one process x 2 micro-batches of
4) and average the same per-micro-batch gradients, so the logged losses and the final weights agree to float
tolerance. Before the fix every rank trained alone (accelerate without ``cpu=True`` saw no process group on a
CPU machine), each wrote its own rows to one metrics file, and rank 1's batches were rank 0's.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kava_lab.train import torchrun_command

ARGS = ["--preset", "tiny", "--method", "kava", "--steps", "3", "--set", "stage0_steps=0",
        "--set", "optim.batch_size=4", "--set", "optim.effective_batch=8", "--set", "data.train_limit=64",
        "--set", "log_every=1", "--set", "latent.M=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


LAUNCHERS = {  # the two ways a user starts several processes; both must give one run
    "torchrun": lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "-m"],
    "accelerate": lambda port: ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                                "-m"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_cpu_processes_match_one_process(tmp_path, launcher):
    if shutil.which(launcher) is None:
        pytest.skip(f"{launcher} not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "kava_lab.cli", "train", "--out", str(one), *ARGS], env=env, check=True,
                   capture_output=True, timeout=600)
    done = subprocess.run([*LAUNCHERS[launcher](_free_port()), "kava_lab.cli", "train", "--out", str(two), *ARGS],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("training kava") == 1  # rank 0 speaks for the run ...
    assert "batch 8 = 4 x 2 x 1" in done.stdout  # 4 examples x 2 processes, no accumulation
    a, b = _rows(one), _rows(two)
    assert [r["step"] for r in b] == [1, 2, 3]  # ... and writes one row per step
    for ra, rb in zip(a, b):
        for term in ("loss", "teacher_ce", "student_ce", "kv", "codi", "grad_norm"):
            assert rb[term] == pytest.approx(ra[term], rel=1e-4, abs=1e-6), (ra["step"], term)
        # tokens/s counts every process's tokens: the same examples per step, so the same tokens as one process
        assert rb["tokens_per_s"] * rb["step_time_s"] == pytest.approx(ra["tokens_per_s"] * ra["step_time_s"], rel=1e-6)
    wa = load_file(str(one / "checkpoint" / "trainable.safetensors"))
    wb = load_file(str(two / "checkpoint" / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)


RACE = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 0:
    time.sleep(1.0)  # rank 1 takes the build lock first: the rank whose save_pretrained transformers skips
from kava_lab.backbone import load_backbone
backbone = load_backbone("tiny")
dist.barrier()
print("rank", dist.get_rank(), "loaded", backbone.model.config.model_type, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_tiny_backbone_built_by_a_nonzero_rank_is_complete(tmp_path):
    """With torch.distributed up, transformers' save_pretrained writes nothing on ranks other than 0. A fresh cache
    whose tiny model was built by rank 1 used to hold only the tokenizer; rank 0 then rebuilt it underneath rank 1,
    which failed to load ("Unrecognized model ... should have a model_type key")."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "KAVA_LAB_CACHE": str(tmp_path / "cache")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([*torchrun_command(2), str(script), root], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("loaded llama") == 2
    (folder,) = (tmp_path / "cache").glob("tiny-*")
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()


@pytest.mark.slow
def test_experiment_with_two_processes_records_one_run(tmp_path):
    """scripts/experiment.py --procs 2: torchrun underneath, the effective batch split over the processes, one
    record (rank 0) that says how it was trained."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "KAVA_LAB_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    common = [sys.executable, os.path.join(root, "scripts", "experiment.py"), "--runs", str(tmp_path / "runs"),
              "--results", str(tmp_path / "results"), "--set", "stage0_steps=0", "--set", "optim.steps=2",
              "--set", "max_new_tokens=4", "--set", "data.train_limit=64", "--val-limit", "4", "--threads", "1"]
    done = subprocess.run([*common, "dp", "--procs", "2", "--eval-every", "2"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 32 = 16 x 2 x 1" in done.stdout and done.stdout.count("val accuracy") == 2  # curve + record, once
    record = json.loads((tmp_path / "results" / "dp.json").read_text())
    assert record["procs"] == 2 and record["threads"] == 1 and record["config"]["optim"]["batch_size"] == 16
    assert [c["step"] for c in record["curve"]] == [2] and "interventions" in record["evals"]["val"]
    bad = subprocess.run([*common, "odd", "--procs", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--procs 3 does not divide optim.effective_batch=32" in bad.stderr
