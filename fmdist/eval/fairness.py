"""Per-group metrics of a classifier with bootstrap intervals, and the gaps between groups (fairlearn).

fairlearn's `MetricFrame` computes every metric per group, and with `n_boot` resamples the whole frame
(overall, per group, the between-group difference and ratio, the worst group) on each resample of the
rows, so an interval of a gap re-computes the gap, worst group included, in every resample. The
equalized-odds difference is a maximum of two differences (true- and false-positive rates), which no
MetricFrame aggregate gives per resample; its interval calls fairlearn's own
`equalized_odds_difference` on the same number of seeded resamples.

Small groups are never hidden: each group reports its size, and a group whose accuracy interval is wider
than `wide_interval` is flagged so a reader does not over-read its point estimate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

QUANTILES = (0.025, 0.975)
"""The 95% interval: the 2.5th and 97.5th percentiles of the bootstrap distribution."""


def _binary(metric: Callable[..., float], positive: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """A fairlearn rate metric on 'is the positive label' (one-vs-rest for more than two labels)."""

    def rate(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        return float(metric(np.asarray(y_true) == positive, np.asarray(y_pred) == positive, pos_label=True))

    return rate


def metric_functions(label_names: list[str], positive: int) -> dict[str, Callable[[Any, Any], float]]:
    """The per-group metrics: the task's headline pair (accuracy, macro-F1) and the fairness rates.

    Each is bootstrapped per group, and fairlearn's frame costs about 10 ms per metric per resample, so
    the F1 of each label (in the overall evaluation) is left out here.
    """
    from fairlearn.metrics import false_positive_rate, selection_rate, true_positive_rate
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(len(label_names)))
    functions: dict[str, Callable[[Any, Any], float]] = {
        "accuracy": accuracy_score,
        "macro_f1": partial(f1_score, labels=labels, average="macro", zero_division=0),
    }
    functions["selection_rate"] = _binary(selection_rate, positive)
    functions["true_positive_rate"] = _binary(true_positive_rate, positive)
    functions["false_positive_rate"] = _binary(false_positive_rate, positive)
    return functions


def _interval(low: Any, high: Any) -> list[float]:
    return [float(low), float(high)]


def group_metrics(
    y_true: list[int] | np.ndarray,
    y_pred: list[int] | np.ndarray,
    groups: list[str],
    label_names: list[str],
    positive_label: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    wide_interval: float = 0.2,
) -> dict[str, Any]:
    """Every metric per group with its 95% bootstrap interval, the group sizes, and the gap metrics.

    Args:
        y_true: Gold label ids.
        y_pred: Predicted label ids.
        groups: The group of each row (a group column's values, or identity groups found in the text).
        label_names: The model's labels, by id.
        positive_label: The label whose rate the fairness gaps compare (demographic parity, equalized
            odds); default: the second label of a binary model, else the first.
        n_boot: Bootstrap resamples (seeded).
        seed: Seeds the resampling.
        wide_interval: A group whose accuracy interval is wider than this is flagged `wide`.

    Returns:
        Plain values: `overall` and each of `groups` (size, metrics with value and ci, wide), `gaps`
        (demographic parity difference and ratio, equalized odds difference, accuracy difference, worst-group
        accuracy and which group), and the settings.
    """
    import pandas as pd
    from fairlearn.metrics import MetricFrame, count, equalized_odds_difference

    if n_boot < 1:
        raise ValueError(f"n_boot is {n_boot}; the intervals need at least 1 resample (1,000 or more is usual).")
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if not len(y_true) == len(y_pred) == len(groups):
        raise ValueError(f"{len(y_true)} labels, {len(y_pred)} predictions and {len(groups)} groups: one each per row.")
    if positive_label is None:
        positive = 1 if len(label_names) == 2 else 0
    elif positive_label in label_names:
        positive = label_names.index(positive_label)
    else:
        raise ValueError(f"positive_label {positive_label!r} is not one of the model's labels {label_names}.")
    functions = metric_functions(label_names, positive)
    sensitive = pd.Series(groups, name="group")
    with warnings.catch_warnings():
        # A resample may leave a group without positives (a rate of 0/0): fairlearn warns and returns 0.
        warnings.simplefilter("ignore")
        frame = MetricFrame(
            metrics={**functions, "size": count},
            y_true=y_true,
            y_pred=y_pred,
            sensitive_features=sensitive,
            n_boot=n_boot,
            ci_quantiles=list(QUANTILES),
            random_state=seed,
        )
        eod_samples = _resampled(
            lambda yt, yp, g: equalized_odds_difference(yt == positive, yp == positive, sensitive_features=g),
            y_true, y_pred, np.asarray(groups), n_boot, seed,
        )  # fmt: skip
        eod = float(equalized_odds_difference(y_true == positive, y_pred == positive, sensitive_features=sensitive))
    low, high = frame.by_group_ci
    by_group = frame.by_group
    rows = []
    for group in by_group.index:
        metrics = {
            name: {
                "value": float(by_group.loc[group, name]),
                "ci": _interval(low.loc[group, name], high.loc[group, name]),
            }
            for name in functions
        }
        width = metrics["accuracy"]["ci"][1] - metrics["accuracy"]["ci"][0]
        rows.append({"group": str(group), "size": int(by_group.loc[group, "size"]), "metrics": metrics,
                     "wide": bool(width > wide_interval)})  # fmt: skip
    overall_low, overall_high = frame.overall_ci
    overall = {
        name: {"value": float(frame.overall[name]), "ci": _interval(overall_low[name], overall_high[name])}
        for name in functions
    }
    difference, ratio = frame.difference(), frame.ratio()
    difference_ci, ratio_ci, minimum_ci = frame.difference_ci(), frame.ratio_ci(), frame.group_min_ci()
    worst = by_group["accuracy"].idxmin()
    gaps = {
        "demographic_parity_difference": {
            "value": float(difference["selection_rate"]),
            "ci": _interval(difference_ci[0]["selection_rate"], difference_ci[1]["selection_rate"]),
        },
        "demographic_parity_ratio": {
            "value": float(ratio["selection_rate"]),
            "ci": _interval(ratio_ci[0]["selection_rate"], ratio_ci[1]["selection_rate"]),
        },
        "equalized_odds_difference": {"value": eod, "ci": _interval(*np.quantile(eod_samples, QUANTILES))},
        "accuracy_difference": {
            "value": float(difference["accuracy"]),
            "ci": _interval(difference_ci[0]["accuracy"], difference_ci[1]["accuracy"]),
        },
        "worst_group_accuracy": {
            "value": float(by_group.loc[worst, "accuracy"]),
            "ci": _interval(minimum_ci[0]["accuracy"], minimum_ci[1]["accuracy"]),
            "group": str(worst),
        },
    }
    return {
        "positive_label": label_names[positive],
        "n_boot": n_boot,
        "seed": seed,
        "interval": list(QUANTILES),
        "wide_interval": wide_interval,
        "size": len(y_true),
        "overall": overall,
        "groups": rows,
        "gaps": gaps,
    }


def _resampled(
    statistic: Callable[[np.ndarray, np.ndarray, np.ndarray], float],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    groups: np.ndarray,
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """`statistic` on `n_boot` seeded resamples of the rows (with replacement)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for i in range(n_boot):
        index = rng.integers(0, len(y_true), len(y_true))
        out[i] = statistic(y_true[index], y_pred[index], groups[index])
    return out


def plot_groups(result: dict[str, Any], path: str) -> Any:
    """A PNG of each group's accuracy and selection rate with their intervals; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["groups"]
    names = [f"{r['group']} (n={r['size']}){' *' if r['wide'] else ''}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.6), sharey=True)
    for ax, metric, title in (
        (axes[0], "accuracy", "accuracy"),
        (axes[1], "selection_rate", f"rate of predicting {result['positive_label']!r}"),
    ):
        values = [r["metrics"][metric]["value"] for r in rows]
        errors = [
            [v - r["metrics"][metric]["ci"][0] for v, r in zip(values, rows, strict=True)],
            [r["metrics"][metric]["ci"][1] - v for v, r in zip(values, rows, strict=True)],
        ]
        ax.barh(range(len(rows)), values, xerr=np.clip(errors, 0, None), color="#4c72b0", capsize=3)
        ax.axvline(result["overall"][metric]["value"], color="k", linestyle="--", linewidth=1, label="overall")
        ax.set_xlim(0, 1)
        ax.set_title(title)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right")
    fig.suptitle(f"per group, 95% bootstrap intervals ({result['n_boot']} resamples); * = wide interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
