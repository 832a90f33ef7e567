"""scripts/cot_errors.py: the first step of a wrong CoT that does not copy its fact, by kind."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
Q = "Ann gives Ben + 3. Ben gives Cal * 2. Cal gives Dan + 5. Ann has 4 pens. How many pens does Dan have now?"


@pytest.fixture(scope="module")
def errors():
    spec = importlib.util.spec_from_file_location("cot_errors", ROOT / "scripts" / "cot_errors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("output, kind", [
    ("<< Ann gives Ben + 5: 4+5=9>> << Ben gives Cal * 2: 9*2=18>>", 0),  # Cal's + 5 bound to Ann's fact
    ("<< Ann gives Ben + 3: 4+3=7>> << Ben gives Cal + 5: 7+5=12>>", 1),  # another fact, operator and operand
    ("<< Ann gives Ben + 7: 4+7=11>>", 2),
    ("<< Ann gives Cal + 3: 4+3=7>>", 3),
    ("<< Ann gives Ben - 3: 4-3=1>>", 4),
    ("<< Ann gives Ben + 3: 4+3=8>> << Ben gives Cal * 2: 8*2=16>>", 5),  # an arithmetic slip, facts copied
])
def test_first_error_kinds(errors, output, kind):
    assert errors.first_error(Q, output) == errors.KINDS[kind]


def test_summary_counts_wrong_rows_and_splits_accuracy_by_shared_operators(errors, tmp_path, capsys):
    no_share = "Ann gives Ben + 3. Ben gives Cal * 2. Ann has 4 pens. How many pens does Cal have now?"
    rows = [{"correct": False, "question": Q, "output": "<< Ann gives Ben + 5: 4+5=9>>"},
            {"correct": True, "question": Q, "output": ""},
            {"correct": True, "question": no_share, "output": ""}]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert errors.main([str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["wrong"] == 1 and summary["first_error"] == {errors.KINDS[0]: 1}
    assert summary["by_operator_sharing"] == {"some facts share an operator": {"n": 2, "accuracy": 0.5},
                                              "no two facts share an operator": {"n": 1, "accuracy": 1.0}}
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"predictions.jsonl:2: not a prediction row"):
        errors.main([str(path)])
