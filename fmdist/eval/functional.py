"""Functional tests of a text classifier from a CSV in HateCheck's format: a pass rate per functionality.

Each row is a test case: a text, the label a correct model gives it, and the functionality it tests
(HateCheck's columns `functionality,case_id,test_case,label_gold,...`, labels `hateful`/`non-hateful`).
A case passes when the model's most probable label is the expected one, after `label_map` relates the
CSV's labels to the model's (e.g. {"hateful": "negative", "non-hateful": "positive"} for a sentiment model).

Intervals are 95% Wilson score intervals per functionality: functionalities hold a few dozen templated
cases and often pass all or none of them, where a percentile bootstrap collapses to a zero-width [1, 1] or
[0, 0] and Wilson's stays honest. The overall pass rate's interval is a seeded bootstrap that resamples
cases within each functionality, so every resample keeps the test suite's mix of functionalities.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from fmdist.eval.fairness import percentile_interval, wilson_interval

DEFAULT_COLUMNS = {"text": "test_case", "label": "label_gold", "functionality": "functionality"}
"""The CSV's columns by role, as HateCheck names them; `columns` overrides any of them."""


def read_cases(path: str, columns: dict[str, str] | None = None) -> dict[str, list[str]]:
    """The test cases of a functional-test CSV, by role.

    Args:
        path: The CSV (UTF-8, with a header row).
        columns: Overrides of `DEFAULT_COLUMNS` by role (`text`, `label`, `functionality`).

    Returns:
        {"text": [...], "label": [...], "functionality": [...]}, one entry per row; labels and
        functionalities stripped of surrounding spaces.

    Raises:
        ValueError: An unknown role, a missing column, an empty label, or no rows.
    """
    unknown = sorted(set(columns or {}) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"columns has unknown roles {unknown}; the roles are {sorted(DEFAULT_COLUMNS)}.")
    names = {**DEFAULT_COLUMNS, **(columns or {})}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        present = list(reader.fieldnames or [])
        missing = [f"{names[role]!r} ({role})" for role in DEFAULT_COLUMNS if names[role] not in present]
        if missing:
            raise ValueError(
                f"{path} has no column {', '.join(missing)}; its columns are {present}. Name the right ones with "
                f"columns={{'text': ..., 'label': ..., 'functionality': ...}}."
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path} has a header but no test cases.")
    cases: dict[str, list[str]] = {role: [] for role in DEFAULT_COLUMNS}
    for row_number, row in enumerate(rows):
        label = (row[names["label"]] or "").strip()
        if not label:
            raise ValueError(f"{path} row {row_number}: the label column {names['label']!r} is empty.")
        cases["text"].append(row[names["text"]] or "")
        cases["label"].append(label)
        cases["functionality"].append((row[names["functionality"]] or "").strip())
    return cases


def expected_ids(labels: list[str], label_names: list[str], label_map: dict[str, str], path: str) -> np.ndarray:
    """The model's label id each case expects; every label the model lacks is named in one error."""
    mapped = [label_map.get(label, label) for label in labels]
    unknown = sorted({label for label, name in zip(labels, mapped, strict=True) if name not in label_names})
    if unknown:
        example = json.dumps({**label_map, **dict.fromkeys(unknown, label_names[0])})
        raise ValueError(
            f"{path}: label(s) {unknown} are neither in label_map {label_map} nor among the model's labels "
            f"{label_names}; add each to --label-map (report.label_map) as the model label it means, e.g. "
            f"--label-map '{example}'."
        )
    return np.asarray([label_names.index(name) for name in mapped], dtype=np.int64)


