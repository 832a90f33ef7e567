"""What the two *_vs_commit benchmarks share: an earlier commit checked out beside this tree, and a timed child
process that runs from one tree with its own cache folder and thread count and prints its result as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kava_lab.train import torchrun_command  # noqa: E402  (this tree's launcher, whichever tree a side runs)


@contextmanager
def commit_worktree(commit: str):
    """Yields (the commit's checkout, a scratch folder); both are removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), commit], check=True)
        try:
            yield base, tmp
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)


def run_child(code: str, src: Path, args: list[str], threads: int, cache: Path, what: str, procs: int = 1):
    """Run ``code`` from tree ``src`` (argv[1] is ``src``) with ``threads`` threads per process; returns its last
    stdout line, parsed. ``procs > 1``: under torchrun, ``procs`` processes (gloo on CPU); rank 0 prints."""
    env = dict(os.environ, KAVA_LAB_CACHE=str(cache), OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    if procs > 1:
        cache.mkdir(parents=True, exist_ok=True)
        script = cache / "child.py"
        script.write_text(code)
        cmd = [*torchrun_command(procs), str(script)]
    else:
        cmd = [sys.executable, "-c", code]
    done = subprocess.run([*cmd, str(src), *args], capture_output=True, text=True, env=env, cwd=src)
    if done.returncode:
        raise RuntimeError(f"{what} at {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
