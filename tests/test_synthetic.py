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
