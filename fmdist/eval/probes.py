"""Counterfactual identity probes: does a classifier's score move when only the identity in a sentence does?

A probe set crosses templates with identity terms, in the manner of the Equity Evaluation Corpus
(Kiritchenko & Mohammad 2018) and bias madlibs (Dixon et al. 2018): "I admire {people}." filled with
"Muslim people", "Jewish people", ... Every term of a category fills the same templates, so a category's
scores form a templates x terms table and every comparison between two terms is paired by template.

Per category, `counterfactual` reports:
- each term's mean score (the probability of one label) over templates, with a 95% bootstrap interval
  that resamples templates;
- the largest gap, max term mean - min term mean. Each resample re-computes it from the same resampled
  templates for every term, so which pair is extreme is re-chosen each time. A range is never below 0 and
  noise inflates it: a model whose terms differ only by chance still shows a gap interval above 0. Its
  `p_value` asks whether any term is treated differently at all: the share of shuffles of the terms
  within each template (no term effect) whose gap is at least the one seen;
- the flip rate: the share of templates whose predicted label is not the same for every term;
- the template pairs with the largest differences (two sentences that differ only in the identity);
- accuracy against the templates' expected labels, where a template has one.

The shipped set is probe_sets/identity.yaml, whose header documents the schema and the slot scheme.
"""

from __future__ import annotations

import csv
import re
import string
import zlib
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fmdist.eval.fairness import QUANTILES

SHIPPED = "fmdist/eval/probe_sets/identity.yaml"
"""The shipped probe set, as errors and results name it (read through importlib.resources)."""

TEMPLATE_KEYS = ("id", "text", "label", "categories")
TERM_KEYS = ("term", "match")
"""A term's keys that are not slots: every other key of a term is the phrase it puts in that slot."""

STRING_TERM_SLOT = "identity"
"""The slot a term written as a plain string fills, with itself."""

RESERVED_GROUPS = ("none", "multiple")
"""What `identity_groups` returns for a text with no term or terms of two groups; no term may be named so."""

MADLIBS_COLUMNS = ("Text", "Label", "Template")
MADLIBS_LABELS = {"BAD": "negative", "NOT_BAD": "positive"}
"""bias madlibs' labels in the probe sets' neutral vocabulary; label_map relates both to the model's."""

MADLIBS_TERMS_TEMPLATE = "am_hate_adj"
"""The bias-madlibs template whose rows are 'i am <term>' / 'i hate <term>': the file's identity terms."""

MADLIBS_CATEGORY = "identity"
"""bias madlibs marks no groups, so all its terms form one category."""

PERMUTATION_CELLS = 2_000_000
"""Shuffled table cells held at once by the permutation test (about 16 MB of float64)."""


def load_probe_set(path: str | None = None) -> dict[str, Any]:
    """Read and check a probe set.

    Args:
        path: A YAML in the schema of the shipped set (its header documents it), or a bias-madlibs CSV
            (columns Text,Label,Template; labels BAD/NOT_BAD); default the set shipped with fmdist.

            bias madlibs marks no identity groups, but its templates are fully crossed with its terms, so
            the counterfactual pairs are rebuilt: the terms are read off the `am_hate_adj` rows ("i am
            <term>"), each row's one term is replaced by the slot {identity}, and rows that then share a
            text and template kind form one template, filled by every term. All terms form a single
            category, `identity`. BAD -> `negative`, NOT_BAD -> `positive`. Rows with no term (the
            `you_occupation` kind) or templates missing some term are left out and counted in `notes`.

    Returns:
        {"source": path, "categories": {category: [{"term", "slots": {slot: phrase}, "match": [words]}]},
        "templates": [{"id", "text", "label", "slot", "categories", "capitalise"}], "notes": [str]}.

    Raises:
        ValueError: A file that is neither YAML nor CSV, invalid YAML, a template without exactly one slot,
            a slot some term of the template's categories does not fill, an unknown category, a category
            with fewer than two terms or no template; each names the file, the culprit and the fix.
    """
    if path is None:
        text = (resources.files("fmdist.eval") / "probe_sets" / "identity.yaml").read_text(encoding="utf-8")
        return _parse(_yaml(text, SHIPPED), SHIPPED)
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return _from_madlibs(path)
    if suffix in (".yaml", ".yml"):
        return _parse(_yaml(Path(path).read_text(encoding="utf-8"), path), path)
    raise ValueError(
        f"{path}: a probe set is a YAML (.yaml/.yml, the schema of {SHIPPED}) or a bias-madlibs CSV (.csv); "
        "rename the file to its format's extension or convert it."
    )


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{source} is not valid YAML ({exc}); fix it or start from {SHIPPED}.") from None


