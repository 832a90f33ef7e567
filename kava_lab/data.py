"""Examples, answer parsing, and the errors every loader raises.

An :class:`Example` is one math word problem with a reasoning trace split into steps. Loaders for the
real formats live in :mod:`kava_lab.loaders`, the synthetic generator in :mod:`kava_lab.synthetic`, and
turning examples into token sequences in :mod:`kava_lab.encoding`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# Numbers in free text: optional sign, thousands commas, a missing leading zero (".5", "-3", "2,125").
_NUMBER_FIND = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


class DataError(ValueError):
    """A malformed input row: the message names file, line and field, expected vs found."""


def parse_number(text: str) -> float:
    """Parse a gold answer such as ``"2,125"``, ``".5"``, ``"-3"`` or ``"18.0"`` into a float.

    Raises ``ValueError`` naming the text when it is not a number.
    """
    s = str(text).strip().replace(",", "").replace("$", "").rstrip(".")
    if not s:
        raise ValueError("empty answer")
    try:
        value = float(s)
    except ValueError as exc:  # pragma: no cover - message is what matters
        raise ValueError(f"expected a number, found {text!r}") from exc
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"expected a finite number, found {text!r}")
    return value


def last_number(text: str) -> float | None:
    """The last number in free text (commas removed), or None: how generated answers are read."""
    found = [m for m in _NUMBER_FIND.findall(text) if any(c.isdigit() for c in m)]
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def answers_match(pred: float | None, gold: float, rel_tol: float = 1e-4, abs_tol: float = 1e-4) -> bool:
    """Numeric comparison with a tolerance for floats (GSM-Hard has non-integer targets)."""
    return pred is not None and math.isclose(pred, gold, rel_tol=rel_tol, abs_tol=abs_tol)


def format_number(value: float) -> str:
    """Render a number the way answers are written: integers without a decimal point."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@dataclass(frozen=True)
class Example:
    """One problem. ``steps`` is the reasoning trace, one string per step (may be empty)."""

    question: str
    steps: tuple[str, ...]
    answer: str
    answer_value: float
    source: str = ""
    id: str = ""
    # Optional per-step intermediate results (known for synthetic problems; used by linear probes).
    step_values: tuple[float, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "step_values", tuple(self.step_values))


@dataclass
class LoadReport:
    """What lenient loading skipped, so nothing is dropped silently."""

    source: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.source}: loaded {self.loaded}, skipped {len(self.skipped)}"
        return head + "".join(f"\n  - {s}" for s in self.skipped[:10]) + (
            f"\n  ... {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
        )
