"""Deterministic GSM8k-style word problems with a chosen number of dependent arithmetic steps, in two trace styles.

Every problem has an equation-only trace (``<<12+5=17>> <<17*3=51>>``, like GSM8k-AUG) and a
natural-language trace of the same reasoning (``Tom buys 5 more, so he has 12 + 5 = 17 apples.``, like
GSM8k-AUG-NL). The split is decided by a hash of the question text (two problems in ten go to ``test``,
one in ten to ``val``, the rest to ``train``), so the splits are disjoint at any size, and each split is drawn
from its own seed stream. ``val`` is carved from the training distribution for choosing recipes; ``test``
is only for the numbers a README reports.

Difficulty axis: the number of steps, a chain of dependent values (each step applies one operation to the
previous result). ``"synthetic"`` is 2-4 steps; ``"synthetic:3-6"`` is 3 to 6 steps, uniformly. A 4-layer
model answering directly (No-CoT) computes short chains in its one pass; longer chains need the
intermediate values written down (CoT) or carried by latents.

Second axis, the order of the facts (``OPS``): in ``"any"`` and ``"alternate"`` problems the question states the
steps in the order they apply, so a model can fold them left to right over the question's own positions
(No-CoT reached 84% on 5-8 alternating steps). ``"shuffled"`` states a chain of people, each defined from
another ("Tom gives Anna * 3."), in a random order: the answer needs one lookup per step
(find who the current person is defined from), a serial depth that one pass of a shallow model cannot buy
by reading left to right. Its CoT walks the chain in order, one person per step.
"""

from __future__ import annotations

import hashlib
import random
import re

from .data import Example

NAMES = [
    ("Tom", "he", "his"), ("Anna", "she", "her"), ("Ben", "he", "his"), ("Maria", "she", "her"),
    ("Sam", "he", "his"), ("Lily", "she", "her"), ("Omar", "he", "his"), ("Nina", "she", "her"),
    ("Leo", "he", "his"), ("Zoe", "she", "her"), ("Ravi", "he", "his"), ("Emma", "she", "her"),
]
ITEMS = [
    "apples", "books", "marbles", "stickers", "cookies", "pencils", "shells", "coins",
    "cards", "stamps", "eggs", "flowers", "toys", "candies", "beads", "rocks",
]

# For each operation: question sentence variants and NL-trace sentence variants.
# Fields: {name} {pro} {pos} {item} {b} {v} (value before) {r} (result) {eq} (e.g. "12 + 5 = 17").
_Q = {
    "+": ["{Pro} buys {b} more {item}.", "A friend gives {pos} {b} more {item}.", "{Pro} finds {b} more {item}."],
    "-": ["{Pro} gives {b} {item} to a friend.", "{Pro} loses {b} {item}.", "{Pro} uses {b} of the {item}."],
    "*": ["Then the number of {item} grows to {b} times as many.", "{Pro} ends up with {b} times as many {item}."],
    "/": ["{Pro} splits the {item} into {b} equal groups and keeps one group.",
          "{Pro} shares the {item} equally with {friends} and keeps one share."],
}
_NL = {
    "+": ["After buying {b} more, {pro} has {eq} {item}.", "With {b} more {item}, {pro} has {eq}."],
    "-": ["After giving away {b}, {pro} has {eq} {item} left.", "{Name} is left with {eq} {item}."],
    "*": ["{b} times as many {item} is {eq}.", "Now {pro} has {eq} {item}."],
    "/": ["One of {b} equal groups is {eq} {item}.", "Each share is {eq} {item}."],
}


SPLITS = ("train", "val", "test")
# "any": each step picks any allowed operation (mostly + and -, which commute: a model can add the signed
# operands in parallel, so longer chains add little serial depth); "alternate": additive and multiplicative
# steps alternate, so the order of the operations matters at every step; "shuffled": alternating operations
# over a chain of people stated in a random order (at most len(NAMES) - 1 = 11 steps).
OPS = ("any", "alternate", "shuffled")


def _split_of(question: str) -> str:
    bucket = int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10
    return "test" if bucket < 2 else "val" if bucket == 2 else "train"


# Bumped whenever the generator's output changes, so cached artefacts built from it are rebuilt.
# v4: three-way split (train / val / test) and the step-count spec.
# v5: "shuffled" equation traces name the person each step computes ("<<Zoe: 16+7=23>>"); other tasks unchanged.
# v6: ... with the name as the question's token ("<< Zoe: 16+7=23>>"); other tasks unchanged.
# v7: "shuffled" facts name the source first ("Ben + 3 gives Anna.") and each CoT step copies its fact.
# v8: ... the target right after the source ("Ben gives Anna + 3.").
VERSION = 8
MAX_VALUE = 60  # every intermediate stays in [1, MAX_VALUE] and operands are single digits, so a
# 1M-parameter model trained for minutes can learn the arithmetic (values up to 120 with two-digit
# operands gave 7.7% CoT accuracy after 1,200 steps; up to 999 gave 3.3%)