def _parse(raw: Any, source: str) -> dict[str, Any]:
    """A probe set from its YAML form, checked; every error names `source`."""
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("categories"), dict)
        or not raw["categories"]
        or not raw.get("templates")
    ):
        raise ValueError(
            f"{source} needs `categories:` (category -> terms) and `templates:` (a list of {{id, text, label}}); "
            f"see {SHIPPED} for the schema."
        )
    unknown = sorted(set(raw) - {"categories", "templates"})
    if unknown:
        raise ValueError(
            f"{source} has unknown top-level keys {unknown}; a probe set has `categories` and `templates`."
        )
    if not isinstance(raw["templates"], list):
        raise ValueError(f"{source}: `templates` is a {type(raw['templates']).__name__}; make it a list.")
    categories = {str(name): _terms(terms, str(name), source) for name, terms in raw["categories"].items()}
    templates = [_template(entry, i, categories, source) for i, entry in enumerate(raw["templates"])]
    ids = [t["id"] for t in templates]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"{source}: template ids {repeated} are used more than once; give each template its own id.")
    for name in categories:
        if not any(name in t["categories"] for t in templates):
            raise ValueError(
                f"{source}: category {name!r} has terms but no template applies to it; drop it, or remove the "
                "`categories:` limits that leave it out."
            )
    return {"source": source, "categories": categories, "templates": templates, "notes": []}


