"""Loaders for the real math word-problem formats: GSM8k, GSM8k-AUG (iCoT text and hub form), GSM-Hard,
SVAMP and MultiArith, from a local path, a short name, or a Hugging Face hub id.

Entry point: :func:`load_examples`. Modules: :mod:`.rows` (containers, errors, strict/lenient collection,
readers), :mod:`.fields` (answers, steps, one builder per schema), :mod:`.hub` (short names, the shared data
folder, ``datasets``); here, the one table of local file formats (:data:`FORMATS`) and the dispatch. Every loader returns an :class:`ExampleList` (a ``list`` of
:class:`~kava_lab.data.Example`) whose ``.report`` says what was loaded and what was skipped.

Choices made where the formats leave room (see ``../shared/data/README.md`` for the formats):

* **Steps.** GSM8k jsonl gives both views: ``trace="equation"`` keeps the ``<<...>>`` calculator
  annotations in order (brackets kept, as in GSM8k-AUG), ``trace="nl"`` keeps the non-empty solution lines
  before ``####`` with the annotations removed. iCoT text files and the hub AUG forms carry one kind of trace
  only; asking for the other raises ``ValueError`` (it is not a malformed row, so ``lenient`` does not hide
  it). ``train_no_aug.txt`` is GSM8k's solution joined into one line with single spaces, so the original
  line breaks are gone: its steps are recovered by :func:`split_sentences` (sentence punctuation, plus a
  capitalised word right after a number/``=`` or a common sentence opener; this reproduces GSM8k's own lines
  for about 84 % of problems, the rest are split at sentence boundaries instead).
* **Eval-only sets** (GSM-Hard, SVAMP, MultiArith) get ``steps=()``: GSM-Hard's ``code``, SVAMP's
  ``Equation``, MultiArith's ``lEquations`` are not traces in the GSM8k-AUG style, and the 180-split ``cot`` is
  a fixed template.
* **Answers.** ``answer`` is the gold answer as text, commas and a trailing ``.`` removed (``"2,125"`` ->
  ``"2125"``, ``"36."`` -> ``"36"``); numeric fields are rendered by :func:`~kava_lab.data.format_number`
  (``51.0`` -> ``"51"``). ``answer_value`` is its float; a plain fraction such as ``"2/5"`` (one line of
  ``middletrain.txt``) is kept as text and valued 0.4.
* **step_values** is filled for equation steps when every ``<<expr=result>>`` result is a number.
* **ids** are ``"<folder>/<file>:<n>"`` with ``n`` the 1-based line number (line formats) or record number
  (JSON arrays, datasets rows); hub rows are ``"<hub id>:<split>:<n>"``.
* Blank lines in line-based files are not rows and are ignored. Every other bad row raises
  :class:`~kava_lab.data.DataError`, or with ``lenient=True`` is skipped, listed in ``.report.skipped`` and
  counted in a :class:`DataWarning`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

from kava_lab.data import DataError, LoadReport

from .fields import (_TEMPLATE_COT, _build_gsm8k, _build_gsm_hard, _build_icot, _build_mawps, _build_multiarith,
                     _build_multiarith_processed, _build_svamp, _from_records, split_equation_steps, split_sentences)
from .hub import _HUB_DEFAULTS, SHORT_NAMES, _is_saved_dataset, find_shared_data, load_hf  # noqa: F401
from .rows import (TRACES, DataWarning, ExampleList, NotUtf8, SourceError, _check_args, _json_array, _jsonl,  # noqa: F401
                   _label, _lines, _text_lines)

__all__ = [
    "ExampleList", "SourceError", "DataWarning", "NotUtf8", "load_examples", "find_shared_data", "FORMATS",
    "load_format", "load_gsm8k_jsonl", "load_icot_txt", "load_gsm_hard_jsonl", "load_svamp_json",
    "load_multiarith_json", "load_mawps_jsonl", "load_multiarith_processed_jsonl", "load_hf", "split_sentences",
    "split_equation_steps", "SHORT_NAMES",
]

_DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv", ".arrow")

# --------------------------------------------------------------------------------------------------------
# The local file formats: one table (reader of numbered records, builder of one record), one loader

FORMATS: dict[str, tuple[Callable[[Path], Iterator], Callable, str]] = {
    "gsm8k": (_jsonl, _build_gsm8k, "GSM8k jsonl {question, answer}; trace picks the <<...>> or the NL view"),
    "icot": (_text_lines, _build_icot, "iCoT lines QUESTION||<<4-2=2>> <<2/.5=4>> #### 300 (GSM8k-AUG), or "
             "the same with an NL CoT (train_no_aug.txt, split by split_sentences)"),
    "gsm-hard": (_jsonl, _build_gsm_hard, "GSM-Hard jsonl {input, code, target}; steps=() (code is not a trace)"),
    "svamp": (_json_array, _build_svamp, "SVAMP JSON array {ID, Body, Question, Equation, Answer, Type}"),
    "multiarith": (_json_array, _build_multiarith, "MultiArith.json array {iIndex, sQuestion, lSolutions, ...}"),
    "mawps": (_jsonl, _build_mawps, "mawpsmultiarith.jsonl {input, target}"),
    "multiarith-processed": (_jsonl, _build_multiarith_processed,
                             "the 180-problem MultiArith split {id, question, cot, answer}; cot is a template"),
}


def load_format(kind: str, path: str | Path, trace: str = "equation", limit: int | None = None,
                lenient: bool = False) -> ExampleList:
    """Load a local file of one of :data:`FORMATS` (``kind``), strict or lenient."""
    if kind not in FORMATS:
        raise ValueError(f"unknown format {kind!r}; expected one of {sorted(FORMATS)}")
    _check_args(trace, limit)
    path = Path(path).expanduser().resolve()
    read, build, _ = FORMATS[kind]
    return _from_records(read(path), _label(path), build, trace, limit, lenient)


def _loader(kind: str) -> Callable[..., ExampleList]:
    def load(path: str | Path, trace: str = "equation", limit: int | None = None, lenient: bool = False) -> ExampleList:
        return load_format(kind, path, trace, limit, lenient)

    load.__doc__ = FORMATS[kind][2]
    return load


load_gsm8k_jsonl = _loader("gsm8k")
load_icot_txt = _loader("icot")
load_gsm_hard_jsonl = _loader("gsm-hard")
load_svamp_json = _loader("svamp")
load_multiarith_json = _loader("multiarith")
load_mawps_jsonl = _loader("mawps")
load_multiarith_processed_jsonl = _loader("multiarith-processed")


# --------------------------------------------------------------------------------------------------------
# Dispatch


def _peek_jsonl(path: Path) -> dict | None:
    for _, line in _lines(path):
        if isinstance(line, DataError):
            continue  # format detection only; the loader reports the line
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return None
        return rec if isinstance(rec, dict) else None
    return None


def _load_file(path: Path, split: str | None, trace: str, limit: int | None, lenient: bool) -> ExampleList:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return load_format("icot", path, trace, limit, lenient)
    if suffix == ".jsonl":
        rec = _peek_jsonl(path)
        keys = set(rec) if rec is not None else set()
        if rec is None or ({"question", "answer"} <= keys and not keys & {"steps", "cot", "final_ans"}):
            return load_format("gsm8k", path, trace, limit, lenient)  # also reports a broken first line
        if {"input", "target"} <= keys:
            return load_format("gsm-hard" if "code" in keys else "mawps", path, trace, limit, lenient)
        if {"question", "cot", "answer"} <= keys and str(rec.get("cot", "")).startswith(_TEMPLATE_COT):
            return load_format("multiarith-processed", path, trace, limit, lenient)
        return load_hf(path, split, trace, limit, lenient)
    if suffix == ".json":
        try:
            first = next(iter(_json_array(path)), None)
        except NotUtf8:
            raise
        except DataError:
            first = None  # not an array: let datasets try (e.g. {"data": [...]})
        rec = first[2] if first is not None else None
        if isinstance(rec, dict) and {"Body", "Question", "Answer"} <= set(rec):
            return load_format("svamp", path, trace, limit, lenient)
        if isinstance(rec, dict) and {"sQuestion", "lSolutions"} <= set(rec):
            return load_format("multiarith", path, trace, limit, lenient)
        return load_hf(path, split, trace, limit, lenient)
    if suffix in _DATA_SUFFIXES:
        return load_hf(path, split, trace, limit, lenient)
    raise SourceError(f"{path}: unknown file format {suffix!r}; expected one of {_DATA_SUFFIXES}")


def _load_folder(path: Path, split: str | None, trace: str, limit: int | None, lenient: bool) -> ExampleList:
    if _is_saved_dataset(path):
        return load_hf(path, split, trace, limit, lenient)
    for spec in SHORT_NAMES.values():
        if spec["folder"] == path.name:
            key = split or spec["default"]
            if key in spec["files"] and (path / spec["files"][key]).is_file():
                return _load_file(path / spec["files"][key], split, trace, limit, lenient)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES)
    chosen = [p for p in files if split is not None and p.stem == split]
    if split is None and len(files) == 1:
        chosen = files
    if len(chosen) == 1:
        return _load_file(chosen[0], split, trace, limit, lenient)
    known = [spec for spec in SHORT_NAMES.values() if spec["folder"] == path.name]
    if known or any(p.suffix.lower() == ".txt" for p in files):  # plain files datasets would misread
        splits = f"; splits: {sorted(known[0]['files'])}" if known else ""
        raise SourceError(
            f"{path}: cannot pick a file for split {split!r}; data files here: {[p.name for p in files]}{splits}"
        )
    try:
        return load_hf(path, split, trace, limit, lenient)
    except (SourceError, ValueError, OSError) as exc:
        raise SourceError(
            f"{path}: cannot pick a file for split {split!r}; data files here: {[p.name for p in files]} "
            f"(and datasets could not read the folder: {exc})"
        ) from exc


def _is_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not source.lower().endswith(_DATA_SUFFIXES)


def load_examples(
    source: str | Path,
    split: str | None = None,
    trace: str = "equation",
    limit: int | None = None,
    lenient: bool = False,
) -> ExampleList:
    """Load math word problems as :class:`Example` records.

    ``source`` is one of:

    * ``"synthetic"`` or ``"synthetic:MIN-MAX"`` (steps per problem; splits train/val/test):
      :func:`kava_lab.synthetic.load_synthetic` (``limit`` or 2000 train / 500 otherwise);
    * a short name, ``"gsm8k"`` (splits train/test), ``"gsm8k-aug"`` (valid/test/middletrain/train_no_aug
      locally; train from the hub), ``"gsm-hard"``, ``"svamp"``, ``"multiarith"`` (None/"all": the 600 file,
      "test": the 180 split, "mawps": the simple form): the shared data folder (:func:`find_shared_data`)
      when it holds that split, else the hub id;
    * a local file or folder (format detected from the suffix and the first record's fields; a folder picks
      the file by ``split``; a ``save_to_disk`` folder or hub-schema file goes through ``datasets``); a
      relative path not found from the working directory is also looked up in the shared data folder;
    * a hub id ``owner/name``, through ``datasets.load_dataset(id, split=split or "train")``.

    ``trace``: "equation" (``<<...>>`` steps) or "nl" (natural language). ``limit``: first N examples.
    ``lenient``: skip malformed rows (listed in ``.report.skipped``, counted in a :class:`DataWarning`)
    instead of raising :class:`DataError`.
    """
    _check_args(trace, limit)
    text = str(source)

    if (text == "synthetic" or text.startswith("synthetic:")) and not isinstance(source, Path):
        from kava_lab.synthetic import load_synthetic

        items = load_synthetic(text, split, trace, limit)
        return ExampleList(items, LoadReport(source=text, loaded=len(items)))

    considered: list[str] = []
    key = text.lower()
    if key in SHORT_NAMES and not isinstance(source, Path):
        spec = SHORT_NAMES[key]
        want = split or spec["default"]
        shared = find_shared_data()
        if shared is not None and spec["folder"]:
            folder = shared / spec["folder"]
            if want in spec["files"]:
                candidate = folder / spec["files"][want]
                if candidate.is_file():
                    return _load_file(candidate, want, trace, limit, lenient)
                considered.append(str(candidate))
            else:
                considered.append(f"{folder} (local splits: {sorted(spec['files'])}; none is {want!r})")
        elif spec["folder"]:
            considered.append("shared data folder: not found ($KAVA_LAB_DATA, <repo>/../shared/data, ./../shared/data)")
        return load_hf(spec["hub"], split, trace, limit, lenient, considered=considered)

    path = Path(text).expanduser()
    considered.append(str(path.resolve()))
    if not path.exists() and not path.is_absolute():
        shared = find_shared_data()
        if shared is not None:
            considered.append(str(shared / path))
            if (shared / path).exists():
                path = shared / path
    if path.is_dir():
        return _load_folder(path, split, trace, limit, lenient)
    if path.is_file():
        return _load_file(path, split, trace, limit, lenient)
    if _is_hub_id(text):
        return load_hf(text, split, trace, limit, lenient, considered=considered)
    raise SourceError(
        f"unknown data source {text!r}: not 'synthetic', not a short name ({sorted(SHORT_NAMES)}), "
        f"no such file or folder (tried: {considered}), and not a hub id of the form 'owner/name'"
    )
