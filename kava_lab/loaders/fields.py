"""Fields to examples: gold answers and numbers, CoT steps in both trace styles, and one record builder per
schema (GSM8k, GSM8k-AUG hub forms, GSM-Hard, SVAMP, MultiArith, iCoT lines), shared by the file loaders and the
``datasets`` path; :func:`schema_for` picks a builder from a record's fields."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Iterator

from kava_lab.data import DataError, Example, format_number, parse_number

from .rows import ExampleList, _bad, _Rows

_CALC = re.compile(r"<<[^<>]*>>")
_EQ_STEP = re.compile(r"<<[^<>]*>>")
_FRACTION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*")
_TEMPLATE_COT = "Solve the arithmetic relations step by step"

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


# what the record builders return: (question, steps, (answer text, answer value))
_Parsed = tuple


def _raise(err: Exception) -> Any:
    raise err


def _from_records(
    records: Iterator[tuple[int, str, Any]],
    label: str,
    build: Callable[[Any, str, str], _Parsed],
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


def _build_icot(line: str, where: str, trace: str) -> _Parsed:
    """iCoT line ``QUESTION||<<4-2=2>> <<2/.5=4>> #### 300`` (or a natural-language CoT, train_no_aug)."""
    if "||" not in line:
        raise _bad(where, "line", "'QUESTION||COT #### ANSWER'", line)
    question, _, rest = line.partition("||")
    if not question.strip():
        raise _bad(where, "question", "non-empty text before '||'", question)
    if "####" not in rest:
        raise _bad(where, "answer", "'#### <number>' after the CoT", rest[-60:])
    cot, final = rest.rsplit("####", 1)
    return question.strip(), _icot_steps(cot, where, trace), _answer(final, where, "answer (after ####)")


def _build_gsm8k(rec: dict, where: str, trace: str) -> _Parsed:
    question = _text(rec, "question", where)
    steps, answer = _gsm8k_solution(_get(rec, "answer", where, str), where, trace)
    return question, steps, answer


def _question_answer(question_key: str, answer_key: str, doc: str) -> Callable[[dict, str, str], _Parsed]:
    """A builder for eval-only schemas: question text from one field, gold answer from another, steps=()."""
    def build(rec: dict, where: str, trace: str) -> _Parsed:
        question = _text(rec, question_key, where)
        return question, (), _answer(_get(rec, answer_key, where, (int, float, str)), where, answer_key)

    build.__doc__ = doc
    return build


_build_gsm_hard = _question_answer("input", "target", "GSM-Hard jsonl {input, code, target}: code is not a trace")
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


_build_multiarith_processed = _question_answer(
    "question", "answer", "180-problem MultiArith split {id, question, cot, answer}: cot is a fixed template")
_build_multiarith_hub = _question_answer("question", "final_ans", "MultiArith hub form {question, final_ans}")


def _hashed_answer(rec: dict, where: str) -> tuple[str, float]:
    """The gold answer of the hub forms: a number, or a text whose part after ``####`` is one."""
    raw = _get(rec, "answer", where, (int, float, str))
    if isinstance(raw, str) and "####" in raw:
        raw = raw.rsplit("####", 1)[1]
    return _answer(raw, where, "answer")


def _build_steps(rec: dict, where: str, trace: str) -> _Parsed:
    """Hub form of GSM8k-AUG / AUG-NL: question, steps (list of str), answer."""
    question = _text(rec, "question", where)
    steps = _get(rec, "steps", where, (list, tuple))
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise _bad(where, f"steps[{i}]", "str", s)
    steps_t = tuple(s.strip() for s in steps if s.strip())
    _check_trace(steps_t, trace, where, _hint(trace))
    return question, steps_t, _hashed_answer(rec, where)


def _build_cot_string(rec: dict, where: str, trace: str) -> _Parsed:
    """zen-E/GSM8k-Aug style: question, cot (one string), answer."""
    question = _text(rec, "question", where)
    cot = _get(rec, "cot", where, str)
    steps = () if cot.strip().startswith(_TEMPLATE_COT) else _icot_steps(cot, where, trace)
    return question, steps, _hashed_answer(rec, where)


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


def schema_for(keys: Iterable[str], where: str) -> Callable[[dict, str, str], _Parsed]:
    keys = set(keys)
    for need, build, _ in _SCHEMAS:
        if need <= keys:
            return build
    known = "; ".join(desc for _, _, desc in _SCHEMAS)
    raise DataError(f"{where}: unknown schema: fields {sorted(keys)}; expected one of {known}")
