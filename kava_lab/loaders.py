"""Loaders for the real math word-problem formats: GSM8k, GSM8k-AUG (iCoT text and hub form), GSM-Hard,
SVAMP and MultiArith, from a local path, a short name, or a Hugging Face hub id.

Entry point: :func:`load_examples`. Every loader returns an :class:`ExampleList` (a ``list`` of
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
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from kava_lab.data import DataError, Example, LoadReport, format_number, parse_number

__all__ = [
    "ExampleList",
    "SourceError",
    "DataWarning",
    "load_examples",
    "find_shared_data",
    "load_gsm8k_jsonl",
    "load_icot_txt",
    "load_gsm_hard_jsonl",
    "load_svamp_json",
    "load_multiarith_json",
    "load_mawps_jsonl",
    "load_multiarith_processed_jsonl",
    "load_hf",
    "split_sentences",
    "split_equation_steps",
    "SHORT_NAMES",
]

TRACES = ("equation", "nl")


class SourceError(FileNotFoundError):
    """The source could not be found or fetched; the message lists everything that was tried."""


class DataWarning(UserWarning):
    """Lenient loading skipped malformed rows (they are listed in ``.report.skipped``)."""


class ExampleList(list):
    """A list of :class:`Example` with ``.report``, the :class:`LoadReport` of the load that made it."""

    def __init__(self, items: Iterable[Example] = (), report: LoadReport | None = None) -> None:
        super().__init__(items)
        self.report = report if report is not None else LoadReport(source="")

    def __repr__(self) -> str:
        return (
            f"ExampleList(n={len(self)}, source={self.report.source!r}, "
            f"skipped={len(self.report.skipped)})"
        )


# --------------------------------------------------------------------------------------------------------
# Short names and the shared data folder

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
    for p in (Path(__file__).resolve().parent.parent / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"):
        if p.is_dir():
            return p.resolve()
    return None


# --------------------------------------------------------------------------------------------------------
# Small parsing helpers

_CALC = re.compile(r"<<[^<>]*>>")
_EQ_STEP = re.compile(r"<<[^<>]*>>")
_FRACTION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*")
_TEMPLATE_COT = "Solve the arithmetic relations step by step"


def _show(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _bad(where: str, field: str, expected: str, found: Any) -> DataError:
    return DataError(f"{where}: field {field!r}: expected {expected}, found {_show(found)}")


def _answer_value(text: str) -> float:
    """parse_number, plus plain fractions ("2/5")."""
    try:
        return parse_number(text)
    except ValueError:
        m = _FRACTION.fullmatch(text.replace(",", ""))
        if m and float(m.group(2)) != 0:
            return float(m.group(1)) / float(m.group(2))
        raise


def _answer(raw: Any, where: str, field: str) -> tuple[str, float]:
    """(answer text without commas, float value) from a string or numeric gold answer."""
    if isinstance(raw, bool) or raw is None:
        raise _bad(where, field, "a number", raw)
    if isinstance(raw, (int, float)):
        value = float(raw)
        if not math.isfinite(value):
            raise _bad(where, field, "a finite number", raw)
        return format_number(value), value
    if isinstance(raw, str):
        text = raw.strip().replace(",", "").rstrip(".").strip()
        try:
            return text, _answer_value(text)
        except ValueError:
            raise _bad(where, field, "a number", raw) from None
    raise _bad(where, field, "a number", raw)


def _get(rec: dict, key: str, where: str, types: type | tuple[type, ...] = str) -> Any:
    if key not in rec:
        raise DataError(f"{where}: field {key!r}: missing (fields found: {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise _bad(where, key, names, value)
    return value


def _text(rec: dict, key: str, where: str) -> str:
    value = _get(rec, key, where, str).strip()
    if not value:
        raise _bad(where, key, "non-empty text", rec[key])
    return value


def _step_values(steps: tuple[str, ...]) -> tuple[float, ...]:
    """Results of ``<<expr=result>>`` steps, or () when any step has no numeric result."""
    values = []
    for step in steps:
        body = step[2:-2] if step.startswith("<<") and step.endswith(">>") else ""
        if "=" not in body:
            return ()
        try:
            values.append(_answer_value(body.rsplit("=", 1)[1]))
        except ValueError:
            return ()
    return tuple(values)


def _trace_kind(steps: Iterable[str]) -> str:
    return "equation" if all(_EQ_STEP.fullmatch(s) for s in steps) else "nl"


def _check_trace(steps: tuple[str, ...], trace: str, where: str, hint: str = "") -> None:
    if steps and _trace_kind(steps) != trace:
        kind = "equation-only (<<...>> steps)" if trace == "nl" else "natural-language"
        raise ValueError(
            f"{where}: this source holds {kind} CoT, so trace={trace!r} is not available from it"
            + (f"; {hint}" if hint else "")
        )


_NL_HINT = (
    "for natural-language traces use gsm8k/*.jsonl with trace='nl', gsm8k_aug/train_no_aug.txt, "
    "or the hub whynlp/gsm8k-aug-nl"
)
_EQ_HINT = "for equation traces use gsm8k/*.jsonl, gsm8k_aug/*.txt (not train_no_aug) or whynlp/gsm8k-aug"


def _hint(trace: str) -> str:
    return _NL_HINT if trace == "nl" else _EQ_HINT


def split_equation_steps(cot: str) -> list[str] | None:
    """Split ``"<<4-2=2>> <<2/.5=4>>"`` into ``["<<4-2=2>>", "<<2/.5=4>>"]``; ``[]`` for an empty CoT; None
    when the text is not a whitespace-separated sequence of ``<<...>>`` steps."""
    cot = cot.strip()
    if not cot:
        return []
    parts = re.split(r"(?<=>>)\s+(?=<<)", cot)
    return parts if all(_EQ_STEP.fullmatch(p) for p in parts) else None


_ABBREV = re.compile(r"(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|Mt|No|p\.m|a\.m|e\.g|i\.e|etc|approx)\.", re.I)
_OPENERS = frozenset(
    "The So He She It They That This There Then Since If In On Therefore Thus Let We His Her Their Each "
    "After Now And But For At To With When Adding Altogether Together Finally First Next Also Hence Lastly "
    "Overall".split()
)


def split_sentences(text: str) -> list[str]:
    """Split a one-line natural-language solution into steps.

    A step ends before a capitalised word (not "I") when the previous word ends a sentence (``.!?``, not an
    abbreviation such as "Mr."), or contains a digit, ``=`` or ``%`` (GSM8k lines often end with a bare
    result, ``... = $60 So now ...``), or when the capitalised word is a common sentence opener ("The", "So",
    "Then", ...) and the previous word does not end in ``,;:``. A digit after sentence punctuation also starts
    a step.
    """
    tokens = list(re.finditer(r"\S+", text))
    parts, start = [], 0
    for k in range(len(tokens) - 1):
        word, nxt = tokens[k].group(), tokens[k + 1].group()
        ends_sentence = bool(re.search(r"[.!?][\"')’”]*$", word)) and not _ABBREV.fullmatch(word)
        if re.match(r"[A-Z]", nxt) and not re.match(r"I\b", nxt):
            cut = ends_sentence or (
                not re.search(r"[,;:]$", word)
                and (bool(re.search(r"[\d=%]", word)) or re.sub(r"\W+$", "", nxt) in _OPENERS)
            )
        else:
            cut = ends_sentence and bool(re.match(r"\$?\d", nxt))
        if cut:
            parts.append(text[start : tokens[k].end()].strip())
            start = tokens[k + 1].start()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def _icot_steps(cot: str, where: str, trace: str) -> tuple[str, ...]:
    """Steps of an iCoT CoT string: ``<<...>>`` steps when it has any, else natural-language sentences."""
    if "<<" in cot:
        steps = split_equation_steps(cot)
        if steps is None:
            raise _bad(where, "cot", "<<...>> steps separated by whitespace", cot.strip())
    else:
        steps = split_sentences(cot.strip())
    steps_t = tuple(steps)
    _check_trace(steps_t, trace, where, _hint(trace))
    return steps_t


# --------------------------------------------------------------------------------------------------------
# Row collection (strict or lenient), readers


class _Rows:
    """Collects examples; raises on a bad row, or records it when lenient. Stops at ``limit``."""

    def __init__(self, source: str, limit: int | None, lenient: bool) -> None:
        self.out = ExampleList(report=LoadReport(source=source))
        self.limit = limit
        self.lenient = lenient

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.out) >= self.limit

    def add(self, make: Callable[[], Example]) -> None:
        try:
            self.out.append(make())
        except DataError as err:
            if not self.lenient:
                raise
            self.out.report.skipped.append(str(err))

    def finish(self) -> ExampleList:
        report = self.out.report
        report.loaded = len(self.out)
        if report.skipped:
            frame, level = sys._getframe(0), 1  # point the warning at the first caller outside this module
            while frame.f_back is not None and frame.f_globals.get("__name__") == __name__:
                frame, level = frame.f_back, level + 1
            warnings.warn(
                f"{report.source}: skipped {len(report.skipped)} malformed row(s) (lenient=True); "
                "see .report.skipped",
                DataWarning,
                stacklevel=level,
            )
        return self.out


def _label(path: Path) -> str:
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _check_args(trace: str, limit: int | None) -> None:
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, found {trace!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, found {limit!r}")


class NotUtf8(DataError):
    """A data file with bytes that are not UTF-8 (the message names file, line and byte)."""


def _lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """(1-based line number, line) for non-blank lines; a line that is not UTF-8 comes as a DataError naming
    file, line and byte, so strict loading raises it and lenient loading reports it as a skipped row."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield n, NotUtf8(f"{path}, line {n}: expected UTF-8 text, found byte 0x{raw[exc.start]:02x} at "
                                   f"column {exc.start + 1} ({exc.reason})")
                continue
            if line.strip():
                yield n, line


