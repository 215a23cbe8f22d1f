"""Perturbation robustness with keyword scorers in plain Python (no model): each perturbation touches only
what it says, rate 0 changes nothing, a seed reproduces, and a case-sensitive scorer's accuracy drop under
`case` has an interval above 0 while a case-insensitive one's is exactly 0."""

from __future__ import annotations

import json
import math
import random
import string

import numpy as np
import pytest
from matplotlib.container import BarContainer
from sklearn.metrics import f1_score

from fmdist.eval.robustness import (
    KEYBOARD_NEIGHBOURS,
    PERTURBATIONS,
    _macro_f1,
    load_synonyms,
    perturb,
    plot_robustness,
    robustness,
)

LABELS = ["negative", "positive"]
TEXTS = [
    "The film was good, really good!",
    "A bad plot; bad acting and a bad ending...",
    "Don't miss it: good fun for 2 hours.",
    "It's bad.  Truly BAD, I'm afraid.",
    "good",
    "1234 !!",
    "Quite good (mostly), said the critic.",
    "Not good? No: bad, bad, bad.",
]


def keyword_scorer(case_sensitive: bool, calls: list[list[str]] | None = None):
    """P(positive) rises with each "good" and falls with each "bad"; a tie predicts negative."""

    def probabilities(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(list(texts))
        out = []
        for text in texts:
            text = text if case_sensitive else text.lower()
            p = 1 / (1 + math.exp(-(text.count("good") - text.count("bad"))))
            out.append([1 - p, p])
        return np.array(out)

    return probabilities


def sentiment_data(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        texts.append(f"the {rng.choice(['film', 'plot', 'story'])} was {'good' if label else 'bad'} overall")
        labels.append(label)
    return texts, labels


def is_letter(c: str) -> bool:
    return c in string.ascii_letters


def test_rate_zero_changes_no_text_and_no_prediction():
    synonyms = {"good": ["fine"], "bad": ["poor"]}
    for name in [*PERTURBATIONS, "synonym"]:
        assert perturb(TEXTS, name, 0.0, seed=3, synonyms=synonyms) == TEXTS, name
    calls: list[list[str]] = []
    texts, labels = sentiment_data(40, seed=0)
    results = robustness(
        keyword_scorer(True, calls), texts, labels, LABELS, [(n, 0.0) for n in PERTURBATIONS], n_boot=50
    )
    for r in results:
        assert r["changed"] == 0 and r["examples"] == []
        assert r["drop"] == {"value": 0.0, "ci": [0.0, 0.0]} and r["flip_rate"] == {"value": 0.0, "ci": [0.0, 0.0]}
        assert r["macro_f1"]["drop"]["value"] == 0.0
    # The clean texts are scored once for all perturbations, and nothing unchanged is scored again.
    assert calls == [texts]


@pytest.mark.parametrize("name", ["typo", "typo_drop", "typo_insert", "typo_keyboard"])
def test_rate_one_typo_changes_every_text_with_a_letter(name):
    out = perturb(TEXTS, name, 1.0, seed=0)
    for text, changed in zip(TEXTS, out, strict=True):
        assert (changed != text) == any(is_letter(c) for c in text), (text, changed)


def test_a_seed_reproduces_and_another_seed_differs():
    first = perturb(TEXTS, "typo", 0.3, seed=1)
    assert perturb(TEXTS, "typo", 0.3, seed=1) == first
    assert perturb(TEXTS, "typo", 0.3, seed=2) != first
    # A text's perturbation depends on (seed, its index), not on the texts after it.
    assert perturb(TEXTS[:3], "typo", 0.3, seed=1) == first[:3]


def test_keyboard_neighbours_are_neighbours_on_a_qwerty_keyboard():
    assert KEYBOARD_NEIGHBOURS["q"] == "aw"
    assert KEYBOARD_NEIGHBOURS["g"] == "bfhtvy"
    assert KEYBOARD_NEIGHBOURS["s"] == "adewxz"
    assert KEYBOARD_NEIGHBOURS["m"] == "jkn"
    assert KEYBOARD_NEIGHBOURS["p"] == "lo"
    assert sorted(KEYBOARD_NEIGHBOURS) == list(string.ascii_lowercase)
    for key, near in KEYBOARD_NEIGHBOURS.items():
        assert all(key in KEYBOARD_NEIGHBOURS[other] for other in near), key
    for text, out in zip(TEXTS, perturb(TEXTS, "typo_keyboard", 1.0, seed=5), strict=True):
        assert len(out) == len(text)
        for a, b in zip(text, out, strict=True):
            if is_letter(a):
                assert b.lower() in KEYBOARD_NEIGHBOURS[a.lower()] and b.isupper() == a.isupper()
            else:
                assert a == b


def test_swap_keeps_the_characters_and_moves_only_letters():
    for text, out in zip(TEXTS, perturb(TEXTS, "typo_swap", 1.0, seed=0), strict=True):
        assert sorted(out) == sorted(text)
        assert [i for i, c in enumerate(out) if not is_letter(c)] == [i for i, c in enumerate(text) if not is_letter(c)]
    assert perturb(["abcd"], "typo_swap", 1.0)[0] == "badc"


@pytest.mark.parametrize("name", ["typo", "typo_drop", "typo_insert"])
def test_typos_leave_everything_but_letters_alone(name):
    for text, out in zip(TEXTS, perturb(TEXTS, name, 0.5, seed=4), strict=True):
        assert [c for c in out if not is_letter(c)] == [c for c in text if not is_letter(c)]
    dropped = perturb(TEXTS, "typo_drop", 1.0)
    assert dropped == ["".join(c for c in t if not is_letter(c)) for t in TEXTS]
    inserted = perturb(["good"], "typo_insert", 1.0)[0]
    assert inserted[::2] == "good" and all(
        b in KEYBOARD_NEIGHBOURS[a] for a, b in zip("good", inserted[1::2], strict=True)
    )


def test_case_changes_only_case_and_recases_whole_words():
    for name in ("case", "case_char"):
        for text, out in zip(TEXTS, perturb(TEXTS, name, 0.5, seed=2), strict=True):
            assert out.lower() == text.lower()
    assert perturb(["Don't shout, GOOD film 42"], "case", 1.0) == ["DON'T SHOUT, good FILM 42"]
    assert perturb(["Don't"], "case_char", 1.0) == ["dON'T"]


def test_punctuation_leaves_letters_and_spaces_alone():
    def strip(text: str) -> str:
        return "".join(c for c in text if c not in string.punctuation)

    for name in ("punctuation", "punctuation_drop", "punctuation_insert"):
        for text, out in zip(TEXTS, perturb(TEXTS, name, 0.5, seed=6), strict=True):
            assert strip(out) == strip(text), (name, text, out)
    assert perturb(TEXTS, "punctuation_drop", 1.0) == [strip(t) for t in TEXTS]
    inserted = perturb(["so good it is"], "punctuation_insert", 1.0)[0]
    assert inserted.split() == [w + inserted.split()[i][-1] for i, w in enumerate("so good it is".split())]
    assert all(w[-1] in ",.;:" for w in inserted.split())


def test_whitespace_leaves_everything_else_alone():
    for name in ("whitespace", "whitespace_double", "whitespace_drop"):
        for text, out in zip(TEXTS, perturb(TEXTS, name, 0.5, seed=7), strict=True):
            assert "".join(out.split()) == "".join(text.split())
    assert perturb(["a b  c"], "whitespace_double", 1.0) == ["a  b    c"]
    assert perturb(["a b  c"], "whitespace_drop", 1.0) == ["abc"]


def test_a_case_sensitive_scorer_loses_accuracy_under_case_and_an_insensitive_one_does_not():
    texts, labels = sentiment_data(80, seed=1)
    sensitive = robustness(keyword_scorer(True), texts, labels, LABELS, [("case", 0.5)], n_boot=300)[0]
    assert sensitive["clean"] == 1.0
    assert sensitive["drop"]["value"] > 0.1 and sensitive["drop"]["ci"][0] > 0
    assert sensitive["flip_rate"]["ci"][0] > 0
    insensitive = robustness(keyword_scorer(False), texts, labels, LABELS, [("case", 0.5)], n_boot=300)[0]
    assert insensitive["changed"] > 0.5
    assert insensitive["drop"] == {"value": 0.0, "ci": [0.0, 0.0]} and insensitive["flip_rate"]["value"] == 0.0


def test_the_drop_is_the_hand_counted_accuracy_gap_and_macro_f1_is_sklearns():
    texts, labels = sentiment_data(60, seed=2)
    record = robustness(keyword_scorer(True), texts, labels, LABELS, [("case_char", 0.3)], n_boot=100)[0]
    perturbed = perturb(texts, "case_char", 0.3, seed=0)
    predicted = [int("good" in t and "bad" not in t) for t in perturbed]
    accuracy = sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
    assert record["perturbed"] == pytest.approx(accuracy) and record["drop"]["value"] == pytest.approx(1 - accuracy)
    assert record["macro_f1"]["perturbed"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert record["flip_rate"]["value"] == pytest.approx(1 - accuracy)
    low, high = record["drop"]["ci"]
    assert low <= record["drop"]["value"] <= high
    # The bootstrap's vectorised macro-F1 agrees with sklearn's on resamples, absent labels included.
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, (20, 15)), rng.integers(0, 3, (20, 15))
    y_true[0], y_pred[0] = 0, 1
    expected = [
        f1_score(t, p, labels=[0, 1, 2], average="macro", zero_division=0) for t, p in zip(y_true, y_pred, strict=True)
    ]
    assert _macro_f1(y_true, y_pred, 3) == pytest.approx(expected)


def test_flip_examples_show_predictions_before_and_after():
    texts, labels = sentiment_data(30, seed=3)
    record = robustness(keyword_scorer(True), texts, labels, LABELS, [("case", 1.0)], max_examples=4, n_boot=20)[0]
    flips = sum(labels)  # every "good" becomes "GOOD": each positive text flips to a tie, predicted negative
    assert record["flip_rate"]["value"] == pytest.approx(flips / len(texts))
    assert len(record["examples"]) == 4
    for example in record["examples"]:
        assert example["perturbed"] == example["original"].upper()
        assert example["gold"] == "positive" and example["before"].startswith("positive (")
        assert example["after"] == "negative (0.500)" and example["after_probability"] == 0.5
        assert example["before_probability"] == pytest.approx(1 / (1 + math.exp(-1)))
    json.dumps(record)  # plain values only, no default= needed


def test_unlabelled_data_gets_flip_rates_only():
    texts, _ = sentiment_data(30, seed=4)
    record = robustness(keyword_scorer(True), texts, None, LABELS, [("case", 1.0)], n_boot=20)[0]
    assert record["drop"] is None and record["macro_f1"] is None and record["clean"] is None
    assert record["flip_rate"]["value"] > 0 and all(e["gold"] is None for e in record["examples"])


def test_a_users_synonym_table_swaps_words_keeping_their_case(tmp_path):
    yaml_file = tmp_path / "lexicon.yaml"
    yaml_file.write_text("good: [fine, great]\nFilm: movie\n")
    csv_file = tmp_path / "lexicon.csv"
    csv_file.write_text("word,synonyms\ngood,fine,great\nfilm,movie\n")
    table = load_synonyms(str(yaml_file))
    assert table == load_synonyms(str(csv_file)) == {"good": ["fine", "great"], "film": ["movie"]}
    out = perturb(["The Film was GOOD, good indeed"], "synonym", 1.0, seed=0, synonyms=table)[0]
    words = out.replace(",", "").split()
    assert words[0] == "The" and words[1] == "Movie" and words[3] in ("FINE", "GREAT") and words[4] in ("fine", "great")
    with pytest.raises(ValueError, match="synonym table"):
        perturb(TEXTS, "synonym", 0.5)


def test_bad_names_and_rates_are_errors_naming_them():
    with pytest.raises(ValueError, match="'typos'.*typo_swap"):
        perturb(TEXTS, "typos", 0.1)
    # Every bad perturbation is named in one error, before any text is scored.
    with pytest.raises(ValueError, match="rate 1.5.*'synonym' needs a synonym table") as error:
        robustness(keyword_scorer(False), TEXTS, None, LABELS, [("typo", 1.5), ("case", 0.1), ("synonym", 0.2)])
    assert "'case'" not in str(error.value)


def test_plot_has_a_bar_per_perturbation_and_error_bars(tmp_path):
    texts, labels = sentiment_data(40, seed=5)
    pairs = [("typo", 0.0), ("case", 0.5), ("punctuation", 0.5)]
    results = robustness(keyword_scorer(True), texts, labels, LABELS, pairs, n_boot=50)
    fig = plot_robustness(results, str(tmp_path / "robustness.png"))
    assert (tmp_path / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drop_ax, flip_ax = fig.axes
    assert [p.get_width() for p in drop_ax.patches] == pytest.approx([r["drop"]["value"] for r in results])
    assert [p.get_width() for p in flip_ax.patches] == pytest.approx([r["flip_rate"]["value"] for r in results])
    assert [t.get_text() for t in drop_ax.get_yticklabels()] == ["typo @ 0", "case @ 0.5", "punctuation @ 0.5"]
    # Each error bar spans its record's interval.
    bars = next(c for c in drop_ax.containers if isinstance(c, BarContainer))
    spans = [[segment[0][0], segment[1][0]] for segment in bars.errorbar.lines[2][0].get_segments()]
    assert np.allclose(spans, [r["drop"]["ci"] for r in results])
    unlabelled = robustness(keyword_scorer(True), texts, None, LABELS, pairs, n_boot=50)
    fig = plot_robustness(unlabelled, str(tmp_path / "flips.png"))
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 3
