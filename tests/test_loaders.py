"""Loaders: the real files of ../shared/data (skipped when absent) and small hand-written files."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from kava_lab.data import DataError
from kava_lab.loaders import (
    DataWarning,
    ExampleList,
    SourceError,
    find_shared_data,
    load_examples,
    load_icot_txt,
    split_sentences,
)

SHARED = find_shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared data folder ../shared/data not found (set KAVA_LAB_DATA)")


# ------------------------------------------------------------------------------------------------------
# Real files: counts from ../shared/data/README.md

COUNTS = [
    ("gsm8k", "train", "equation", 7473),
    ("gsm8k", "test", "equation", 1319),
    ("gsm8k", "test", "nl", 1319),
    ("gsm8k-aug", "valid", "equation", 500),
    ("gsm8k-aug", "test", "equation", 1319),
    ("gsm8k-aug", "middletrain", "equation", 3000),
    ("gsm8k-aug", "train_no_aug", "nl", 6973),
    ("gsm-hard", None, "equation", 1319),
    ("svamp", None, "equation", 1000),
    ("multiarith", None, "equation", 600),
    ("multiarith", "mawps", "equation", 600),
    ("multiarith", "test", "equation", 180),
]

_cache: dict = {}


def load(source, split=None, trace="equation"):
    key = (source, split, trace)
    if key not in _cache:
        _cache[key] = load_examples(source, split=split, trace=trace)
    return _cache[key]


@needs_shared
@pytest.mark.parametrize("source,split,trace,count", COUNTS)
def test_shared_counts_and_answers(source, split, trace, count):
    xs = load(source, split, trace)
    assert isinstance(xs, ExampleList)
    assert len(xs) == count
    assert xs.report.loaded == count and xs.report.skipped == []
    assert all(math.isfinite(x.answer_value) for x in xs)
    assert all(x.question and x.question == x.question.strip() for x in xs)
    assert all("," not in x.answer for x in xs)
    assert len({x.id for x in xs}) == count
    first = xs[0]
    assert first.id.endswith(":1") and first.id.startswith(first.source + ":")


@needs_shared
def test_gsm8k_commas_and_ids():
    xs = load("gsm8k", "test")
    x = xs[146]  # line 147: "#### 2,125"
    assert x.id == "gsm8k/test.jsonl:147" and x.source == "gsm8k/test.jsonl"
    assert x.answer == "2125" and x.answer_value == 2125.0
    aug = load("gsm8k-aug", "test")[146]
    assert aug.answer == "2125" and aug.steps[-1] == "<<500+1500+125=2125>>"
    assert aug.question == x.question


@needs_shared
def test_gsm8k_nl_vs_equation_views():
    eq, nl = load("gsm8k", "test")[0], load("gsm8k", "test", "nl")[0]
    assert eq.question == nl.question and eq.answer == nl.answer == "18"
    assert eq.steps == ("<<16-3-4=9>>", "<<9*2=18>>") and eq.step_values == (9.0, 18.0)
    assert nl.steps == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "She makes 9 * 2 = $18 every day at the farmer’s market.",
    )
    # GSM8k's equation view matches the GSM8k-AUG test file (same problems, same order)
    assert load("gsm8k-aug", "test")[0].steps == eq.steps
    assert not any("<<" in s or ">>" in s for x in load("gsm8k", "test", "nl") for s in x.steps)
    assert all(s.startswith("<<") and s.endswith(">>") for x in load("gsm8k", "test") for s in x.steps)


@needs_shared
def test_gsm8k_aug_empty_cot_and_leading_dot():
    test = load("gsm8k-aug", "test")
    kyle = test[24]  # line 25: "...||  #### 26"
    assert kyle.steps == () and kyle.answer == "26" and kyle.id == "gsm8k_aug/test.txt:25"
    assert sum(1 for x in test if not x.steps) >= 10
    valid = load("gsm8k-aug", "valid")[0]
    assert valid.steps[:2] == ("<<4-2=2>>", "<<2/.5=4>>") and valid.step_values[:2] == (2.0, 4.0)
    assert valid.answer == "300"


@needs_shared
def test_middletrain_odd_answers():
    mt = load("gsm8k-aug", "middletrain")
    assert mt[2488].answer == "2/5" and mt[2488].answer_value == pytest.approx(0.4)  # "#### 2/5"
    assert mt[837].answer == "36"  # "#### 36."


@needs_shared
def test_train_no_aug_sentences():
    xs = load("gsm8k-aug", "train_no_aug", "nl")
    assert all(x.steps for x in xs)
    assert not any("<<" in s or "####" in s for x in xs for s in x.steps)
    assert xs[0].steps == (
        "The annual budget for policing is 32 / 2 = $16 million.",
        "The combined budget for education and policing is 16 + 12 = $28 million.",
        "There is 32 - 28 = $4 million to manage public spaces.",
    )
    with pytest.raises(ValueError, match="natural-language"):
        load_examples("gsm8k-aug", split="train_no_aug", trace="equation")
    with pytest.raises(ValueError, match="equation-only"):
        load_examples("gsm8k-aug", split="valid", trace="nl")


@needs_shared
def test_gsm_hard_float_targets():
    xs = load("gsm-hard")
    values = [x.answer_value for x in xs]
    assert xs[0].answer == "-9867630" and xs[0].answer_value == -9867630.0
    non_integer = sum(1 for v in values if not float(v).is_integer())
    assert 250 <= non_integer <= 350  # README: about 300
    assert sum(1 for v in values if v < 0) > 50
    assert all(x.steps == () for x in xs)


@needs_shared
def test_svamp_and_multiarith_fields():
    sv = load("svamp")[0]
    assert sv.question == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert sv.answer == "51" and sv.answer_value == 51.0 and sv.steps == ()
    ma, mawps = load("multiarith"), load("multiarith", "mawps")
    assert ma[0].question.startswith("For Halloween") and ma[0].answer == "39"
    assert [x.answer_value for x in ma] == [x.answer_value for x in mawps]
    assert [x.question for x in ma] == [x.question for x in mawps]
    t = load("multiarith", "test")
    assert t[0].answer == "10" and t[0].steps == ()


@needs_shared
def test_paths_folders_and_limit():
    by_path = load_examples(SHARED / "gsm8k" / "test.jsonl", limit=5)
    by_folder = load_examples(SHARED / "gsm8k", split="test", limit=5)
    by_relative = load_examples("gsm8k/test.jsonl", limit=5)  # looked up in the shared folder
    assert len(by_path) == 5 and by_path == by_folder == by_relative == load("gsm8k", "test")[:5]
    assert load_examples("multiarith", split="test", limit=0) == []


# ------------------------------------------------------------------------------------------------------
# Small files, no shared data needed


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def test_icot_small_file(tmp_path):
    path = write(
        tmp_path,
        "aug.txt",
        "Q one?||<<4-2=2>> <<2/.5=4>> #### 300\nQ two?|| #### 2,125\n\nQ three?||<<1,000+2=1002>> #### 1,002",
    )
    xs = load_examples(path)
    assert [x.steps for x in xs] == [("<<4-2=2>>", "<<2/.5=4>>"), (), ("<<1,000+2=1002>>",)]
    assert [x.answer for x in xs] == ["300", "2125", "1002"]
    assert [x.id for x in xs] == [f"{tmp_path.name}/aug.txt:{n}" for n in (1, 2, 4)]
    assert xs[0].step_values == (2.0, 4.0)
    assert load_icot_txt(path, limit=2) == xs[:2]


def test_gsm8k_small_file_both_views(tmp_path):
    sol = "She has 2 + 3 = <<2+3=5>>5 apples.\n\nThen 5 * 425 = <<5*425=2125>>2,125 seeds.\n#### 2,125"
    path = write(tmp_path, "g.jsonl", jsonl([{"question": " How many? ", "answer": sol}]))
    eq, nl = load_examples(path)[0], load_examples(path, trace="nl")[0]
    assert eq.question == "How many?" and eq.answer == "2125" and eq.answer_value == 2125
    assert eq.steps == ("<<2+3=5>>", "<<5*425=2125>>")
    assert nl.steps == ("She has 2 + 3 = 5 apples.", "Then 5 * 425 = 2,125 seeds.")


BAD_CASES = [
    # (file name, content, line, field)
    ("g.jsonl", jsonl([{"question": "q", "answer": "#### 1"}, "{not json"]), 2, "<json>"),
    ("g.jsonl", jsonl([{"question": "q", "answer": "#### 1"}, {"question": "q"}]), 2, "answer"),
    ("g.jsonl", jsonl([{"question": "q", "answer": "#### 1"}, {"question": 3, "answer": "#### 1"}]), 2, "question"),
    ("g.jsonl", jsonl([{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "#### lots"}]), 2, "answer (after ####)"),
    ("g.jsonl", jsonl([{"question": "q", "answer": "no final line"}]), 1, "answer"),
    ("a.txt", "q||<<1+1=2>> #### 2\nno separator #### 3\n", 2, "line"),
    ("a.txt", "q||<<1+1=2>> #### 2\n\nq||<<1+1=2>> 2\n", 3, "answer"),
    ("a.txt", "q||<<1+1=2>> junk #### 2\n", 1, "cot"),
    ("h.jsonl", jsonl([{"input": "q", "code": "", "target": 1.5}, {"input": "q", "code": "", "target": "x"}]), 2, "target"),
    ("m.jsonl", jsonl([{"input": "q", "target": 1}, {"input": "q", "target": None}]), 2, "target"),
    ("s.json", json.dumps([{"Body": "b", "Question": "q", "Answer": 1.0}, {"Body": "b", "Question": "q"}], indent=2), 7, "Answer"),
    ("ma.json", json.dumps([{"sQuestion": " q ", "lSolutions": [1.0]}, {"sQuestion": "q", "lSolutions": []}], indent=1), 8, "lSolutions"),
]


@pytest.mark.parametrize("name,content,line,field", BAD_CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_malformed_rows_raise(tmp_path, name, content, line, field):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load_examples(path)
    msg = str(info.value)
    assert str(path) in msg and f"line {line}" in msg and f"field {field!r}" in msg, msg


def test_lenient_skips_and_reports(tmp_path):
    rows = [{"question": "q1", "answer": "#### 1"}, "{oops", {"question": "q3"}, {"question": "q4", "answer": "#### 4"}]
    path = write(tmp_path, "g.jsonl", jsonl(rows))
    with pytest.raises(DataError):
        load_examples(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xs = load_examples(path, lenient=True)
    assert [x.answer for x in xs] == ["1", "4"] and [x.id.rsplit(":", 1)[1] for x in xs] == ["1", "4"]
    assert xs.report.loaded == 2 and len(xs.report.skipped) == 2
    assert "line 2" in xs.report.skipped[0] and "line 3" in xs.report.skipped[1]
    assert "field 'answer'" in xs.report.skipped[1]
    hits = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(hits) == 1 and "skipped 2" in str(hits[0].message)
    assert hits[0].filename == __file__  # the warning points at the caller, not at the loader
    # the trace mismatch is not a row error: lenient does not hide it
    nl = write(tmp_path, "nl.txt", "q||Some words. More words #### 3\n")
    with pytest.raises(ValueError, match="trace='equation'"):
        load_examples(nl, lenient=True)


def test_hub_schema_local_files_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"question": "Q1?", "steps": ["<<4-2=2>>", "<<2/.5=4>>"], "answer": "4"},
        {"question": "Q2?", "steps": [], "answer": "2,125"},
    ]
    path = write(tmp_path, "hub.jsonl", jsonl(rows))
    xs = load_examples(path)
    assert [x.steps for x in xs] == [("<<4-2=2>>", "<<2/.5=4>>"), ()]
    assert [x.answer_value for x in xs] == [4.0, 2125.0] and xs[1].answer == "2125"
    with pytest.raises(ValueError, match="equation-only"):
        load_examples(path, trace="nl")
    # a save_to_disk folder, with splits
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "saved"))
    test = load_examples(tmp_path / "saved", split="test")
    assert len(test) == 1 and test[0].question == "Q2?" and test[0].id.endswith("saved:1")
    assert len(load_examples(tmp_path / "saved", split="all")) == 3
    # a row with the wrong type is named by row and field
    bad = write(tmp_path, "hub_bad.jsonl", jsonl([rows[0], {"question": "Q3?", "steps": [], "answer": "many"}]))
    with pytest.raises(DataError, match=r"row 2: field 'answer'"):
        load_examples(bad)


def test_hub_unreachable_names_id_and_local_paths(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("KAVA_LAB_DATA", str(tmp_path))
    (tmp_path / "gsm8k_aug").mkdir()
    with pytest.raises(SourceError) as info:
        load_examples("someone/some-dataset")
    assert "someone/some-dataset" in str(info.value) and "unreachable" in str(info.value)
    with pytest.raises(SourceError) as info:  # the full AUG train split is hub-only
        load_examples("gsm8k-aug", split="train")
    msg = str(info.value)
    assert "whynlp/gsm8k-aug" in msg and "unreachable" in msg and str(tmp_path / "gsm8k_aug") in msg


def test_unknown_source_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="unknown data source 'no-such-dataset'.*gsm8k"):
        load_examples("no-such-dataset")
    with pytest.raises(SourceError, match="missing/test.jsonl"):
        load_examples("missing/test.jsonl")
    write(tmp_path, "x.yaml", "a: 1\n")
    with pytest.raises(SourceError, match="unknown file format"):
        load_examples(tmp_path / "x.yaml")
    with pytest.raises(ValueError, match="trace"):
        load_examples("gsm8k", trace="latent")


def test_find_shared_data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KAVA_LAB_DATA", str(tmp_path))
    assert find_shared_data() == tmp_path.resolve()


def test_split_sentences():
    text = (
        "He found 3*20=$60 So now he has 60+75=$135. Mr. Smith pays $7.50. The rest, Anna keeps. "
        "In total 11 passengers ride."
    )
    assert split_sentences(text) == [
        "He found 3*20=$60",
        "So now he has 60+75=$135.",
        "Mr. Smith pays $7.50.",
        "The rest, Anna keeps.",
        "In total 11 passengers ride.",
    ]