def _jsonl(path: Path) -> Iterator[tuple[int, str, dict | DataError]]:
    """(line number, where, record or the DataError describing why the line is not a JSON object)."""
    for n, line in _lines(path):
        where = f"{path}, line {n}"
        if isinstance(line, DataError):
            yield n, where, line
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, where, _bad(where, "<json>", f"a JSON object ({exc.msg} at column {exc.colno})", line)
            continue
        if not isinstance(rec, dict):
            yield n, where, _bad(where, "<json>", "a JSON object", rec)
            continue
        yield n, where, rec


def _json_array(path: Path) -> Iterator[tuple[int, str, dict | DataError]]:
    """(record number, where, record or DataError) for a JSON array of objects, with line numbers.

    A file that is not valid JSON as a whole raises DataError even when lenient (no row can be recovered)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise NotUtf8(f"{path}, line {line}: expected UTF-8 text, found byte 0x{raw[exc.start]:02x} "
                      f"({exc.reason})") from None
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")

    def fail(pos: int, what: str) -> DataError:
        line = text.count("\n", 0, pos) + 1
        return DataError(f"{path}, line {line}: expected {what}, found {_show(text[pos:pos + 40])}")

    i = ws.match(text, 0).end()
    if not text.startswith("[", i):
        raise fail(i, "a JSON array of objects")
    i = ws.match(text, i + 1).end()
    k, line, counted = 0, 1, 0
    if text.startswith("]", i):
        return
    while True:
        try:
            rec, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
        line += text.count("\n", counted, i)
        counted = i
        k += 1
        where = f"{path}, record {k} (line {line})"
        yield k, where, rec if isinstance(rec, dict) else _bad(where, "<json>", "a JSON object", rec)
        i = ws.match(text, j).end()
        if text.startswith(",", i):
            i = ws.match(text, i + 1).end()
        elif text.startswith("]", i):
            return
        else:
            raise fail(i, "',' or ']'")


# what the record builders return: (question, steps, (answer text, answer value))
_Parsed = tuple


def _raise(err: Exception) -> Any:
    raise err


def _from_records(
    records: Iterator[tuple[int, str, dict | DataError]],
    label: str,
    build: Callable[[dict, str, str], _Parsed],
    trace: str,
    limit: int | None,
    lenient: bool,
) -> ExampleList:
    rows = _Rows(label, limit, lenient)
    for n, where, rec in records:
        if rows.full:
            break
        if isinstance(rec, DataError):
            rows.add(lambda rec=rec: _raise(rec))
        else:
            rows.add(lambda rec=rec, where=where, n=n: _ex(build(rec, where, trace), label, f"{label}:{n}"))
    return rows.finish()


# --------------------------------------------------------------------------------------------------------
# Record builders: one per schema (shared by the file loaders and the datasets/hub path)


def _ex(parsed: _Parsed, source: str, ident: str) -> Example:
    question, steps, (answer, value) = parsed
    vals = _step_values(steps) if steps and _trace_kind(steps) == "equation" else ()
    return Example(question, steps, answer, value, source=source, id=ident, step_values=vals)


def _gsm8k_solution(solution: str, where: str, trace: str) -> tuple[tuple[str, ...], tuple[str, float]]:
    if "####" not in solution:
        raise _bad(where, "answer", "a solution ending in '#### <number>'", solution[-60:])
    body, final = solution.rsplit("####", 1)
    answer = _answer(final, where, "answer (after ####)")
    if trace == "equation":
        steps = tuple(_CALC.findall(body))
    else:
        steps = tuple(s for s in (_CALC.sub("", line).strip() for line in body.split("\n")) if s)
    return steps, answer


def _build_gsm8k(rec: dict, where: str, trace: str) -> _Parsed:
    question = _text(rec, "question", where)
    steps, answer = _gsm8k_solution(_get(rec, "answer", where, str), where, trace)
    return question, steps, answer


def _build_gsm_hard(rec: dict, where: str, trace: str) -> _Parsed:
    question = _text(rec, "input", where)
    answer = _answer(_get(rec, "target", where, (int, float, str)), where, "target")
    return question, (), answer


_build_mawps = _build_gsm_hard  # {input, target}: same fields, no code


def _build_svamp(rec: dict, where: str, trace: str) -> _Parsed:
    if "Body" not in rec and "question_concat" in rec:
        question = _text(rec, "question_concat", where)
    else:
        question = f"{_text(rec, 'Body', where)} {_text(rec, 'Question', where)}"
    answer = _answer(_get(rec, "Answer", where, (int, float, str)), where, "Answer")
    return question, (), answer


def _build_multiarith(rec: dict, where: str, trace: str) -> _Parsed:
    question = _text(rec, "sQuestion", where)
    sols = _get(rec, "lSolutions", where, list)
    if len(sols) != 1:
        raise _bad(where, "lSolutions", "a list with exactly one number", sols)
    answer = _answer(sols[0], where, "lSolutions[0]")
    return question, (), answer


def _build_multiarith_processed(rec: dict, where: str, trace: str) -> _Parsed:
    question = _text(rec, "question", where)
    answer = _answer(_get(rec, "answer", where, (int, float, str)), where, "answer")
    return question, (), answer  # "cot" is a fixed template, not a trace


def _build_multiarith_hub(rec: dict, where: str, trace: str) -> _Parsed:
    question = _text(rec, "question", where)
    answer = _answer(_get(rec, "final_ans", where, (int, float, str)), where, "final_ans")
    return question, (), answer


def _build_steps(rec: dict, where: str, trace: str) -> _Parsed:
    """Hub form of GSM8k-AUG / AUG-NL: question, steps (list of str), answer."""
    question = _text(rec, "question", where)
    steps = _get(rec, "steps", where, (list, tuple))
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise _bad(where, f"steps[{i}]", "str", s)
    steps_t = tuple(s.strip() for s in steps if s.strip())
    _check_trace(steps_t, trace, where, _hint(trace))
    raw = _get(rec, "answer", where, (int, float, str))
    if isinstance(raw, str) and "####" in raw:
        raw = raw.rsplit("####", 1)[1]
    return question, steps_t, _answer(raw, where, "answer")


def _build_cot_string(rec: dict, where: str, trace: str) -> _Parsed:
    """zen-E/GSM8k-Aug style: question, cot (one string), answer."""
    question = _text(rec, "question", where)
    cot = _get(rec, "cot", where, str)
    steps = () if cot.strip().startswith(_TEMPLATE_COT) else _icot_steps(cot, where, trace)
    raw = _get(rec, "answer", where, (int, float, str))
    if isinstance(raw, str) and "####" in raw:
        raw = raw.rsplit("####", 1)[1]
    return question, steps, _answer(raw, where, "answer")


def _build_instruction(rec: dict, where: str, trace: str) -> _Parsed:
    """juyoung-trl/gsm-hard: instruction, response (best effort: '#### x', a bare number, else last number)."""
    from kava_lab.data import last_number

    question = _text(rec, "instruction", where)
    raw = _get(rec, "response", where, (int, float, str))
    if isinstance(raw, str):
        if "####" in raw:
            raw = raw.rsplit("####", 1)[1]
        else:
            try:
                _answer_value(raw.strip().replace(",", "").rstrip("."))
            except ValueError:
                found = last_number(raw)
                if found is None:
                    raise _bad(where, "response", "a text containing a number", raw) from None
                raw = found
    return question, (), _answer(raw, where, "response")


# (required keys, builder), first match wins
_SCHEMAS: list[tuple[frozenset[str], Callable[[dict, str, str], _Parsed], str]] = [
    (frozenset({"question", "steps", "answer"}), _build_steps, "{question, steps, answer} (GSM8k-AUG hub)"),
    (frozenset({"question", "cot", "answer"}), _build_cot_string, "{question, cot, answer}"),
    (frozenset({"question", "final_ans"}), _build_multiarith_hub, "{question, final_ans} (MultiArith hub)"),
    (frozenset({"question", "answer"}), _build_gsm8k, "{question, answer} (GSM8k)"),
    (frozenset({"instruction", "response"}), _build_instruction, "{instruction, response} (GSM-Hard hub)"),
    (frozenset({"input", "target"}), _build_gsm_hard, "{input, target} (GSM-Hard / MAWPS)"),
    (frozenset({"Answer"}), _build_svamp, "{Body, Question, Answer} (SVAMP)"),
    (frozenset({"sQuestion", "lSolutions"}), _build_multiarith, "{sQuestion, lSolutions} (MultiArith)"),
]


def _schema_for(keys: Iterable[str], where: str) -> Callable[[dict, str, str], _Parsed]:
    keys = set(keys)
    for need, build, _ in _SCHEMAS:
        if need <= keys:
            return build
    known = "; ".join(desc for _, _, desc in _SCHEMAS)
    raise DataError(f"{where}: unknown schema: fields {sorted(keys)}; expected one of {known}")


# --------------------------------------------------------------------------------------------------------
# One loader per local format


def load_gsm8k_jsonl(
    path: str | Path, trace: str = "equation", limit: int | None = None, lenient: bool = False
) -> ExampleList:
    """GSM8k jsonl ``{"question", "answer"}``; ``trace`` picks the ``<<...>>`` or natural-language view."""
    _check_args(trace, limit)
    path = Path(path).expanduser().resolve()
    return _from_records(_jsonl(path), _label(path), _build_gsm8k, trace, limit, lenient)


def load_icot_txt(
    path: str | Path, trace: str = "equation", limit: int | None = None, lenient: bool = False
) -> ExampleList:
    """iCoT line format ``QUESTION||<<4-2=2>> <<2/.5=4>> #### 300`` (GSM8k-AUG), or the same with a
    natural-language CoT (``train_no_aug.txt``, split by :func:`split_sentences`)."""
    _check_args(trace, limit)
    path = Path(path).expanduser().resolve()
    label = _label(path)
    rows = _Rows(label, limit, lenient)

    def build(n: int, line: str) -> Example:
        where = f"{path}, line {n}"
        if isinstance(line, DataError):
            raise line
        if "||" not in line:
            raise _bad(where, "line", "'QUESTION||COT #### ANSWER'", line)
        question, _, rest = line.partition("||")
        if not question.strip():
            raise _bad(where, "question", "non-empty text before '||'", question)
        if "####" not in rest:
            raise _bad(where, "answer", "'#### <number>' after the CoT", rest[-60:])
        cot, final = rest.rsplit("####", 1)
        answer = _answer(final, where, "answer (after ####)")
        steps = _icot_steps(cot, where, trace)
        return _ex((question.strip(), steps, answer), label, f"{label}:{n}")

    for n, line in _lines(path):
        if rows.full:
            break
        rows.add(lambda n=n, line=line: build(n, line))
    return rows.finish()


def load_gsm_hard_jsonl(
    path: str | Path, trace: str = "equation", limit: int | None = None, lenient: bool = False
) -> ExampleList:
    """GSM-Hard jsonl ``{"input", "code", "target"}``; float targets, steps=() (``code`` is not a trace)."""
    _check_args(trace, limit)
    path = Path(path).expanduser().resolve()
    return _from_records(_jsonl(path), _label(path), _build_gsm_hard, trace, limit, lenient)


def load_svamp_json(
    path: str | Path, trace: str = "equation", limit: int | None = None, lenient: bool = False
) -> ExampleList:
    """SVAMP JSON array ``{ID, Body, Question, Equation, Answer, Type}``; question = Body + " " + Question."""
    _check_args(trace, limit)
    path = Path(path).expanduser().resolve()
    return _from_records(_json_array(path), _label(path), _build_svamp, trace, limit, lenient)


def load_multiarith_json(
    path: str | Path, trace: str = "equation", limit: int | None = None, lenient: bool = False
) -> ExampleList:
    """``MultiArith.json``: JSON array ``{iIndex, sQuestion, lEquations, lSolutions, lAlignments}``."""
    _check_args(trace, limit)
    path = Path(path).expanduser().resolve()
    return _from_records(_json_array(path), _label(path), _build_multiarith, trace, limit, lenient)


def load_mawps_jsonl(
    path: str | Path, trace: str = "equation", limit: int | None = None, lenient: bool = False
) -> ExampleList:
    """``mawpsmultiarith.jsonl``: ``{input, target}`` (no final newline)."""
    _check_args(trace, limit)
    path = Path(path).expanduser().resolve()
    return _from_records(_jsonl(path), _label(path), _build_mawps, trace, limit, lenient)


def load_multiarith_processed_jsonl(
    path: str | Path, trace: str = "equation", limit: int | None = None, lenient: bool = False
) -> ExampleList:
    """The 180-problem MultiArith test split ``{id, question, cot, answer}``; ``cot`` is a template: steps=()."""
    _check_args(trace, limit)
    path = Path(path).expanduser().resolve()
    return _from_records(_jsonl(path), _label(path), _build_multiarith_processed, trace, limit, lenient)


# --------------------------------------------------------------------------------------------------------
# datasets: hub ids and local files/folders in a schema datasets can read


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
    build = _schema_for(ds.column_names, where)
    for i, rec in enumerate(ds):
        if rows.full:
            break
        n = i + 1
        rows.add(lambda rec=rec, n=n: _ex(build(rec, f"{where}, row {n}", trace), label, f"{ident_prefix}:{n}"))
    out = rows.finish()
    out.report.source = label
    return out


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
        return load_icot_txt(path, trace, limit, lenient)
    if suffix == ".jsonl":
        rec = _peek_jsonl(path)
        keys = set(rec) if rec is not None else set()
        if rec is None or ({"question", "answer"} <= keys and not keys & {"steps", "cot", "final_ans"}):
            return load_gsm8k_jsonl(path, trace, limit, lenient)  # also reports a broken first line
        if {"input", "target"} <= keys:
            loader = load_gsm_hard_jsonl if "code" in keys else load_mawps_jsonl
            return loader(path, trace, limit, lenient)
        if {"question", "cot", "answer"} <= keys and str(rec.get("cot", "")).startswith(_TEMPLATE_COT):
            return load_multiarith_processed_jsonl(path, trace, limit, lenient)
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
            return load_svamp_json(path, trace, limit, lenient)
        if isinstance(rec, dict) and {"sQuestion", "lSolutions"} <= set(rec):
            return load_multiarith_json(path, trace, limit, lenient)
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
