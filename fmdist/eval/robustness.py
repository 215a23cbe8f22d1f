"""Perturbation robustness of a text classifier: seeded label-keeping perturbations, accuracy drop, flip rate.

Each perturbation is a plain function `(text, rate, rng) -> text` in `PERTURBATIONS`. `rate` is the
probability that each *eligible* unit (a character, a word or a gap, as the table says) is perturbed, so
rate 0 returns the text unchanged byte for byte and rate 1 perturbs every eligible unit. `perturb` draws
each text's changes from its own `random.Random` seeded by (seed, text index), so a text's perturbation
does not depend on which other texts are in the list.

| name | eligible unit | what happens to it |
|---|---|---|
| typo_swap | an ASCII letter followed by a different ASCII letter | the two trade places (the second is then not perturbed again) |
| typo_drop | an ASCII letter | deleted |
| typo_insert | an ASCII letter | a QWERTY neighbour (same case) is typed after it |
| typo_keyboard | an ASCII letter | replaced by a QWERTY neighbour (same case) |
| typo | an ASCII letter | one of the four above, chosen uniformly among those that apply |
| case | a word (letters, inner apostrophes allowed; at least one cased letter) | an all-upper word becomes lower case, any other word upper case |
| case_char | a cased character | its case is flipped |
| punctuation_drop | a punctuation character (Unicode category P*) | deleted |
| punctuation_insert | a word end (a letter or digit followed by whitespace or the end of the text) | one of `, . ; :` is inserted after it |
| punctuation | both of the above | deleted, or a mark inserted |
| whitespace_double | a whitespace character | doubled |
| whitespace_drop | a whitespace character | deleted (the words either side run together) |
| whitespace | a whitespace character | doubled or deleted, equally likely |
| synonym | a word in the user's synonym table | replaced by one of its synonyms (case kept) |

Typos touch only ASCII letters and the keyboard map has letters only: digits and symbols are left alone,
so a number or a name with accents keeps its identity.

Why our own perturbations rather than a library's (checked in their source):
- nlpaug 1.1.11 (last release 2022-07): its char augmenters turn `aug_char_p` into a count,
  `ceil(p * size)`, raised to `aug_char_min` (default 1) and capped at `aug_char_max` (default 10), so
  rate 0 still perturbs one character per augmented word and high rates are silently capped; they draw
  from the global `random`/`numpy.random` state, not a per-text generator. Its SynonymAug needs NLTK's
  WordNet and POS tagger, which NLTK downloads at run time.
- textattack 0.3.11: WordSwapWordNet calls `nltk.download("omw-1.4")` when built, WordSwapEmbedding
  downloads its embeddings, and the package pulls flair, bert-score, datasets and LanguageTool.
- wn and textblob also download their lexicons at run time.
No maintained library gives synonyms offline, so there is no built-in synonym perturbation; a user with a
lexicon of their own passes it (`load_synonyms` reads YAML or CSV) and gets the `synonym` perturbation.

`robustness` scores the clean texts once, and for each perturbation only the texts it changed (an
unchanged text keeps its clean prediction, so rate 0 gives a drop and flip rate of exactly 0). Intervals
are 95% paired bootstrap intervals: each resample draws one set of row indices for the clean and the
perturbed predictions, so the interval is of the drop itself, not of two independent accuracies.
"""

from __future__ import annotations

import csv
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmdist.eval.fairness import QUANTILES, percentile_interval

Perturbation = Callable[[str, float, random.Random], str]

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _keyboard_neighbours() -> dict[str, str]:
    """Letters next to each letter on a QWERTY keyboard: same row either side, and the keys touching it in
    the rows above and below (each row sits half a key right of the one above it)."""
    position = {key: (r, c) for r, row in enumerate(_ROWS) for c, key in enumerate(row)}
    # Row r's key c touches row r-1's keys c and c+1 (above) and row r+1's keys c-1 and c (below).
    offsets = [(0, -1), (0, 1), (-1, 0), (-1, 1), (1, -1), (1, 0)]
    out = {}
    for key, (r, c) in position.items():
        near = [
            _ROWS[r + dr][c + dc] for dr, dc in offsets if 0 <= r + dr < len(_ROWS) and 0 <= c + dc < len(_ROWS[r + dr])
        ]
        out[key] = "".join(sorted(near))
    return out


KEYBOARD_NEIGHBOURS: dict[str, str] = _keyboard_neighbours()
"""Lower-case letter -> the letters on the keys touching it on a QWERTY keyboard."""

INSERTED_PUNCTUATION = (",", ".", ";", ":")
"""Marks `punctuation_insert` adds: neutral ones (no `!` or `?`, which can change what a text says)."""