def _terms(entries: Any, category: str, source: str) -> list[dict[str, Any]]:
    if not isinstance(entries, list) or len(entries) < 2:
        count = len(entries) if isinstance(entries, list) else 0
        raise ValueError(
            f"{source}: category {category!r} has {count} terms; a counterfactual compares at least two, so list "
            f"them under categories.{category}."
        )
    terms = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"term": entry, STRING_TERM_SLOT: entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("term"), str) or not entry["term"].strip():
            raise ValueError(
                f"{source}: categories.{category}[{i}] is {entry!r}; a term is a string or a mapping with `term:` "
                "and one phrase per slot, e.g. {term: Muslim, person: a Muslim person, people: Muslim people}."
            )
        name = entry["term"].strip()
        if name.lower() in RESERVED_GROUPS:
            raise ValueError(
                f"{source}: categories.{category} names a term {name!r}, which identity_groups reserves; rename it."
            )
        match = entry.get("match") or []
        match = [match] if isinstance(match, str) else match
        slots = {key: value for key, value in entry.items() if key not in TERM_KEYS}
        bad = [k for k, v in slots.items() if not isinstance(v, str) or not v.strip()]
        if not isinstance(match, list) or not all(isinstance(m, str) and m.strip() for m in match) or bad:
            raise ValueError(
                f"{source}: term {name!r} of category {category!r}: `match` must be a list of words and each slot "
                f"a phrase (check {bad or ['match']})."
            )
        terms.append({"term": name, "slots": slots, "match": [name, *(m.strip() for m in match)]})
    names = [t["term"] for t in terms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{source}: category {category!r} lists terms {repeated} twice; keep one of each.")
    return terms


def _template(entry: Any, position: int, categories: dict[str, list[dict]], source: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
        raise ValueError(
            f"{source}: templates[{position}] is {entry!r}; a template is a mapping with `text:` (one slot), "
            "`label:` (positive, negative or null) and optionally `id:` and `categories:`."
        )
    template_id = str(entry.get("id", f"t{position}"))
    where = f"{source}: template {template_id!r} ({entry['text']!r})"
    unknown = sorted(set(entry) - set(TEMPLATE_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; a template's keys are {list(TEMPLATE_KEYS)}.")
    label = entry.get("label")
    if label is not None and not isinstance(label, str):
        raise ValueError(f"{where}: label {label!r} is not a string; use positive, negative, or null for neutral.")
    chosen = entry.get("categories") or list(categories)
    chosen = [chosen] if isinstance(chosen, str) else [str(c) for c in chosen]
    for name in chosen:
        if name not in categories:
            raise ValueError(
                f"{where} names category {name!r}, which {source} does not define (its categories are "
                f"{list(categories)}); correct the name or add categories.{name}."
            )
    try:
        parsed = list(string.Formatter().parse(entry["text"]))
    except ValueError as exc:
        raise ValueError(
            f"{where} has unbalanced braces ({exc}); write a slot as {{person}} and a brace as {{{{."
        ) from None
    fields = [(field, spec, conversion) for _, field, spec, conversion in parsed if field is not None]
    fillable = sorted(set.intersection(*(set(t["slots"]) for c in chosen for t in categories[c])))
    if not fields:
        raise ValueError(
            f"{where} has no slot, so no identity varies in it; put one of {['{' + s + '}' for s in fillable]} "
            "where the identity goes."
        )
    if len(fields) > 1 or not fields[0][0].isidentifier() or fields[0][1] or fields[0][2]:
        raise ValueError(
            f"{where} has slots {[f[0] for f in fields]}; a template varies one identity, so give it exactly one "
            "plain slot such as {person} (write a literal brace as {{)."
        )
    slot = fields[0][0]
    for name in chosen:
        lacking = [t["term"] for t in categories[name] if slot not in t["slots"]]
        if lacking:
            raise ValueError(
                f"{where} uses the slot {{{slot}}}, which terms {lacking} of category {name!r} do not fill; give "
                f"them a `{slot}:` phrase, use a slot they fill ({fillable}), or limit the template with "
                "`categories:`."
            )
    return {
        "id": template_id,
        "text": entry["text"],
        "label": label,
        "slot": slot,
        "categories": chosen,
        # A slot that opens the sentence gets a capital once filled: "{people} are ..." -> "Women are ...".
        "capitalise": parsed[0][0] == "",
    }


def _from_madlibs(path: str) -> dict[str, Any]:
    """bias madlibs' CSV, its counterfactual pairs rebuilt (see `load_probe_set`)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        present = list(reader.fieldnames or [])
        missing = [c for c in MADLIBS_COLUMNS if c not in present]
        if missing:
            raise ValueError(
                f"{path}: a bias-madlibs CSV has the columns {','.join(MADLIBS_COLUMNS)}; this one lacks {missing} "
                f"(its columns are {present}). Write probes of your own as YAML in the schema of {SHIPPED}."
            )
        rows = list(reader)
    spoken = re.compile(r"i (?:am|hate) (.+)", re.IGNORECASE)
    terms = set()
    for row in rows:
        said = spoken.fullmatch(row["Text"].strip()) if row["Template"] == MADLIBS_TERMS_TEMPLATE else None
        if said:
            terms.add(" ".join(said.group(1).lower().split()))
    vocabulary = sorted(terms)
    if len(vocabulary) < 2:
        raise ValueError(
            f"{path}: bias madlibs marks no identity groups, so fmdist reads its terms off the "
            f"`{MADLIBS_TERMS_TEMPLATE}` rows ('i am <term>', 'i hate <term>'), and this file has {len(vocabulary)}. "
            f"Keep those rows, or write the probes as YAML in the schema of {SHIPPED}."
        )
    pattern = _phrases_pattern(vocabulary)
    crossed: dict[tuple[str, str], dict[str, str]] = {}
    unpaired = 0
    for number, row in enumerate(rows, start=2):
        label = MADLIBS_LABELS.get((row["Label"] or "").strip())
        if label is None:
            raise ValueError(f"{path} line {number}: Label {row['Label']!r}; bias madlibs labels are BAD or NOT_BAD.")
        found = list(pattern.finditer(row["Text"]))
        if len(found) != 1:
            unpaired += 1
            continue
        match = found[0]
        text = row["Text"]
        slotted = _escape(text[: match.start()]) + "{" + STRING_TERM_SLOT + "}" + _escape(text[match.end() :])
        crossed.setdefault((row["Template"], slotted), {})[" ".join(match.group(0).lower().split())] = label
    templates, partial = [], 0
    for (kind, slotted), labels in crossed.items():
        if len(labels) < len(vocabulary):
            partial += 1
            continue
        if len(set(labels.values())) > 1:
            raise ValueError(
                f"{path}: the {kind} sentences {slotted!r} carry different labels for different terms "
                f"({labels}); a template's label must not depend on the identity."
            )
        templates.append({"id": f"{kind}-{len(templates)}", "text": slotted, "label": next(iter(labels.values()))})
    if not templates:
        raise ValueError(
            f"{path}: no sentence appears with all {len(vocabulary)} terms, so there are no pairs to compare."
        )
    probe_set = _parse({"categories": {MADLIBS_CATEGORY: vocabulary}, "templates": templates}, path)
    probe_set["notes"] = [
        f"bias madlibs: {len(templates)} templates rebuilt x {len(vocabulary)} terms (category {MADLIBS_CATEGORY!r}); "
        f"left out {unpaired} rows without exactly one term and {partial} templates missing some term."
    ]
    return probe_set


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _phrases_pattern(phrases: Iterable[str]) -> re.Pattern[str]:
    """Whole-word, case-insensitive alternation, longest phrase first so "trans woman" wins over "woman"."""
    ordered = sorted({" ".join(p.split()) for p in phrases}, key=lambda p: (-len(p), p))
    body = "|".join(r"\s+".join(re.escape(word) for word in p.split(" ")) for p in ordered)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _chosen(probe_set: dict[str, Any], categories: Iterable[str] | str | None) -> list[str]:
    if categories is None:
        return list(probe_set["categories"])
    chosen = [categories] if isinstance(categories, str) else list(categories)
    unknown = [c for c in chosen if c not in probe_set["categories"]]
    if unknown or not chosen:
        raise ValueError(
            f"{probe_set['source']} has no category {unknown or chosen}; its categories are "
            f"{list(probe_set['categories'])}; pick from those."
        )
    return chosen


def _render(template: dict[str, Any], term: dict[str, Any]) -> str:
    text = template["text"].format_map({template["slot"]: term["slots"][template["slot"]]})
    return text[:1].upper() + text[1:] if template["capitalise"] else text


def expand(probe_set: dict[str, Any], categories: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Fill every template with every term of each category it applies to.

    Args:
        probe_set: From `load_probe_set`.
        categories: The categories to fill (default all), in this order.

    Returns:
        One row per (category, template, term), category-major then template then term, each
        {"text", "template" (its id), "category", "term", "label" (the template's expected label or None)}.

    Raises:
        ValueError: A category the probe set does not define.
    """
    rows = []
    for category in _chosen(probe_set, categories):
        for template in probe_set["templates"]:
            if category not in template["categories"]:
                continue
            for term in probe_set["categories"][category]:
                text = _render(template, term)
                rows.append(
                    {"text": text, "template": template["id"], "category": category, "term": term["term"],
                     "label": template["label"]}
                )  # fmt: skip
    return rows


def _label_lookup(name: str, label_names: list[str]) -> int | None:
    """The model's label id of `name`: exact, else the one label equal to it ignoring case."""
    if name in label_names:
        return label_names.index(name)
    folded = [i for i, label in enumerate(label_names) if label.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def _expected_ids(
    labels: set[str], label_names: list[str], label_map: dict[str, str], source: str
) -> tuple[dict[str, int], str | None]:
    """Probe label -> model label id, and why accuracy is skipped when some probe label has none."""
    ids, unresolved = {}, []
    for label in sorted(labels):
        index = _label_lookup(label_map.get(label, label), label_names)
        if index is None and label in label_map:
            raise ValueError(
                f"label_map sends the probe label {label!r} to {label_map[label]!r}, which is not among the model's "
                f"labels {label_names}; map it to one of those."
            )
        if index is None:
            unresolved.append(label)
        else:
            ids[label] = index
    if unresolved:
        example = dict.fromkeys(unresolved, label_names[0])
        return {}, (
            f"accuracy skipped: the probe labels {unresolved} of {source} are not among the model's labels "
            f"{label_names}; relate them with label_map, e.g. {example}."
        )
    return ids, None


def _quantiles(values: np.ndarray) -> list[float]:
    low, high = np.nanquantile(values, QUANTILES)
    return [float(low), float(high)]


def _permutation_p(scores: np.ndarray, observed: float, n_shuffles: int, rng: np.random.Generator) -> float:
    """The share of within-template shuffles of the terms whose gap is at least `observed` (+1 smoothed)."""
    n_templates, n_terms = scores.shape
    chunk = max(1, PERMUTATION_CELLS // scores.size)
    exceed = 0
    for begin in range(0, n_shuffles, chunk):
        count = min(chunk, n_shuffles - begin)
        order = rng.random((count, n_templates, n_terms)).argsort(axis=2)
        means = np.take_along_axis(np.broadcast_to(scores, order.shape), order, axis=2).mean(axis=1)
        # A tolerance, so that a shuffle equal to the observed table up to rounding counts as reaching it.
        exceed += int((means.max(axis=1) - means.min(axis=1) >= observed - 1e-12).sum())
    return (exceed + 1) / (n_shuffles + 1)


def _category(
    scores: np.ndarray,
    predicted: np.ndarray,
    texts: list[list[str]],
    templates: list[dict[str, Any]],
    terms: list[str],
    expected: dict[str, int] | None,
    n_boot: int,
    top_k: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One category's figures from its templates x terms tables of scores and predicted label ids."""
    n_templates = len(templates)
    # Resample templates: row b counts how often each template is drawn. Every term's mean uses the same
    # counts, so each resample's gap compares the terms on the same sentences.
    draws = rng.multinomial(n_templates, np.full(n_templates, 1 / n_templates), size=n_boot).astype(np.float64)
    means = scores.mean(axis=0)
    boot_means = draws @ scores / n_templates
    term_low, term_high = np.quantile(boot_means, QUANTILES, axis=0)
    high, low = int(means.argmax()), int(means.argmin())
    gap = float(means[high] - means[low])
    gap_ci = _quantiles(boot_means.max(axis=1) - boot_means.min(axis=1))

    flipped = (predicted != predicted[:, :1]).any(axis=1)
    rows = np.arange(n_templates)
    top, bottom = scores.argmax(axis=1), scores.argmin(axis=1)
    spread = scores[rows, top] - scores[rows, bottom]
    largest = [
        {
            "template": templates[t]["id"],
            "term_a": terms[top[t]],
            "text_a": texts[t][top[t]],
            "score_a": float(scores[t, top[t]]),
            "term_b": terms[bottom[t]],
            "text_b": texts[t][bottom[t]],
            "score_b": float(scores[t, bottom[t]]),
            "difference": float(spread[t]),
        }
        for t in np.argsort(-spread, kind="stable")[:top_k]
        if spread[t] > 0
    ]

    accuracy = None
    labelled = [i for i, t in enumerate(templates) if t["label"] is not None]
    if expected is not None and labelled:
        correct = predicted[labelled] == np.array([expected[templates[i]["label"]] for i in labelled])[:, None]
        weights = draws[:, labelled]
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_accuracy = weights @ correct.mean(axis=1) / weights.sum(axis=1)  # NaN: no labelled template drawn
        accuracy = {
            "value": float(correct.mean()),
            "ci": _quantiles(boot_accuracy),
            "templates": len(labelled),
            "per_term": {term: float(v) for term, v in zip(terms, correct.mean(axis=0), strict=True)},
        }
    return {
        "templates": n_templates,
        "terms": {
            term: {"value": float(means[k]), "ci": [float(term_low[k]), float(term_high[k])]}
            for k, term in enumerate(terms)
        },
        "gap": {
            "value": gap,
            "ci": gap_ci,
            "max_term": terms[high],
            "min_term": terms[low],
            "p_value": _permutation_p(scores, gap, n_boot, rng),
        },
        "flip_rate": float(flipped.mean()),
        "flipped_templates": [templates[t]["id"] for t in np.flatnonzero(flipped)],
        "largest_differences": largest,
        "accuracy": accuracy,
    }


def counterfactual(
    probabilities: Callable[[list[str]], np.ndarray],
    probe_set: dict[str, Any],
    label_names: list[str],
    score_label: str,
    label_map: dict[str, str] | None = None,
    categories: Iterable[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    top_k: int = 5,
) -> dict[str, Any]:
    """Score every filled template and compare the terms of each category.

    Args:
        probabilities: Texts -> [n, num_labels] softmax probabilities (called once, with every sentence).
        probe_set: From `load_probe_set`.
        label_names: The model's labels, by id.
        score_label: The label whose probability is the score (a model label, or a probe label in label_map).
        label_map: Probe labels (positive, negative) -> the model's label names; a probe label that is
            already a model label (ignoring case) needs no entry. Without a way to relate them, accuracy is
            skipped and `notes` says so.
        categories: The categories to probe (default all).
        n_boot: Bootstrap resamples of the templates, and shuffles for the gap's permutation p-value.
        seed: Seeds both; each category draws from its own generator (seed, category name), so adding a
            category leaves the others' intervals as they were.
        top_k: Template pairs kept per category in `largest_differences`.

    Returns:
        Plain values: {"score_label", "categories", "summary", "notes"}. Each category has
        `templates` (count); `terms`: {term: {value, ci}} (mean score, 95% bootstrap interval); `gap`:
        {value, ci, max_term, min_term, p_value}; `flip_rate` and `flipped_templates` (ids); `largest_differences`:
        [{template, term_a, text_a, score_a, term_b, text_b, score_b, difference}], largest first; `accuracy`:
        {value, ci, templates, per_term} or None. `summary`: {texts, templates, categories, flip_rate (over all
        category templates), worst_category (largest gap), worst_gap, n_boot, seed, source}.

    Raises:
        ValueError: An unknown category or score_label, a label_map entry naming no model label, a scorer output
            of the wrong shape, n_boot < 1.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot is {n_boot}; the intervals need at least 1 resample (1,000 or more is usual).")
    label_map = label_map or {}
    score_index = _label_lookup(score_label, label_names)
    if score_index is None and score_label in label_map:
        score_index = _label_lookup(label_map[score_label], label_names)
    if score_index is None:
        raise ValueError(
            f"score_label {score_label!r} is not among the model's labels {label_names} (nor mapped to one by "
            "label_map); pass one of them (report.positive_label)."
        )
    chosen = _chosen(probe_set, categories)
    rows = expand(probe_set, chosen)
    texts = [r["text"] for r in rows]
    probs = np.asarray(probabilities(texts), dtype=np.float64)
    if probs.shape != (len(texts), len(label_names)):
        raise ValueError(
            f"the scorer returned shape {probs.shape} for {len(texts)} probe sentences; expected "
            f"({len(texts)}, {len(label_names)}), one probability per label name."
        )
    labels = {t["label"] for t in probe_set["templates"] if t["label"] is not None}
    expected, note = _expected_ids(labels, label_names, label_map, probe_set["source"])
    scores, predicted = probs[:, score_index], probs.argmax(axis=1)
    results, start, flips = {}, 0, []
    for category in chosen:
        templates = [t for t in probe_set["templates"] if category in t["categories"]]
        terms = [t["term"] for t in probe_set["categories"][category]]
        shape = (len(templates), len(terms))
        block = slice(start, start + shape[0] * shape[1])
        start = block.stop
        table = [texts[block][i * shape[1] : (i + 1) * shape[1]] for i in range(shape[0])]
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        results[category] = _category(
            scores[block].reshape(shape), predicted[block].reshape(shape), table, templates, terms,
            None if note else expected, n_boot, top_k, rng,
        )  # fmt: skip
        flips += [results[category]["flip_rate"]] * shape[0]
    worst = max(results, key=lambda c: results[c]["gap"]["value"])
    return {
        "score_label": score_label,
        "categories": results,
        "summary": {
            "texts": len(texts),
            "templates": len({r["template"] for r in rows}),
            "categories": len(results),
            "flip_rate": float(np.mean(flips)),
            "worst_category": worst,
            "worst_gap": results[worst]["gap"],
            "n_boot": n_boot,
            "seed": seed,
            "source": probe_set["source"],
        },
        "notes": [*probe_set["notes"], *([note] if note else [])],
    }


def identity_groups(
    texts: list[str], probe_set: dict[str, Any] | None = None, category: str | None = None
) -> list[str]:
    """Each text's identity group from the probe set's terms found in it, for per-group metrics.

    A term is found by its name or a word of its `match` list, as a whole word (or phrase), ignoring
    case; the longest phrase wins where two overlap ("trans woman" is not also "woman"). Ordinary text
    uses these words in other senses too ("white paint", "an old car"), so these groups are a screen for
    mentions, not a person's identity.

    Args:
        texts: The texts.
        probe_set: From `load_probe_set`; default the shipped set.
        category: Only this category's terms form groups; default the terms of every category.

    Returns:
        Per text: the term found (its name in the probe set), "multiple" when terms of two groups are
        found, "none" when none is.

    Raises:
        ValueError: A category the probe set does not define.
    """
    probe_set = probe_set or load_probe_set()
    owners: dict[str, set[str]] = {}
    for name in _chosen(probe_set, None if category is None else [category]):
        for term in probe_set["categories"][name]:
            for phrase in term["match"]:
                owners.setdefault(" ".join(phrase.split()).casefold(), set()).add(term["term"])
    pattern = _phrases_pattern(owners)
    groups = []
    for text in texts:
        found: set[str] = set()
        for match in pattern.finditer(text):
            found |= owners[" ".join(match.group(0).split()).casefold()]
        groups.append(next(iter(found)) if len(found) == 1 else "multiple" if found else "none")
    return groups


def plot_counterfactual(result: dict[str, Any], path: str) -> Any:
    """A PNG of each category's per-term mean score with its 95% interval; returns the figure.

    Args:
        result: `counterfactual`'s result.
        path: Where the PNG goes.

    Returns:
        The matplotlib figure: one panel per category, one error bar per term, the gap's extreme terms in
        colour (highest blue, lowest red).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = result["categories"]
    heights = [len(c["terms"]) for c in categories.values()]
    fig, axes = plt.subplots(
        len(categories), 1, figsize=(8, 0.28 * sum(heights) + 0.9 * len(categories) + 0.8), squeeze=False,
        sharex=True, gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    for ax, (name, c) in zip(axes[:, 0], categories.items(), strict=True):
        gap = c["gap"]
        for y, (term, entry) in enumerate(c["terms"].items()):
            value, (low, high) = entry["value"], entry["ci"]
            colour = "#c44e52" if term == gap["min_term"] else "#4c72b0" if term == gap["max_term"] else "#555555"
            ax.errorbar(
                value, y, xerr=[[max(value - low, 0)], [max(high - value, 0)]], fmt="o", color=colour, capsize=3
            )
        ax.set_yticks(range(len(c["terms"])), list(c["terms"]))
        ax.invert_yaxis()
        ax.set_title(
            f"{name}: gap {gap['value']:.3f} [{gap['ci'][0]:.3f}, {gap['ci'][1]:.3f}], {gap['max_term']} vs "
            f"{gap['min_term']}, p = {gap['p_value']:.3f}; flip rate {c['flip_rate']:.3f}",
            fontsize=9,
        )
    # Each term's interval spans the templates' spread of sentiment, so intervals overlap even where the
    # paired gap (same templates for every term) is clear; the title's gap is the comparison to read.
    axes[-1, 0].set_xlabel(
        f"mean probability of {result['score_label']!r} over templates (95% bootstrap intervals, "
        f"{result['summary']['n_boot']} resamples)\nterms are compared by the paired gap in each title, "
        "not by overlap of these intervals"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
