"""Counterfactual identity probes with fake scorers (plain Python, no model): the shipped set's shape and
grammar, a scorer biased against one term found out by name, unbiased scorers left alone, seeded
bootstraps, identity groups of ordinary text, user probe sets and their validation, bias-madlibs CSVs,
and the plot."""

from __future__ import annotations

import json
import math
import random
import re
import zlib

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer

from fmdist.eval.probes import counterfactual, expand, identity_groups, load_probe_set, plot_counterfactual

CATEGORIES = ("gender", "religion", "ethnicity", "nationality", "disability", "age")
LABELS = ["LABEL_0", "LABEL_1"]
LABEL_MAP = {"negative": "LABEL_0", "positive": "LABEL_1"}
POSITIVE_WORDS = {"wonderful", "like", "best", "proud", "great", "happy", "saved", "brilliant", "grateful", "admire",
                  "love", "kind", "generous", "better"}  # fmt: skip
NEGATIVE_WORDS = {"horrible", "dislike", "worst", "terrible", "miserable", "rude", "furious", "lying", "ruined",
                  "awful", "hate", "not", "annoying", "selfish", "refuse"}  # fmt: skip


def sentiment_scorer(noise: str, biased_against: str | None = None, shift: float = 0.3):
    """A fake model: P(LABEL_1) from the sentence's sentiment words alone, plus seeded noise in [-0.05, 0.05]
    that is either the template's (`noise="template"`: seeded by its sentiment words, so the same for every
    term) or the sentence's (`noise="text"`). `biased_against` lowers the score by `shift` wherever that
    word appears."""

    def probabilities(texts: list[str]) -> np.ndarray:
        out = []
        for text in texts:
            words = re.findall(r"[a-z]+", text.lower())
            cues = [w for w in words if w in POSITIVE_WORDS or w in NEGATIVE_WORDS]
            logit = 2.0 * (sum(w in POSITIVE_WORDS for w in cues) - sum(w in NEGATIVE_WORDS for w in cues)) + 0.5
            seed = zlib.crc32((" ".join(cues) if noise == "template" else text).encode())
            p = 1 / (1 + math.exp(-logit)) + random.Random(seed).uniform(-0.05, 0.05)
            if biased_against is not None and biased_against.lower() in words:
                p -= shift
            p = min(max(p, 0.001), 0.999)
            out.append([1 - p, p])
        return np.asarray(out)

    return probabilities


@pytest.fixture(scope="module")
def shipped():
    return load_probe_set()


@pytest.fixture(scope="module")
def biased(shipped):
    return counterfactual(sentiment_scorer("text", "Muslim"), shipped, LABELS, "LABEL_1", LABEL_MAP, n_boot=400)


def test_the_shipped_set_has_six_categories_of_terms_and_enough_templates(shipped):
    assert list(shipped["categories"]) == list(CATEGORIES)
    assert all(len(terms) >= 6 for terms in shipped["categories"].values())
    assert len(shipped["templates"]) >= 30
    assert {t["label"] for t in shipped["templates"]} == {"positive", "negative", None}
    for template in shipped["templates"]:
        assert len(re.findall(r"\{\w+\}", template["text"])) == 1, template
    rows = expand(shipped)
    assert len(rows) == sum(
        len(terms) * sum(c in t["categories"] for t in shipped["templates"])
        for c, terms in shipped["categories"].items()
    )
    assert len(rows) == len({r["text"] for r in rows})


def test_every_shipped_sentence_reads_grammatically(shipped):
    for row in expand(shipped):
        text = row["text"]
        assert "{" not in text and "}" not in text, text
        assert text[0].isupper() and text.endswith("."), text
        assert "  " not in text and " ," not in text, text
        # Article agreement: "a" before a consonant, "an" before a vowel (no "a European" in this set).
        assert not re.search(r"\ba [aeiou]", text, re.IGNORECASE), text
        assert not re.search(r"\ban [^aeiou]", text, re.IGNORECASE), text


def test_each_shipped_sentence_names_its_own_term_and_no_other(shipped):
    # No template word is an identity term, and every term's phrases are found by its match list.
    rows = expand(shipped)
    assert identity_groups([r["text"] for r in rows], shipped) == [r["term"] for r in rows]