def _is_letter(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _same_case(letter: str, like: str) -> str:
    return letter.upper() if like.isupper() else letter


def _neighbour(c: str, rng: random.Random) -> str:
    return _same_case(rng.choice(KEYBOARD_NEIGHBOURS[c.lower()]), c)


def _typo(kinds: tuple[str, ...]) -> Perturbation:
    """A typo perturbation that applies one of `kinds` to each ASCII letter with probability `rate`."""

    def perturb_text(text: str, rate: float, rng: random.Random) -> str:
        out: list[str] = []
        i = 0
        while i < len(text):
            c = text[i]
            swappable = i + 1 < len(text) and _is_letter(text[i + 1]) and text[i + 1] != c
            applicable = [k for k in kinds if k != "swap" or swappable]
            if not _is_letter(c) or not applicable or rng.random() >= rate:
                out.append(c)
                i += 1
                continue
            kind = applicable[0] if len(applicable) == 1 else rng.choice(applicable)
            if kind == "swap":
                out += [text[i + 1], c]
                i += 2
                continue
            if kind == "keyboard":
                out.append(_neighbour(c, rng))
            elif kind == "insert":
                out += [c, _neighbour(c, rng)]
            # "drop" appends nothing.
            i += 1
        return "".join(out)

    return perturb_text


_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
"""A word for `case` and `synonym`: a run of letters, inner apostrophes allowed ("don't")."""


def _case(text: str, rate: float, rng: random.Random) -> str:
    def one(match: re.Match[str]) -> str:
        word = match.group()
        # A word of an uncased script (its upper and lower case agree) is not eligible and draws nothing.
        if word.upper() == word.lower() or rng.random() >= rate:
            return word
        return word.lower() if word.isupper() else word.upper()

    return _WORD.sub(one, text)


def _case_char(text: str, rate: float, rng: random.Random) -> str:
    out = []
    for c in text:
        flipped = c.swapcase()
        # Only characters with a one-character other case ("ß" upper-cases to "SS").
        if len(flipped) == 1 and flipped != c and rng.random() < rate:
            out.append(flipped)
        else:
            out.append(c)
    return "".join(out)


def _is_punctuation(c: str) -> bool:
    return unicodedata.category(c).startswith("P")


def _punctuation(drop: bool, insert: bool) -> Perturbation:
    def perturb_text(text: str, rate: float, rng: random.Random) -> str:
        out = []
        for i, c in enumerate(text):
            if drop and _is_punctuation(c):
                if rng.random() >= rate:
                    out.append(c)
                continue
            out.append(c)
            word_end = c.isalnum() and (i + 1 == len(text) or text[i + 1].isspace())
            if insert and word_end and rng.random() < rate:
                out.append(rng.choice(INSERTED_PUNCTUATION))
        return "".join(out)

    return perturb_text


def _whitespace(kinds: tuple[str, ...]) -> Perturbation:
    def perturb_text(text: str, rate: float, rng: random.Random) -> str:
        out = []
        for c in text:
            if not c.isspace() or rng.random() >= rate:
                out.append(c)
            elif (kinds[0] if len(kinds) == 1 else rng.choice(kinds)) == "double":
                out.append(c + c)
        return "".join(out)

    return perturb_text


PERTURBATIONS: dict[str, Perturbation] = {
    "typo": _typo(("swap", "drop", "insert", "keyboard")),
    "typo_swap": _typo(("swap",)),
    "typo_drop": _typo(("drop",)),
    "typo_insert": _typo(("insert",)),
    "typo_keyboard": _typo(("keyboard",)),
    "case": _case,
    "case_char": _case_char,
    "punctuation": _punctuation(drop=True, insert=True),
    "punctuation_drop": _punctuation(drop=True, insert=False),
    "punctuation_insert": _punctuation(drop=False, insert=True),
    "whitespace": _whitespace(("double", "drop")),
    "whitespace_double": _whitespace(("double",)),
    "whitespace_drop": _whitespace(("drop",)),
}
"""The built-in label-keeping perturbations by name (the module docstring's table says what each does)."""


def synonym_swap(synonyms: dict[str, list[str]]) -> Perturbation:
    """The `synonym` perturbation over a user's table: each word found in it (case-insensitively) is, with
    probability `rate`, replaced by one of its synonyms, upper-cased or capitalised like the word.

    Args:
        synonyms: Lower-case word -> its synonyms (as `load_synonyms` returns).

    Returns:
        A perturbation with the signature of those in `PERTURBATIONS`.
    """
    table = {word.lower(): [s for s in choices if s.lower() != word.lower()] for word, choices in synonyms.items()}

    def one(word: str, rate: float, rng: random.Random) -> str:
        choices = table.get(word.lower())
        if not choices or rng.random() >= rate:
            return word
        choice = rng.choice(choices)
        if word.isupper() and len(word) > 1:
            return choice.upper()
        return choice[:1].upper() + choice[1:] if word[0].isupper() else choice

    def perturb_text(text: str, rate: float, rng: random.Random) -> str:
        return _WORD.sub(lambda match: one(match.group(), rate, rng), text)

    return perturb_text


def load_synonyms(path: str) -> dict[str, list[str]]:
    """A user's synonym table from YAML (a mapping word -> list of words, or one word) or CSV (each row a
    word and then its synonyms; a first row whose first cell is `word` is a header and skipped).

    Args:
        path: A .yaml/.yml or .csv file.

    Returns:
        Lower-case word -> its synonyms, each list non-empty.

    Raises:
        ValueError: The file is neither, or an entry is not a word with at least one synonym.
    """
    suffix = Path(path).suffix.lower()
    raw: Any
    if suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ValueError(
                f"{path}: a synonym table is a mapping word -> list of synonyms, not {type(raw).__name__}."
            )
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[cell.strip() for cell in row] for row in csv.reader(f) if any(cell.strip() for cell in row)]
        if rows and rows[0][0].lower() == "word":
            rows = rows[1:]
        raw = {}
        for row in rows:
            raw.setdefault(row[0], []).extend(cell for cell in row[1:] if cell)
    else:
        raise ValueError(f"{path}: a synonym table is a .yaml/.yml or .csv file, not {suffix or 'no suffix'}.")
    table: dict[str, list[str]] = {}
    for word, choices in raw.items():
        choices = [choices] if isinstance(choices, str) else choices
        if not isinstance(word, str) or not isinstance(choices, list) or not all(isinstance(s, str) for s in choices):
            raise ValueError(f"{path}: entry {word!r}: give a word and a list of synonyms (strings).")
        if not choices:
            raise ValueError(f"{path}: {word!r} has no synonyms; give at least one or remove the entry.")
        table.setdefault(word.lower(), []).extend(choices)
    return table


