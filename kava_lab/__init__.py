"""kava_lab: KaVa latent reasoning via compressed KV-cache distillation, as a notebook-first kit.

Top-level names are imported lazily so ``import kava_lab`` stays fast and a notebook pays only for what
it uses.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Example": "data",
    "DataError": "data",
    "parse_number": "data",
    "last_number": "data",
    "load_examples": "loaders",
    "load_backbone": "backbone",
    "Backbone": "backbone",
    "make_synthetic": "synthetic",
    "encode": "encoding",
    "Collator": "encoding",
    "extract_teacher": "teacher",
    "TeacherOutput": "teacher",
    "get_compressor": "compress",
    "compress_extraction": "compress",
    "select": "compress",
    "Student": "student",
    "kava_objective": "losses",
    "RunConfig": "config",
    "get_preset": "config",
    "train": "train",
    "evaluate": "evaluate",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kava_lab' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kava_lab.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