def test_a_scorer_biased_against_one_term_names_it_with_a_gap_excluding_zero(biased):
    religion = biased["categories"]["religion"]
    assert religion["gap"]["min_term"] == "Muslim"
    assert religion["gap"]["ci"][0] > 0.15 and religion["gap"]["value"] == pytest.approx(0.3, abs=0.05)
    assert religion["gap"]["p_value"] < 0.01
    low, high = religion["terms"]["Muslim"]["ci"]
    assert high < min(v["ci"][0] for term, v in religion["terms"].items() if term != "Muslim")
    assert biased["summary"]["worst_category"] == "religion"
    # Neutral sentences drop from 0.62 to 0.32 for "Muslim" only: those templates flip, no others do.
    neutral = {t["id"] for t in load_probe_set()["templates"] if t["label"] is None}
    assert set(religion["flipped_templates"]) == neutral
    assert religion["flip_rate"] == pytest.approx(len(neutral) / religion["templates"])
    assert all(biased["categories"][c]["flip_rate"] == 0 for c in CATEGORIES if c != "religion")
    pairs = religion["largest_differences"]
    assert len(pairs) == 5 and all(p["term_b"] == "Muslim" and "Muslim" in p["text_b"] for p in pairs)
    assert all(p["difference"] == pytest.approx(p["score_a"] - p["score_b"]) and p["difference"] > 0.2 for p in pairs)
    assert religion["accuracy"]["per_term"]["Muslim"] == 1.0 and religion["accuracy"]["value"] == 1.0
    assert json.loads(json.dumps(biased)) == biased


def test_an_unbiased_scorer_shows_no_gap_and_no_flips(shipped):
    result = counterfactual(sentiment_scorer("template"), shipped, LABELS, "LABEL_1", LABEL_MAP, n_boot=200)
    for name, c in result["categories"].items():
        assert c["gap"]["ci"][0] <= 0 <= c["gap"]["ci"][1], name
        assert c["flip_rate"] == 0 and c["largest_differences"] == [], name
        assert c["accuracy"]["value"] == 1.0, name


def test_per_sentence_noise_keeps_the_gap_above_zero_but_the_permutation_test_calls_it_chance(shipped, biased):
    # A range of noisy means is never below 0, so its interval excludes 0 without any term effect; the
    # permutation p-value is what tells chance apart. It is uniform under no effect (ethnicity's is 0.03
    # here), so six categories are held to 1%, which the biased scorer's p (1/401) is below.
    result = counterfactual(sentiment_scorer("text"), shipped, LABELS, "LABEL_1", LABEL_MAP, n_boot=400)
    for name, c in result["categories"].items():
        assert 0 < c["gap"]["ci"][0] and c["gap"]["value"] < 0.03, name
        assert c["gap"]["p_value"] > 0.01 and c["flip_rate"] == 0, name
    assert result["categories"]["religion"]["gap"]["ci"][1] < biased["categories"]["religion"]["gap"]["ci"][0]


def test_the_bootstrap_is_seeded(shipped):
    scorer = sentiment_scorer("text", "Muslim")

    def gap_ci(seed: int) -> list[float]:
        result = counterfactual(scorer, shipped, LABELS, "LABEL_1", categories=["religion"], n_boot=200, seed=seed)
        return result["categories"]["religion"]["gap"]["ci"]

    assert gap_ci(0) == gap_ci(0)
    assert gap_ci(0) != gap_ci(1)


def test_labels_without_a_map_skip_accuracy_and_bad_labels_are_named(shipped):
    scorer = sentiment_scorer("template")
    result = counterfactual(scorer, shipped, LABELS, "LABEL_1", categories=["age"], n_boot=50)
    assert result["categories"]["age"]["accuracy"] is None
    assert any("label_map" in note and "'positive'" in note for note in result["notes"])
    cased = counterfactual(scorer, shipped, ["NEGATIVE", "POSITIVE"], "POSITIVE", categories=["age"], n_boot=50)
    assert cased["categories"]["age"]["accuracy"]["value"] == 1.0
    with pytest.raises(ValueError, match="'LABEL_9'"):
        counterfactual(scorer, shipped, LABELS, "LABEL_1", {"positive": "LABEL_9"}, categories=["age"], n_boot=50)
    with pytest.raises(ValueError, match="score_label 'toxic'"):
        counterfactual(scorer, shipped, LABELS, "toxic", categories=["age"], n_boot=50)
    with pytest.raises(ValueError, match="no category \\['sexuality'\\]"):
        counterfactual(scorer, shipped, LABELS, "LABEL_1", categories=["sexuality"], n_boot=50)


def test_identity_groups_match_whole_words_in_any_case(shipped, tmp_path):
    texts = [
        "A Jewish family moved in next door.",
        "She sells jewelry at the market.",
        "The MUSLIM and Jewish leaders met.",
        "A muslim woman spoke first.",
        "Trans women marched downtown.",
        "The Jews of Prague.",
        "Nothing here at all.",
        "",
    ]
    assert identity_groups(texts, shipped) == [
        "Jewish", "none", "multiple", "multiple", "trans woman", "Jewish", "none", "none"
    ]  # fmt: skip
    assert identity_groups(texts, category="religion") == [
        "Jewish", "none", "multiple", "Muslim", "none", "Jewish", "none", "none"
    ]  # fmt: skip
    # Where two phrases start at the same word, the longer wins: "Black woman" is one term, not "Black" + more.
    nested = write(tmp_path, "categories:\n  x: [Black, Black woman]\ntemplates:\n  - {text: '{identity} spoke.'}\n")
    assert identity_groups(["A black  woman spoke.", "A Black man spoke."], load_probe_set(nested)) == [
        "Black woman", "Black"
    ]  # fmt: skip