def _registry(synonyms: dict[str, list[str]] | None) -> dict[str, Perturbation]:
    return PERTURBATIONS if synonyms is None else {**PERTURBATIONS, "synonym": synonym_swap(synonyms)}


def _check(name: str, rate: float, registry: dict[str, Perturbation]) -> None:
    if name == "synonym" and name not in registry:
        raise ValueError(
            "perturbation 'synonym' needs a synonym table of your own (no maintained library has one offline): "
            "pass synonyms=load_synonyms('lexicon.yaml'), a mapping word -> list of synonyms."
        )
    if name not in registry:
        raise ValueError(f"unknown perturbation {name!r}; choose one of {sorted(registry)}.")
    if not 0 <= rate <= 1:
        raise ValueError(f"perturbation {name!r} has rate {rate}; a rate is a probability between 0 and 1.")


def perturb(
    texts: Sequence[str], name: str, rate: float, seed: int = 0, synonyms: dict[str, list[str]] | None = None
) -> list[str]:
    """Perturb each text with the perturbation `name` at `rate`, reproducibly.

    Args:
        texts: The texts.
        name: A key of `PERTURBATIONS`, or `synonym` with `synonyms`.
        rate: The probability that each eligible unit is perturbed; 0 returns the texts unchanged.
        seed: With the text's index, seeds that text's random choices.
        synonyms: A synonym table (`load_synonyms`), for the `synonym` perturbation.

    Returns:
        The perturbed texts, in order.

    Raises:
        ValueError: An unknown name, `synonym` without a table, or a rate outside [0, 1].
    """
    registry = _registry(synonyms)
    _check(name, rate, registry)
    function = registry[name]
    return [text if rate == 0 else function(text, rate, random.Random(f"{seed}:{i}")) for i, text in enumerate(texts)]


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Macro-F1 of each row of [resamples, n] label arrays, as sklearn's f1_score with every label listed
    and zero_division=0: a label never true nor predicted counts as F1 0."""
    resamples = y_true.shape[0]
    codes = (np.arange(resamples)[:, None] * num_labels + y_true) * num_labels + y_pred
    confusion = np.bincount(codes.ravel(), minlength=resamples * num_labels**2).reshape(
        resamples, num_labels, num_labels
    )
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = confusion.sum(axis=1) + confusion.sum(axis=2)  # 2 TP + FP + FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    return f1.mean(axis=1)


def _bootstrap(
    clean: np.ndarray, perturbed: np.ndarray, y_true: np.ndarray | None, num_labels: int, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """Per resample: flip rate, and with labels the accuracy and macro-F1 drops; one set of row indices per
    resample serves clean and perturbed alike (paired)."""
    rng = np.random.default_rng(seed)
    n = len(clean)
    flipped = (clean != perturbed).astype(np.float64)
    correct_gap = None if y_true is None else (clean == y_true).astype(np.float64) - (perturbed == y_true)
    out: dict[str, list[np.ndarray]] = {"flip_rate": [], "accuracy": [], "macro_f1": []}
    # Resample in chunks so the index matrix stays near 16 MB whatever the data size.
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_boot, chunk):
        index = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        out["flip_rate"].append(flipped[index].mean(axis=1))
        if y_true is not None:
            out["accuracy"].append(correct_gap[index].mean(axis=1))
            truth = y_true[index]
            out["macro_f1"].append(
                _macro_f1(truth, clean[index], num_labels) - _macro_f1(truth, perturbed[index], num_labels)
            )
    return {name: np.concatenate(parts) for name, parts in out.items() if parts}


def _label_ids(labels: Sequence[int | str] | np.ndarray, label_names: list[str], n: int) -> np.ndarray:
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} texts: give one label per text (or labels=None).")
    ids = []
    for row, label in enumerate(labels):
        if isinstance(label, str) and label in label_names:
            ids.append(label_names.index(label))
        elif isinstance(label, int | np.integer) and not isinstance(label, bool) and 0 <= label < len(label_names):
            ids.append(int(label))
        else:
            raise ValueError(
                f"label {label!r} of row {row} is neither an id below {len(label_names)} nor one of the model's "
                f"labels {label_names}."
            )
    return np.asarray(ids, dtype=np.int64)


def _scores(probabilities: Callable[[list[str]], np.ndarray], texts: list[str], num_labels: int) -> np.ndarray:
    scores = np.asarray(probabilities(texts), dtype=np.float64)
    if scores.shape != (len(texts), num_labels):
        raise ValueError(
            f"the scorer returned shape {scores.shape} for {len(texts)} texts; expected ({len(texts)}, {num_labels}), "
            "one probability per label name."
        )
    return scores


def _prediction(scores: np.ndarray, row: int, label_names: list[str]) -> tuple[str, float]:
    label = int(scores[row].argmax())
    return label_names[label], float(scores[row, label])


def robustness(
    probabilities: Callable[[list[str]], np.ndarray],
    texts: Sequence[str],
    labels: Sequence[int | str] | np.ndarray | None,
    label_names: list[str],
    perturbations: list[tuple[str, float]],
    seed: int = 0,
    n_boot: int = 1000,
    max_examples: int = 5,
    synonyms: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """How predictions change under each perturbation: accuracy and macro-F1 drops, flip rate, examples.

    Args:
        probabilities: Texts -> [n, num_labels] softmax probabilities.
        texts: The clean texts.
        labels: Gold labels (ids or label names), or None for unlabelled data (then flip rates only).
        label_names: The model's labels, by id.
        perturbations: (name, rate) pairs; names as in `PERTURBATIONS`, or `synonym` with `synonyms`.
        seed: Seeds the perturbations (with each text's index) and the bootstrap.
        n_boot: Bootstrap resamples for each interval.
        max_examples: Flipped predictions kept per perturbation, those whose clean prediction lost the most
            probability first.
        synonyms: A synonym table (`load_synonyms`) for the `synonym` perturbation.

    Returns:
        One record per perturbation, in order, of plain values: `name`, `rate`, `n`, `changed` (fraction of
        texts the perturbation changed), `metric` ("accuracy"), `clean` and `perturbed` accuracy, `drop`
        ({value, ci}: clean minus perturbed accuracy, 95% paired bootstrap interval), `macro_f1` ({clean,
        perturbed, drop: {value, ci}}), `flip_rate` ({value, ci}: fraction whose predicted label changed),
        `n_boot`, `interval`, and `examples` (each: index, original, perturbed, gold, `before` and `after` as
        "label (probability)", before_probability, after_probability). Without labels `clean`,
        `perturbed`, `drop` and `macro_f1` are None and `gold` is None.

    Raises:
        ValueError: No texts, a label per text missing or unknown, a bad perturbation or rate, n_boot < 1, or
            a scorer output of the wrong shape.
    """
    from sklearn.metrics import f1_score

    texts = list(texts)
    if not texts:
        raise ValueError("robustness needs at least one text.")
    if n_boot < 1:
        raise ValueError(f"n_boot is {n_boot}; the intervals need at least 1 resample (1,000 or more is usual).")
    registry = _registry(synonyms)
    problems = []
    for name, rate in perturbations:
        try:
            _check(name, rate, registry)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError("; ".join(problems))
    num_labels = len(label_names)
    y_true = None if labels is None else _label_ids(labels, label_names, len(texts))
    clean_scores = _scores(probabilities, texts, num_labels)
    clean = clean_scores.argmax(axis=1)
    all_labels = list(range(num_labels))

    def macro_f1(y_pred: np.ndarray) -> float:
        return float(f1_score(y_true, y_pred, labels=all_labels, average="macro", zero_division=0))

    results = []
    for name, rate in perturbations:
        perturbed_texts = perturb(texts, name, rate, seed, synonyms)
        changed = [i for i, (a, b) in enumerate(zip(texts, perturbed_texts, strict=True)) if a != b]
        # An unchanged text keeps its clean probabilities: only the changed ones are scored again.
        scores = clean_scores.copy()
        if changed:
            scores[changed] = _scores(probabilities, [perturbed_texts[i] for i in changed], num_labels)
        perturbed = scores.argmax(axis=1)
        samples = _bootstrap(clean, perturbed, y_true, num_labels, n_boot, seed)
        flips = np.flatnonzero(clean != perturbed)
        record: dict[str, Any] = {
            "name": name,
            "rate": float(rate),
            "n": len(texts),
            "changed": len(changed) / len(texts),
            "metric": "accuracy",
            "clean": None,
            "perturbed": None,
            "drop": None,
            "macro_f1": None,
            "flip_rate": {"value": len(flips) / len(texts), "ci": percentile_interval(samples["flip_rate"])},
            "n_boot": n_boot,
            "interval": list(QUANTILES),
        }
        if y_true is not None:
            clean_accuracy, perturbed_accuracy = float((clean == y_true).mean()), float((perturbed == y_true).mean())
            clean_f1, perturbed_f1 = macro_f1(clean), macro_f1(perturbed)
            record["clean"], record["perturbed"] = clean_accuracy, perturbed_accuracy
            record["drop"] = {
                "value": clean_accuracy - perturbed_accuracy,
                "ci": percentile_interval(samples["accuracy"]),
            }
            record["macro_f1"] = {
                "clean": clean_f1,
                "perturbed": perturbed_f1,
                "drop": {"value": clean_f1 - perturbed_f1, "ci": percentile_interval(samples["macro_f1"])},
            }
        # The flips that cost the clean prediction the most probability are the most telling.
        lost = clean_scores[flips, clean[flips]] - scores[flips, clean[flips]]
        examples = []
        for i in flips[np.argsort(-lost, kind="stable")][:max_examples]:
            before, after = _prediction(clean_scores, i, label_names), _prediction(scores, i, label_names)
            examples.append(
                {
                    "index": int(i),
                    "original": texts[i],
                    "perturbed": perturbed_texts[i],
                    "gold": None if y_true is None else label_names[y_true[i]],
                    "before": f"{before[0]} ({before[1]:.3f})",
                    "after": f"{after[0]} ({after[1]:.3f})",
                    "before_probability": before[1],
                    "after_probability": after[1],
                }
            )
        record["examples"] = examples
        results.append(record)
    return results


def plot_robustness(results: list[dict[str, Any]], path: str) -> Any:
    """A PNG of each perturbation's accuracy drop and flip rate with their 95% intervals; returns the figure.

    Args:
        results: `robustness`'s records.
        path: Where the PNG goes.

    Returns:
        The matplotlib figure: axes[0] the accuracy drops (perturbations with labels), axes[-1] the flip
        rates; one bar per record.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = [r for r in results if r["drop"] is not None]
    panels = [("drop", "accuracy drop (clean - perturbed)", labelled)] if labelled else []
    panels.append(("flip_rate", "flip rate (predicted label changed)", results))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.45 * len(results) + 1.6), squeeze=False)
    for ax, (key, title, rows) in zip(axes[0], panels, strict=True):
        values = np.array([r[key]["value"] for r in rows])
        errors = np.clip([values - [r[key]["ci"][0] for r in rows], [r[key]["ci"][1] for r in rows] - values], 0, None)
        ax.barh(range(len(rows)), values, xerr=errors, color="#4c72b0", capsize=3)
        ax.set_yticks(range(len(rows)), [f"{r['name']} @ {r['rate']:g}" for r in rows])
        ax.invert_yaxis()
        ax.axvline(0, color="k", linewidth=0.8)
        ax.set_title(title)
    n_boot = results[0]["n_boot"] if results else 0
    fig.suptitle(f"robustness, 95% paired bootstrap intervals ({n_boot} resamples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
