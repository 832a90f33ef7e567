"""What a non-editable install carries: the wheel holds the package data (the GSM8k sample, its licence) and
the four notebooks, and `kava-lab lab` finds the notebooks there when no source checkout is around."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kava_lab.cli as cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_carries_the_notebooks_and_the_sample(tmp_path):
    import shutil

    # build from a copy: setuptools writes build/ and *.egg-info next to the sources, and a stale build/lib
    # could smuggle deleted modules into the wheel
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", ".cache", "build", "*.egg-info", "logs",
                                                             "queue", "__pycache__", ".pytest_cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("kava_lab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    notebooks = sorted(Path(n).name for n in names if "/share/kava_lab/notebooks/" in n)
    assert notebooks == sorted(p.name for p in (ROOT / "notebooks").glob("0*.ipynb")) and len(notebooks) == 4
    assert "kava_lab/samples/gsm8k_test_64.jsonl" in names and "kava_lab/samples/LICENSE-gsm8k" in names
    assert any(n.startswith("kava_lab/probe/") for n in names) and any(n.startswith("kava_lab/loaders/") for n in names)


def test_lab_finds_installed_notebooks_without_a_checkout(tmp_path, monkeypatch):
    installed = tmp_path.joinpath(*cli.NOTEBOOK_DATA)
    installed.mkdir(parents=True)
    for name in ("01_kv_extraction.ipynb", "02_compression.ipynb"):
        (installed / name).write_text("{}")
    monkeypatch.setattr(cli, "NOTEBOOK_DIR", tmp_path / "no-checkout" / "notebooks")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr("sysconfig.get_path", lambda name, *a, **k: str(tmp_path / "elsewhere"))
    assert cli.notebook_dir() == installed
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no notebooks found"):
        cli.notebook_dir()
    monkeypatch.setattr(cli, "NOTEBOOK_DIR", ROOT / "notebooks")
    assert cli.notebook_dir() == ROOT / "notebooks"  # a checkout wins
