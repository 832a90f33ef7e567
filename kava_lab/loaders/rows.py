"""Rows in, examples out: the containers and errors of loading, the strict/lenient row collector, and the
readers that turn a file into numbered records (JSON lines, a JSON array with line numbers, text lines), each
record or the :class:`~kava_lab.data.DataError` that says why it is not one."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from kava_lab.data import DataError, Example, LoadReport

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


def _show(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _bad(where: str, field: str, expected: str, found: Any) -> DataError:
    return DataError(f"{where}: field {field!r}: expected {expected}, found {_show(found)}")

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
            while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("kava_lab.loaders"):
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


def _text_lines(path: Path) -> Iterator[tuple[int, str, str | DataError]]:
    """(line number, where, the line or a DataError) for line formats (iCoT text)."""
    for n, line in _lines(path):
        yield n, f"{path}, line {n}", line