def _scalable(v: int) -> bool:
    """A multiplicative step (* or /) can follow ``v``."""
    return 2 * v <= MAX_VALUE or v % 2 == 0 or v % 3 == 0


def _next_step(rng: random.Random, v: int, kind: str = "any") -> tuple[str, int, int]:
    """Pick an operation and operand that keep every intermediate an integer in [1, MAX_VALUE].

    ``kind``: "any" (every allowed operation), "additive" (+ or -, leaving a value that a multiplicative
    step can follow), "multiplicative" (* or /; the caller guarantees one is possible)."""
    options = []
    if kind != "multiplicative":
        if v + 2 <= MAX_VALUE:
            options.append("+")
        if v > 2:
            options.append("-")
    if kind != "additive":
        if 2 * v <= MAX_VALUE:
            options.append("*")
        if [b for b in range(2, 4) if v % b == 0]:
            options.append("/")
    divisors = [b for b in range(2, 4) if v % b == 0]
    op = rng.choice(options)
    if op == "+":
        choices = range(2, min(9, MAX_VALUE - v) + 1)
        b = rng.choice([b for b in choices if kind != "additive" or _scalable(v + b)] or list(choices))
    elif op == "-":
        choices = range(1, min(9, v - 1) + 1)
        b = rng.choice([b for b in choices if kind != "additive" or _scalable(v - b)] or list(choices))
    elif op == "*":
        b = rng.randint(2, max(2, min(3, MAX_VALUE // v)))
    else:
        b = rng.choice(divisors)
    r = {"+": v + b, "-": v - b, "*": v * b, "/": v // b}[op]
    return op, b, r


# A shuffled-walk fact as the question states it and each CoT step copies it ("Ben gives Anna + 3"): source,
# target, operator, operand. Kept beside the format it parses (scripts/cot_errors.py reads CoTs with it).
FACT = re.compile(r"(\w+) gives (\w+) ([-+*/]) (\d+)")


def _shuffled_problem(rng: random.Random, n_steps: int) -> tuple[str, list[str], list[str], list[int]]:
    """A chain of ``n_steps + 1`` people, each after the first defined from the one before by one operation
    (additive and multiplicative alternate, so the order matters), stated in a random order. Only words of
    the tiny tokenizer's vocabulary are used, so the tiny backbone is unchanged."""
    people = [name for name, _, _ in rng.sample(NAMES, n_steps + 1)]
    item = rng.choice(ITEMS)
    v = rng.choice([x for x in range(2, 31) if any(_scalable(x + d) for d in range(-min(9, x - 1), 10))])
    facts = [f"{people[0]} has {v} {item}."]
    eq_steps, nl_steps, values = [], [], []
    for i in range(n_steps):
        kind = "additive" if i % 2 == 0 else "multiplicative"
        if kind == "multiplicative" and not _scalable(v):
            kind = "any"
        op, b, r = _next_step(rng, v, kind)
        # source first, target next to it ("Ben gives Anna + 3."), and each CoT step opens by copying its fact
        # verbatim: the step's lookup is then a short induction copy (find the fact that starts with the person
        # just computed, continue it). Target-first facts ("Anna has as many apples as Ben + 3.", v4-v6) put the
        # name to write before the matched one (CoT 16-17% val at 2,000 stage-0 steps); v7's "Ben + 3 gives
        # Anna." put it five tokens after: at 5,000 steps source, operator and operand were copied, the target
        # mostly not (18.3% val).
        fact = f"{people[i]} gives {people[i + 1]} {op} {b}"
        facts.append(f"{fact}.")
        nl_steps.append(f"{fact}, and {people[i + 1]} has {v} {op} {b} = {r} {item}.")
        eq_steps.append(f"<< {fact}: {v}{op}{b}={r}>>")
        values.append(r)
        v = r
    rng.shuffle(facts)
    question = " ".join(facts) + f" How many {item} does {people[-1]} have now?"
    return question, eq_steps, nl_steps, values


def _problem(rng: random.Random, n_steps: int, ops: str = "any") -> tuple[str, list[str], list[str], list[int]]:
    if ops == "shuffled":
        return _shuffled_problem(rng, n_steps)
    name, pro, pos = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    v = rng.randint(2, 30)
    if ops == "alternate":  # start where a multiplicative step can follow the first additive one
        v = rng.choice([x for x in range(2, 31) if any(_scalable(x + d) for d in range(-min(9, x - 1), 10))])
    question = [f"{name} has {v} {item}."]
    eq_steps, nl_steps, values = [], [], []
    for i in range(n_steps):
        kind = "any" if ops == "any" else ("additive" if i % 2 == 0 else "multiplicative")
        if kind == "multiplicative" and not _scalable(v):
            kind = "any"  # cannot happen when the additive step found a scalable value; never stall
        op, b, r = _next_step(rng, v, kind)
        fields = dict(Name=name, name=name, Pro=pro.capitalize(), pro=pro, pos="him" if pro == "he" else "her",
                      item=item, b=b, friends=f"{b - 1} friend" + ("s" if b > 2 else ""), eq=f"{v} {op} {b} = {r}")
        question.append(rng.choice(_Q[op]).format(**fields))
        nl_steps.append(rng.choice(_NL[op]).format(**fields))
        eq_steps.append(f"<<{v}{op}{b}={r}>>")
        values.append(r)
        v = r
    question.append(f"How many {item} does {name} have now?")
    return " ".join(question), eq_steps, nl_steps, values


def make_synthetic(n: int, split: str = "train", trace: str = "equation", seed: int = 0,
                   min_steps: int = 2, max_steps: int = 4, ops: str = "any") -> list[Example]:
    """``n`` problems of ``split`` ("train" or "test"), with ``trace`` "equation" or "nl".

    The same (n, split, seed) always gives the same problems, and the two trace styles give the
    same problems in the same order.
    """
    if ops not in OPS:
        raise ValueError(f"synthetic ops must be one of {OPS}, found {ops!r}")
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, found {split!r}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"synthetic steps must satisfy 1 <= min_steps <= max_steps, found {min_steps}-{max_steps}")
    if ops == "shuffled" and max_steps > len(NAMES) - 1:
        raise ValueError(f"synthetic 'shuffled' problems take at most {len(NAMES) - 1} steps (one name per person), "
                         f"found {max_steps}")
    if trace not in ("equation", "nl"):
        raise ValueError(f"trace must be 'equation' or 'nl', found {trace!r}")
    rng = random.Random(f"kava-synthetic/{seed}/{split}")
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < n:
        question, eq_steps, nl_steps, values = _problem(rng, rng.randint(min_steps, max_steps), ops)
        if _split_of(question) != split or question in seen:
            continue
        seen.add(question)
        answer = str(values[-1])
        out.append(Example(question=question, steps=tuple(eq_steps if trace == "equation" else nl_steps),
                           answer=answer, answer_value=float(values[-1]), source=f"synthetic/{split}",
                           id=f"synthetic/{seed}/{split}/{len(out)}", step_values=tuple(float(x) for x in values)))
    return out


def parse_spec(source: str) -> tuple[int, int, str]:
    """``"synthetic"`` -> (2, 4, "any"); ``"synthetic:3-6"`` -> (3, 6, "any"); ``"synthetic:5"`` -> (5, 5, "any");
    ``"synthetic:3-6:alternate"`` -> (3, 6, "alternate")."""
    if source == "synthetic":
        return 2, 4, "any"
    match = re.fullmatch(r"synthetic:(\d+)(?:-(\d+))?(?::(\w+))?", source)
    if not match:
        raise ValueError(f"synthetic source must be 'synthetic' or 'synthetic:MIN-MAX[:OPS]' (e.g. 'synthetic:3-6', "
                         f"'synthetic:3-6:alternate'), found {source!r}")
    lo = int(match.group(1))
    hi = int(match.group(2) or lo)
    ops = match.group(3) or "any"
    if not 1 <= lo <= hi:
        raise ValueError(f"synthetic source {source!r}: steps must satisfy 1 <= MIN <= MAX")
    if ops not in OPS:
        raise ValueError(f"synthetic source {source!r}: OPS must be one of {OPS}, found {ops!r}")
    if ops == "shuffled" and hi > len(NAMES) - 1:
        raise ValueError(f"synthetic source {source!r}: 'shuffled' problems take at most {len(NAMES) - 1} steps")
    return lo, hi, ops


def load_synthetic(source: str, split: str | None, trace: str, limit: int | None) -> list[Example]:
    """The ``load_examples`` entry for ``"synthetic[:MIN-MAX[:OPS]]"`` (``limit`` or 2000 train / 500 otherwise)."""
    lo, hi, ops = parse_spec(source)
    split = split or "train"
    n = limit if limit is not None else (2000 if split == "train" else 500)
    return make_synthetic(n, split=split, trace=trace, min_steps=lo, max_steps=hi, ops=ops)


_STEP = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/])\s*(\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def parse_step(step: str) -> tuple[float, str, float, float] | None:
    """``"<<12+5=17>>"`` or ``"... 12 + 5 = 17 apples."`` -> (12.0, "+", 5.0, 17.0); None if no equation."""
    match = _STEP.search(step)
    if match is None:
        return None
    a, op, b, r = match.groups()
    return float(a), op, float(b), float(r)


def counterfactual_answer(example: Example, donor: Example) -> float | None:
    """This problem's final step applied to the donor's value before its own final step.

    With drop-last the teacher's CoT stops one step short, so the latents are trained to carry the value
    before the final step; if a student's answer reads that value from (swapped-in) donor latents, it
    predicts this number. None when either trace has no parsable step.
    """
    if not example.steps or not donor.steps:
        return None
    mine, theirs = parse_step(example.steps[-1]), parse_step(donor.steps[-1])
    if mine is None or theirs is None:
        return None
    _, op, b, _ = mine
    return _OPS[op](theirs[0], b)


def n_steps(example: Example) -> int:
    """Number of reasoning steps of the problem (the trace's, dropped step included)."""
    return len(example.step_values) or len(example.steps)
