import re

import pytest

from kava_lab.data import last_number, parse_number
from kava_lab.synthetic import make_synthetic


def test_deterministic_and_trace_styles_align():
    a, b = make_synthetic(50, trace="equation"), make_synthetic(50, trace="equation")
    assert a == b
    nl = make_synthetic(50, trace="nl")
    assert [e.question for e in a] == [e.question for e in nl]
    assert [e.answer for e in a] == [e.answer for e in nl]


def test_train_test_disjoint_and_seeded():
    train = {e.question for e in make_synthetic(2000, "train")}
    test = {e.question for e in make_synthetic(500, "test")}
    assert not train & test
    assert make_synthetic(5, seed=1) != make_synthetic(5, seed=0)


def test_steps_compute_the_answer():
    for e in make_synthetic(300, trace="equation"):
        assert 2 <= len(e.steps) <= 4
        values = []
        for step in e.steps:
            lhs, rhs = re.fullmatch(r"<<(.+)=(\d+)>>", step).groups()
            assert eval(lhs.replace("/", "//")) == int(rhs)
            values.append(float(rhs))
        assert values == list(e.step_values)
        assert values[-1] == e.answer_value == float(e.answer)


def test_nl_trace_mentions_each_result():
    for e in make_synthetic(100, trace="nl"):
        for step, value in zip(e.steps, e.step_values):
            assert f"= {int(value)}" in step


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_synthetic(3, split="valid")
    with pytest.raises(ValueError, match="trace"):
        make_synthetic(3, trace="latex")


@pytest.mark.parametrize("text,value", [("2,125", 2125), (".5", 0.5), ("-3", -3), ("18.0", 18)])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text,value", [("so 12 + 5 = 17. The answer is: 1,250", 1250), ("x -4.5", -4.5),
                                        ("none", None), ("answer is 7.", 7)])
def test_last_number(text, value):
    assert last_number(text) == value


def test_step_spec_val_split_and_alternating_ops():
    import re

    from kava_lab.loaders import load_examples
    from kava_lab.synthetic import OPS, n_steps, parse_spec

    assert parse_spec("synthetic") == (2, 4, "any")
    assert parse_spec("synthetic:3-6") == (3, 6, "any")
    assert parse_spec("synthetic:5") == (5, 5, "any")
    assert parse_spec("synthetic:3-6:alternate") == (3, 6, "alternate")
    for bad in ("synthetic:6-3", "synthetic:0-2", "synthetic:3-6:mixed", "synth:3"):
        with pytest.raises(ValueError, match="synthetic"):
            parse_spec(bad)
    splits = {s: load_examples("synthetic:3-6", split=s, trace="nl", limit=200) for s in ("train", "val", "test")}
    questions = {s: {e.question for e in ex} for s, ex in splits.items()}
    assert not questions["train"] & questions["val"] and not questions["train"] & questions["test"]
    assert not questions["val"] & questions["test"]
    assert {n_steps(e) for e in splits["val"]} == {3, 4, 5, 6}
    alt = load_examples("synthetic:3-6:alternate", split="train", trace="equation", limit=300)
    for e in alt:
        ops = [re.match(r"<<\d+([-+*/])", s).group(1) for s in e.steps]
        assert all((o in "+-") == (i % 2 == 0) for i, o in enumerate(ops)), (e.steps, ops)
        assert all(1 <= v <= 60 and v == int(v) for v in e.step_values)
    assert OPS == ("any", "alternate", "shuffled")


def test_shuffled_chain_states_facts_out_of_order_and_cot_walks_the_chain():
    import re

    from kava_lab.synthetic import NAMES, parse_spec, parse_step

    assert parse_spec("synthetic:4-7:shuffled") == (4, 7, "shuffled")
    with pytest.raises(ValueError, match="at most 11 steps"):
        parse_spec("synthetic:4-12:shuffled")
    with pytest.raises(ValueError, match="at most 11 steps"):
        make_synthetic(3, min_steps=2, max_steps=12, ops="shuffled")
    nl = make_synthetic(200, "train", trace="nl", min_steps=4, max_steps=7, ops="shuffled")
    eq = make_synthetic(200, "train", trace="equation", min_steps=4, max_steps=7, ops="shuffled")
    assert [e.question for e in nl] == [e.question for e in eq]
    in_order = 0
    for e, q in zip(nl, eq):
        roots = re.findall(r"(\w+) has (\d+) \w+\.", e.question)
        links = re.findall(r"(\w+) gives (\w+) ([-+*/]) (\d+)\.", e.question)
        assert len(roots) == 1 and len(roots) + len(links) == len(e.steps) + 1, e.question
        defined = {who: (int(v), None, None, None) for who, v in roots} | \
            {who: (None, src, op, int(b)) for src, who, op, b in links}
        assert len(defined) == len(roots) + len(links) and set(defined) <= {n for n, _, _ in NAMES}
        target = re.search(r"How many \w+ does (\w+) have now\?$", e.question).group(1)
        chain = [target]  # walk back from the asked person to the one whose count is given
        while defined[chain[-1]][0] is None:
            chain.append(defined[chain[-1]][1])
        assert len(chain) == len(defined), "every fact lies on the asked person's chain"
        value = defined[chain[-1]][0]
        for who, step_nl, step_eq, r in zip(reversed(chain[:-1]), e.steps, q.steps, e.step_values):
            _, src, op, b = defined[who]
            value = {"+": value + b, "-": value - b, "*": value * b, "/": value // b}[op]
            fact = f"{src} gives {who} {op} {b}"  # each step copies its fact, then computes
            assert step_nl.startswith(f"{fact}, and {who} has ") and step_eq.startswith(f"<< {fact}: ")
            assert parse_step(step_nl) == parse_step(step_eq)
            assert parse_step(step_eq)[1:] == (op, float(b), float(value)) and r == value
        assert 1 <= min(e.step_values) and max(e.step_values) <= 60 and e.answer == str(int(value))
        ops = [parse_step(s)[1] for s in q.steps]
        assert all((o in "+-") == (i % 2 == 0) for i, o in enumerate(ops)), ops
        order = [re.search(r"(\w+) (?:has \d+ \w+|[-+*/] \d+)\.$", f).group(1)
                 for f in re.findall(r"\w[^.?]*\.", e.question)]
        in_order += order == list(reversed(chain))
    assert in_order < 5, "facts are shuffled, not stated in the chain's order"


def test_generator_output_is_pinned_to_its_version():
    """If this fails, the generator's output changed: bump synthetic.VERSION (caches key on it) and update."""
    import hashlib

    from kava_lab.synthetic import VERSION

    text = repr([(e.question, e.steps) for e in make_synthetic(300, trace="nl", min_steps=3, max_steps=6)]
                + [(e.question, e.steps) for e in make_synthetic(100, "test")]
                + [(e.question, e.steps) for e in make_synthetic(100, "val", ops="alternate")])
    assert (VERSION, hashlib.sha1(text.encode()).hexdigest()[:12]) == (8, "57ce36bee4d1")  # v5-v8 left these alone
    shuffled = repr([(e.question, e.steps) for e in make_synthetic(100, "val", min_steps=4, max_steps=7, ops="shuffled")])
    assert hashlib.sha1(shuffled.encode()).hexdigest()[:12] == "8136c5577212"
