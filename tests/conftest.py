"""Shared fixtures: tiny random models of three families (Llama with GQA, Qwen2, GPT-2), no downloads."""

from __future__ import annotations

import pytest
import torch

from kava_lab.backbone import TinyConfig, build_tiny, load_backbone


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    tiny = TinyConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)
    return {fam: build_tiny(root / fam, tiny, family=fam) for fam in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session", params=["llama", "qwen2", "gpt2"])
def family_backbone(request, family_paths):
    torch.manual_seed(0)
    return load_backbone(str(family_paths[request.param]))


@pytest.fixture(scope="session")
def tiny_backbone():
    return load_backbone("tiny")
