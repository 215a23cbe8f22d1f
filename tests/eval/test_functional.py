"""Functional tests from a small HateCheck-format CSV written here, scored by a keyword scorer in plain
Python: pass rates equal the hand-counted ones, label_map relates the CSV's labels to the model's, and
a missing column or an unmapped label is an error naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.container import BarContainer

from fmdist.eval.fairness import wilson_interval
from fmdist.eval.functional import functional_tests, plot_functional

LABELS = ["negative", "positive"]
MAP = {"hateful": "negative", "non-hateful": "positive"}

# The scorer predicts positive (non-hateful) exactly when a text has more "good" than "bad".
# Hand count: derog 2 of 3 pass, counter 0 of 2, neutral 2 of 2, negation 1 of 2.
CSV = """functionality,case_id,test_case,label_gold,target_ident
derog,1,bad people,hateful,women
derog,2,"bad, bad people",hateful,women
derog,3,good people,hateful,women
counter,4,good is bad,non-hateful,
counter,5,bad bad good,non-hateful,
neutral,6,a good day,non-hateful,
neutral,7,good good,non-hateful,
negation,8,not bad,non-hateful,
negation,9,"not good, bad bad",hateful,
"""


def scorer(texts: list[str]) -> np.ndarray:
    z = np.array([t.count("good") - t.count("bad") for t in texts], dtype=float)
    p = 1 / (1 + np.exp(-2 * z))
    return np.stack([1 - p, p], axis=1)


@pytest.fixture
def hatecheck(tmp_path):
    path = tmp_path / "hatecheck.csv"
    path.write_text(CSV)
    return str(path)


def test_pass_rates_equal_the_hand_counted_ones_worst_first(hatecheck):
    result = functional_tests(scorer, hatecheck, LABELS, label_map=MAP, n_boot=200)
    table = {r["functionality"]: (r["n"], r["passed"]) for r in result["functionalities"]}
    assert table == {"derog": (3, 2), "counter": (2, 0), "neutral": (2, 2), "negation": (2, 1)}
    assert [r["functionality"] for r in result["functionalities"]] == ["counter", "negation", "derog", "neutral"]
    assert (result["n"], result["passed"], result["pass_rate"]) == (9, 5, 5 / 9)
    low, high = result["ci"]
    assert low < 5 / 9 < high
    derog = next(r for r in result["functionalities"] if r["functionality"] == "derog")
    assert derog["pass_rate"] == {"value": 2 / 3, "ci": wilson_interval(2, 3)}
    assert derog["failures"] == [
        {
            "row": 2,
            "text": "good people",
            "expected": "hateful",
            "predicted": "positive",
            "probability": scorer(["good"])[0, 1],
        }
    ]
    counter = next(r for r in result["functionalities"] if r["functionality"] == "counter")
    # The most confidently wrong failure first: "bad bad good" (net -1) before "good is bad" (net 0, a tie).
    assert [f["row"] for f in counter["failures"]] == [4, 3]
    json.dumps(result)  # plain values only


def test_wilson_interval_matches_published_values():
    assert wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)


def test_label_map_relates_the_csvs_labels_to_the_models(hatecheck, tmp_path):
    mapped = functional_tests(scorer, hatecheck, LABELS, label_map=MAP, n_boot=50)
    own = tmp_path / "own_labels.csv"
    own.write_text(CSV.replace("non-hateful", "positive").replace("hateful", "negative"))
    direct = functional_tests(scorer, str(own), LABELS, n_boot=50)
    assert direct["functionalities"] == [
        {**r, "failures": [{**f, "expected": MAP[f["expected"]]} for f in r["failures"]]}
        for r in mapped["functionalities"]
    ]
    # Swapping the map turns every pass into a failure.
    swapped = functional_tests(scorer, hatecheck, LABELS, label_map={"hateful": "positive", "non-hateful": "negative"})
    assert swapped["passed"] == 9 - mapped["passed"]


def test_other_column_names_are_given_by_role(tmp_path):
    path = tmp_path / "cases.csv"
    path.write_text("text,expected,group\ngood,positive,praise\nbad,positive,praise\nbad,negative,insult\n")
    result = functional_tests(
        scorer, str(path), LABELS, columns={"text": "text", "label": "expected", "functionality": "group"}
    )
    assert {r["functionality"]: r["passed"] for r in result["functionalities"]} == {"praise": 1, "insult": 1}


def test_a_missing_column_is_an_error_naming_file_column_and_columns_present(hatecheck):
    with pytest.raises(ValueError) as error:
        functional_tests(scorer, hatecheck, LABELS, label_map=MAP, columns={"label": "gold"})
    message = str(error.value)
    assert hatecheck in message and "'gold' (label)" in message and "'label_gold'" in message
    assert "'test_case'" not in message.split("its columns are")[0]


def test_an_unmapped_label_is_an_error_naming_it_and_the_fix(hatecheck):
    with pytest.raises(ValueError) as error:
        functional_tests(scorer, hatecheck, LABELS, label_map={"hateful": "negative"})
    message = str(error.value)
    assert "['non-hateful']" in message and hatecheck in message
    assert """--label-map '{"hateful": "negative", "non-hateful": "negative"}'""" in message


def test_plot_shows_the_worst_functionalities_with_their_intervals(hatecheck, tmp_path):
    result = functional_tests(scorer, hatecheck, LABELS, label_map=MAP, n_boot=50)
    fig = plot_functional(result, str(tmp_path / "functional.png"), worst=3)
    assert (tmp_path / "functional.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    assert [p.get_width() for p in ax.patches] == pytest.approx([0.0, 0.5, 2 / 3])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["counter (n=2)", "negation (n=2)", "derog (n=3)"]
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    spans = [[segment[0][0], segment[1][0]] for segment in bars.errorbar.lines[2][0].get_segments()]
    assert np.allclose(spans, [r["pass_rate"]["ci"] for r in result["functionalities"][:3]])