def _stratified_bootstrap(passed: np.ndarray, strata: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """The overall pass rate's 95% percentile interval, resampling cases within each functionality."""
    rng = np.random.default_rng(seed)
    totals = np.zeros(n_boot)
    for stratum in np.unique(strata):
        values = passed[strata == stratum]
        totals += values[rng.integers(0, len(values), size=(n_boot, len(values)))].sum(axis=1)
    return percentile_interval(totals / len(passed))


def functional_tests(
    probabilities: Callable[[list[str]], np.ndarray],
    path: str,
    label_names: list[str],
    label_map: dict[str, str] | None = None,
    columns: dict[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    max_failures: int = 3,
) -> dict[str, Any]:
    """Run a functional-test CSV through the model: pass rate per functionality, worst first, and overall.

    Args:
        probabilities: Texts -> [n, num_labels] softmax probabilities.
        path: The CSV (HateCheck's format by default).
        label_names: The model's labels, by id.
        label_map: The CSV's labels -> the model's label names; a CSV label that is already a model label
            needs no entry.
        columns: Overrides of `DEFAULT_COLUMNS` by role (`text`, `label`, `functionality`).
        n_boot: Bootstrap resamples for the overall pass rate's interval.
        seed: Seeds that bootstrap.
        max_failures: Failing cases kept per functionality, the most confidently wrong first.

    Returns:
        Plain values: `n`, `passed`, `pass_rate` (a float) and its `ci` (stratified bootstrap), `columns`,
        `interval_method`, and `functionalities`, sorted by pass rate (worst first, then larger n first),
        each {functionality, n, passed, pass_rate: {value, ci (Wilson)}, failures: [{row, text, expected,
        predicted, probability}]}, where `expected` is the CSV's label and `predicted` the model's.

    Raises:
        ValueError: A missing column, a label neither mapped nor the model's, a scorer output of the wrong
            shape, or n_boot < 1.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot is {n_boot}; the interval needs at least 1 resample (1,000 or more is usual).")
    cases = read_cases(path, columns)
    expected = expected_ids(cases["label"], label_names, label_map or {}, path)
    scores = np.asarray(probabilities(cases["text"]), dtype=np.float64)
    if scores.shape != (len(expected), len(label_names)):
        raise ValueError(
            f"the scorer returned shape {scores.shape} for {len(expected)} cases of {path}; expected "
            f"({len(expected)}, {len(label_names)}), one probability per label name."
        )
    predicted = scores.argmax(axis=1)
    passed = predicted == expected
    strata = np.asarray(cases["functionality"])
    rows = []
    for functionality in sorted(set(cases["functionality"])):
        members = np.flatnonzero(strata == functionality)
        failing = members[~passed[members]]
        # The most confidently wrong failures first: they show what the model believes, not a near tie.
        failing = failing[np.argsort(-scores[failing, predicted[failing]], kind="stable")][:max_failures]
        n, n_passed = len(members), int(passed[members].sum())
        rows.append(
            {
                "functionality": functionality,
                "n": n,
                "passed": n_passed,
                "pass_rate": {"value": n_passed / n, "ci": wilson_interval(n_passed, n)},
                "failures": [
                    {
                        "row": int(i),
                        "text": cases["text"][i],
                        "expected": cases["label"][i],
                        "predicted": label_names[predicted[i]],
                        "probability": float(scores[i, predicted[i]]),
                    }
                    for i in failing
                ],
            }
        )
    rows.sort(key=lambda r: (r["pass_rate"]["value"], -r["n"], r["functionality"]))
    total_passed = int(passed.sum())
    return {
        "n": len(passed),
        "passed": total_passed,
        "pass_rate": total_passed / len(passed),
        "ci": _stratified_bootstrap(passed.astype(np.float64), strata, n_boot, seed),
        "columns": {**DEFAULT_COLUMNS, **(columns or {})},
        "interval_method": "per functionality: 95% Wilson score; overall: 95% bootstrap within functionalities",
        "n_boot": n_boot,
        "functionalities": rows,
    }


def plot_functional(result: dict[str, Any], path: str, worst: int = 15) -> Any:
    """A PNG of the `worst` functionalities' pass rates with their 95% intervals; returns the figure.

    Args:
        result: `functional_tests`'s result.
        path: Where the PNG goes.
        worst: How many functionalities to show, worst first.

    Returns:
        The matplotlib figure: one horizontal bar per functionality shown, the overall pass rate dashed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["functionalities"][:worst]
    values = np.array([r["pass_rate"]["value"] for r in rows])
    low, high = np.array([r["pass_rate"]["ci"] for r in rows]).reshape(-1, 2).T
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.6))
    ax.barh(range(len(rows)), values, xerr=np.clip([values - low, high - values], 0, None), color="#4c72b0", capsize=3)
    ax.set_yticks(range(len(rows)), [f"{r['functionality']} (n={r['n']})" for r in rows])
    ax.invert_yaxis()
    ax.axvline(result["pass_rate"], color="k", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("pass rate")
    shown = f"worst {len(rows)} of {len(result['functionalities'])}"
    ax.set_title(
        f"functional tests, {shown} functionalities (95% Wilson intervals)\n"
        f"dashed: overall pass rate {result['pass_rate']:.3f} ({result['passed']} of {result['n']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
