"""Deterministic GSM8k-style word problems with 2-4 arithmetic steps, in two trace styles.

Every problem has an equation-only trace (``<<12+5=17>> <<17*3=51>>``, like GSM8k-AUG) and a
natural-language trace of the same reasoning (``Tom buys 5 more, so he has 12 + 5 = 17 apples.``, like
GSM8k-AUG-NL). The split is decided by a hash of the question text (one problem in five goes to
``test``), so train and test are disjoint at any size, and each split is drawn from its own seed stream.
"""

from __future__ import annotations

import hashlib
import random

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


def _is_test(question: str) -> bool:
    return int(hashlib.sha1(question.encode()).hexdigest(), 16) % 5 == 0


# Bumped whenever the generator's output changes, so cached artefacts built from it are rebuilt.
VERSION = 3
MAX_VALUE = 60  # every intermediate stays in [1, MAX_VALUE] and operands are single digits, so a
# 1M-parameter model trained for minutes can learn the arithmetic (values up to 120 with two-digit
# operands gave 7.7% CoT accuracy after 1,200 steps; up to 999 gave 3.3%)


def _next_step(rng: random.Random, v: int) -> tuple[str, int, int]:
    """Pick an operation and operand that keep every intermediate an integer in [1, MAX_VALUE]."""
    options = []
    if v + 2 <= MAX_VALUE:
        options.append("+")
    if v > 2:
        options.append("-")
    if 2 * v <= MAX_VALUE:
        options.append("*")
    divisors = [b for b in range(2, 4) if v % b == 0]
    if divisors:
        options.append("/")
    op = rng.choice(options)
    if op == "+":
        b = rng.randint(2, min(9, MAX_VALUE - v))
    elif op == "-":
        b = rng.randint(1, min(9, v - 1))
    elif op == "*":
        b = rng.randint(2, max(2, min(3, MAX_VALUE // v)))
    else:
        b = rng.choice(divisors)
    r = {"+": v + b, "-": v - b, "*": v * b, "/": v // b}[op]
    return op, b, r


def _problem(rng: random.Random, n_steps: int) -> tuple[str, list[str], list[str], list[int]]:
    name, pro, pos = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    v = rng.randint(2, 30)
    question = [f"{name} has {v} {item}."]
    eq_steps, nl_steps, values = [], [], []
    for _ in range(n_steps):
        op, b, r = _next_step(rng, v)
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
                   min_steps: int = 2, max_steps: int = 4) -> list[Example]:
    """``n`` problems of ``split`` ("train" or "test"), with ``trace`` "equation" or "nl".

    The same (n, split, seed) always gives the same problems, and the two trace styles give the
    same problems in the same order.
    """
    if split not in ("train", "test"):
        raise ValueError(f"synthetic split must be 'train' or 'test', found {split!r}")
    if trace not in ("equation", "nl"):
        raise ValueError(f"trace must be 'equation' or 'nl', found {trace!r}")
    rng = random.Random(f"kava-synthetic/{seed}/{split}")
    want_test = split == "test"
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < n:
        question, eq_steps, nl_steps, values = _problem(rng, rng.randint(min_steps, max_steps))
        if _is_test(question) != want_test or question in seen:
            continue
        seen.add(question)
        answer = str(values[-1])
        out.append(Example(question=question, steps=tuple(eq_steps if trace == "equation" else nl_steps),
                           answer=answer, answer_value=float(values[-1]), source=f"synthetic/{split}",
                           id=f"synthetic/{seed}/{split}/{len(out)}", step_values=tuple(float(x) for x in values)))
    return out