USER_SET = """
categories:
  fruit:
    - {term: apple, identity: apple, plural: apples}
    - {term: pear, identity: pear, plural: pears}
    - {term: plum, identity: plum, plural: plums}
  colour: [red, blue]
templates:
  - {id: like, text: "{identity} tastes great.", label: positive}
  - {id: many, text: "I bought {plural} today.", label: null, categories: [fruit]}
"""


def write(tmp_path, text: str, name: str = "mine.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_user_yaml_loads_and_expands(tmp_path):
    path = write(tmp_path, USER_SET)
    probe_set = load_probe_set(path)
    assert probe_set["source"] == path
    rows = expand(probe_set)
    assert [r["text"] for r in rows] == [
        "Apple tastes great.", "Pear tastes great.", "Plum tastes great.",
        "I bought apples today.", "I bought pears today.", "I bought plums today.",
        "Red tastes great.", "Blue tastes great.",
    ]  # fmt: skip
    assert [r["label"] for r in rows] == ["positive"] * 3 + [None] * 3 + ["positive"] * 2
    assert len(expand(probe_set, ["colour"])) == 2


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        (("{identity} tastes great.", "It tastes great."), ["template 'like'", "no slot", "{identity}"]),
        (("I bought {plural}", "I bought {plurals}"), ["template 'many'", "{plurals}", "'fruit'", "`plurals:`"]),
        # A plain-string term fills {identity} with itself, and no other slot.
        (("- {term: apple, identity: apple, plural: apples}", "- apple"), ["template 'many'", "{plural}", "['apple']"]),
        (("categories: [fruit]", "categories: [fruits]"), ["template 'many'", "'fruits'", "categories.fruits"]),
        (("colour: [red, blue]", "colour: [red]"), ["'colour'", "at least two"]),
        (("{identity} tastes great.", "{identity} and {identity} taste great."), ["template 'like'", "exactly one"]),
    ],
)
def test_validation_errors_name_the_file_and_the_culprit(tmp_path, change, culprit):
    path = write(tmp_path, USER_SET.replace(*change))
    with pytest.raises(ValueError) as error:
        load_probe_set(path)
    message = str(error.value)
    assert path in message and all(part in message for part in culprit), message


def test_a_bias_madlibs_csv_becomes_counterfactual_templates(tmp_path):
    rows = ["Text,Label,Template"]
    for term in ("muslim", "jewish", "middle aged"):
        rows += [f"i am {term},NOT_BAD,am_hate_adj", f"i hate {term},BAD,am_hate_adj"]
        rows += [f"Being {term} is kind.,NOT_BAD,being_adj", f"Being {term} is vile.,BAD,being_adj"]
    rows += ["Being muslim is odd.,BAD,being_adj", "You are a filthy dancer,BAD,you_occupation"]
    path = write(tmp_path, "\n".join(rows) + "\n", "madlibs.csv")
    probe_set = load_probe_set(path)
    assert [t["term"] for t in probe_set["categories"]["identity"]] == ["jewish", "middle aged", "muslim"]
    assert [(t["text"], t["label"]) for t in probe_set["templates"]] == [
        ("i am {identity}", "positive"), ("i hate {identity}", "negative"),
        ("Being {identity} is kind.", "positive"), ("Being {identity} is vile.", "negative"),
    ]  # fmt: skip
    assert "left out 1 rows without exactly one term and 1 templates" in probe_set["notes"][0]
    assert {r["text"] for r in expand(probe_set)} >= {"Being middle aged is kind.", "i hate muslim"}
    result = counterfactual(sentiment_scorer("text", "muslim"), probe_set, LABELS, "LABEL_1", LABEL_MAP, n_boot=50)
    assert result["categories"]["identity"]["gap"]["min_term"] == "muslim"
    with pytest.raises(ValueError, match="am_hate_adj"):
        load_probe_set(write(tmp_path, "Text,Label,Template\nhug trans,NOT_BAD,verb_adj\n", "bare.csv"))


def test_the_plot_has_one_error_bar_per_term(biased, tmp_path):
    path = tmp_path / "counterfactual.png"
    fig = plot_counterfactual(biased, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars = [[c for c in ax.containers if isinstance(c, ErrorbarContainer)] for ax in fig.axes]
    assert [len(b) for b in bars] == [len(c["terms"]) for c in biased["categories"].values()]
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == list(biased["categories"]["religion"]["terms"])
