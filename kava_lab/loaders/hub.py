"""Where data comes from: the short names and their shared-data files and hub ids, the shared data folder,
and loading through ``datasets`` (hub ids, ``save_to_disk`` folders, hub-schema files)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterable

from .fields import _ex, schema_for
from .rows import ExampleList, SourceError, _check_args, _label, _Rows

# short name -> shared-data folder, split -> file, default split, hub id, hub config
SHORT_NAMES: dict[str, dict[str, Any]] = {
    "gsm8k": {
        "folder": "gsm8k",
        "files": {"train": "train.jsonl", "test": "test.jsonl"},
        "default": "train",
        "hub": "openai/gsm8k",
    },
    "gsm8k-aug": {
        "folder": "gsm8k_aug",
        "files": {
            "valid": "valid.txt",
            "validation": "valid.txt",
            "test": "test.txt",
            "middletrain": "middletrain.txt",
            "train_no_aug": "train_no_aug.txt",
        },
        "default": "train",  # the 385k train split is hub-only
        "hub": "whynlp/gsm8k-aug",
    },
    "gsm8k-aug-nl": {"folder": None, "files": {}, "default": "train", "hub": "whynlp/gsm8k-aug-nl"},
    "gsm-hard": {
        "folder": "gsm8k_hard",
        "files": {"all": "gsmhardv2.jsonl"},
        "default": "all",
        "hub": "juyoung-trl/gsm-hard",
    },
    "svamp": {
        "folder": "svamp",
        "files": {"all": "SVAMP.json"},
        "default": "all",
        "hub": "ChilleD/SVAMP",
    },
    "multiarith": {
        "folder": "multiarith",
        "files": {
            "all": "MultiArith.json",
            "test": "multiarith_test_processed.jsonl",
            "mawps": "mawpsmultiarith.jsonl",
        },
        "default": "all",
        "hub": "ChilleD/MultiArith",
    },
}

# hub id -> (config name, default split); "all" concatenates every split
_HUB_DEFAULTS: dict[str, tuple[str | None, str]] = {
    "openai/gsm8k": ("main", "train"),
    "gsm8k": ("main", "train"),
    "whynlp/gsm8k-aug": (None, "train"),
    "whynlp/gsm8k-aug-nl": (None, "train"),
    "zen-E/GSM8k-Aug": (None, "train"),
    "zen-E/GSM8k-Aug-NL": (None, "train"),
    "juyoung-trl/gsm-hard": (None, "train"),
    "reasoning-machines/gsm-hard": (None, "train"),
    "ChilleD/SVAMP": (None, "all"),
    "ChilleD/MultiArith": (None, "all"),
}

_DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv", ".arrow")


def find_shared_data() -> Path | None:
    """The shared real-data folder: ``$KAVA_LAB_DATA``, else ``<repo root>/../shared/data`` (repo root = parent
    of the ``kava_lab`` package folder), else ``../shared/data`` relative to the working directory; None when
    none of them exists."""
    env = os.environ.get("KAVA_LAB_DATA")
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            return p.resolve()
        warnings.warn(f"KAVA_LAB_DATA={env!r} is not a folder; looking elsewhere", stacklevel=2)
    for p in (Path(__file__).resolve().parents[2] / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"):
        if p.is_dir():
            return p.resolve()
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _pick_split(dd: Any, split: str | None, where: str) -> tuple[Any, str]:
    import datasets

    if not isinstance(dd, datasets.DatasetDict):
        return dd, split or "train"
    split = split or ("train" if "train" in dd else "all")
    if split == "all":
        return datasets.concatenate_datasets([dd[k] for k in dd]), "all"
    if split not in dd:
        raise SourceError(f"{where}: no split {split!r}; splits found: {sorted(dd)} (or 'all')")
    return dd[split], split


def load_hf(
    source: str | Path,
    split: str | None = None,
    trace: str = "equation",
    limit: int | None = None,
    lenient: bool = False,
    name: str | None = None,
    considered: Iterable[str] = (),
) -> ExampleList:
    """Load through ``datasets``: a hub id (``whynlp/gsm8k-aug``, ``ChilleD/SVAMP``, ...), a folder made by
    ``save_to_disk``, a hub-layout folder, or a jsonl/json/parquet/csv file. Rows are mapped by their fields
    (GSM8k-AUG ``question/steps/answer``, GSM8k, GSM-Hard, SVAMP, MultiArith schemas). ``split="all"``
    concatenates every split; without a split, SVAMP and MultiArith hub ids load all, others ``train``.
    ``considered``: local paths already tried, named in the error when the hub is unreachable."""
    import datasets

    _check_args(trace, limit)
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        where = str(path)
        if _is_saved_dataset(path):
            ds, split = _pick_split(datasets.load_from_disk(str(path)), split, where)
        elif path.is_file():
            readers = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
            builder = readers.get(path.suffix.lower())
            if builder is None:
                raise SourceError(f"{path}: no datasets reader for suffix {path.suffix!r}")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            ds, split = _pick_split(datasets.load_dataset(str(path)), split, where)
        label = _label(path)
        ident_prefix = label
    else:
        hub_id = str(source)
        config, default_split = _HUB_DEFAULTS.get(hub_id, (None, "train"))
        name = name if name is not None else config
        split = split or default_split
        try:
            if split == "all":
                ds, _ = _pick_split(datasets.load_dataset(hub_id, name), "all", hub_id)
            else:
                ds = datasets.load_dataset(hub_id, name, split=split)
        except (ConnectionError, OSError) as exc:
            tried = list(considered)
            raise SourceError(
                f"could not load {hub_id!r} (split {split!r}) from the Hugging Face hub: hub unreachable or "
                f"dataset not found ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                f"Local paths considered: {tried if tried else 'none'}. Pass a local path, or set KAVA_LAB_DATA "
                "to the shared data folder (HF_HUB_OFFLINE=1 makes hub failures fast)."
            ) from exc
        where = f"{hub_id} [{split}]"
        label = hub_id
        ident_prefix = f"{hub_id}:{split}"

    rows = _Rows(label, limit, lenient)
    build = schema_for(ds.column_names, where)
    for i, rec in enumerate(ds):
        if rows.full:
            break
        n = i + 1
        rows.add(lambda rec=rec, n=n: _ex(build(rec, f"{where}, row {n}", trace), label, f"{ident_prefix}:{n}"))
    out = rows.finish()
    out.report.source = label
    return out
