"""Per-group metrics of a classifier with bootstrap intervals, and the gaps between groups (fairlearn).

fairlearn's `MetricFrame` computes every metric per group, and with `n_boot` resamples the whole frame
(overall, per group, the between-group difference and ratio, the worst group) on each resample of the
rows, so an interval of a gap re-computes the gap, worst group included, in every resample. The
equalized-odds difference is a maximum of two differences (true- and false-positive rates), which no
MetricFrame aggregate gives per resample; its interval calls fairlearn's own
`equalized_odds_difference` on the same number of seeded resamples.

Small groups are never hidden: each group reports its size, and a group whose accuracy interval is wider
than `wide_interval` is flagged so a reader does not over-read its point estimate. Groups of fewer than
`min_group_size` rows are listed with their values and the Wilson score interval of their accuracy (a
bootstrap of a group of 1 is [x, x], zero wide, and would hide exactly the groups the flag is for), and
left out of the bootstrap and the gaps: a gap over groups of one or two rows is 1.0 by construction (one row predicted
positive, another not) and says nothing about the model. The bootstrap's cost grows with the number of
groups (fairlearn recomputes the whole frame, about 20 ms per group, per resample), so leaving such
groups out also keeps the report fast.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from fmdist.runtime import get_logger

log = get_logger("fmdist.report")

FAST_SKLEARN = {"assume_finite": True, "skip_parameter_validation": True}
"""scikit-learn settings inside the bootstrap: the labels are ids we made, so its per-call argument and
finiteness checks (about a third of each resample's time) are skipped; results are unchanged."""

QUANTILES = (0.025, 0.975)
"""The 95% interval: the 2.5th and 97.5th percentiles of the bootstrap distribution."""

Z_95 = 1.959963984540054
"""The standard normal quantile of 0.975: the Wilson interval's 95%."""


def percentile_interval(samples: Any) -> list[float]:
    """The 95% percentile interval of bootstrap samples (every section's intervals, unless named otherwise)."""
    low, high = np.quantile(samples, QUANTILES)
    return [float(low), float(high)]


def wilson_interval(passed: int, n: int) -> list[float]:
    """The 95% Wilson score interval of a proportion `passed / n` (honest at 0/n and n/n and for small n)."""
    if n == 0:
        return [0.0, 1.0]
    p, z2 = passed / n, Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def format_interval(entry: dict[str, Any], digits: int = 3) -> str:
    """'value [low, high]', or the value alone where there is no interval (a group below the minimum size)."""
    if entry.get("ci") is None:
        return f"{entry['value']:.{digits}f} (no interval)"
    low, high = entry["ci"]
    return f"{entry['value']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


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
    min_group_size: int = 30,
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
        min_group_size: Groups with fewer rows are listed (values, the Wilson interval of accuracy) but
            left out of the bootstrap and the gaps.

    Returns:
        Plain values: `overall` and each of `groups` (size, metrics with value and ci, wide, in_gaps),
        `gaps` (demographic parity difference and ratio, equalized odds difference, accuracy difference,
        worst-group accuracy and which group; empty when fewer than two groups reach `min_group_size`,
        and `gaps_note` says why), and the settings.
    """
    import pandas as pd
    import sklearn
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
    groups = np.asarray([str(g) for g in groups])
    with warnings.catch_warnings(), sklearn.config_context(**FAST_SKLEARN):
        # A resample may leave a group without positives (a rate of 0/0): fairlearn warns and returns 0.
        warnings.simplefilter("ignore")
        # Every group's values, and the overall ones, in one frame without resampling (cheap).
        started = time.perf_counter()
        point = MetricFrame(metrics={**functions, "size": count}, y_true=y_true, y_pred=y_pred,
                            sensitive_features=pd.Series(groups, name="group"))  # fmt: skip
        sizes = point.by_group["size"]
        large = [g for g in sizes.index if sizes[g] >= min_group_size]
        keep = np.isin(groups, large)
        frame = None
        if large:
            # The bootstrap recomputes a frame like `point` (and, for the gaps, an equalized-odds one) per
            # resample: say how long that will take, since it is the report's slowest part.
            seconds = (time.perf_counter() - started) * n_boot * (1.5 if len(large) > 1 else 1)
            log.info("report: bootstrapping %d group(s) of at least %d rows, %d resamples (about %.0f s)",
                     len(large), min_group_size, n_boot, seconds)  # fmt: skip
            frame = MetricFrame(metrics=functions, y_true=y_true[keep], y_pred=y_pred[keep],
                                sensitive_features=pd.Series(groups[keep], name="group"), n_boot=n_boot,
                                ci_quantiles=list(QUANTILES), random_state=seed)  # fmt: skip
    rows = []
    for group in point.by_group.index:
        size = int(sizes[group])
        metrics = {name: {"value": float(point.by_group.loc[group, name]), "ci": None} for name in functions}
        if group in large:
            low, high = frame.by_group_ci
            for name in functions:
                metrics[name]["ci"] = _interval(low.loc[group, name], high.loc[group, name])
        else:
            metrics["accuracy"]["ci"] = wilson_interval(round(metrics["accuracy"]["value"] * size), size)
        width = metrics["accuracy"]["ci"][1] - metrics["accuracy"]["ci"][0]
        rows.append({"group": str(group), "size": size, "metrics": metrics, "wide": bool(width > wide_interval),
                     "in_gaps": group in large})  # fmt: skip
    overall = {name: {"value": float(point.overall[name]), "ci": None} for name in functions}
    if frame is not None and len(large) == len(sizes):  # the frame saw every row: its overall intervals hold
        overall_low, overall_high = frame.overall_ci
        for name in functions:
            overall[name]["ci"] = _interval(overall_low[name], overall_high[name])
    gaps: dict[str, Any] = {}
    note = ""
    small = [str(g) for g in sizes.index if g not in large]
    if small:
        note = (f"{len(small)} group(s) under {min_group_size} rows are listed but left out of the gaps: "
                f"{', '.join(small[:12])}{' ...' if len(small) > 12 else ''}.")  # fmt: skip
    if len(large) < 2:
        note = (f"no gaps: they need two groups of at least {min_group_size} rows, and "
                f"{'only ' + repr(large[0]) + ' has' if large else 'none has'} that many. " + note).strip()  # fmt: skip
    else:
        with warnings.catch_warnings(), sklearn.config_context(**FAST_SKLEARN):
            warnings.simplefilter("ignore")
            yt, yp, g = y_true[keep], y_pred[keep], groups[keep]
            eod_samples = _resampled(
                lambda a, b, c: equalized_odds_difference(a == positive, b == positive, sensitive_features=c),
                yt, yp, g, n_boot, seed,
            )  # fmt: skip
            eod = float(equalized_odds_difference(yt == positive, yp == positive, sensitive_features=g))
        by_group = frame.by_group
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
            "equalized_odds_difference": {"value": eod, "ci": percentile_interval(eod_samples)},
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
        "min_group_size": min_group_size,
        "gaps_note": note,
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
        cis = [r["metrics"][metric]["ci"] or [v, v] for v, r in zip(values, rows, strict=True)]
        errors = [[v - ci[0] for v, ci in zip(values, cis, strict=True)],
                  [ci[1] - v for v, ci in zip(values, cis, strict=True)]]  # fmt: skip
        ax.barh(range(len(rows)), values, xerr=np.clip(errors, 0, None), color="#4c72b0", capsize=3)
        ax.axvline(result["overall"][metric]["value"], color="k", linestyle="--", linewidth=1, label="overall")
        ax.set_xlim(0, 1)
        ax.set_title(title)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right")
    fig.suptitle(
        f"per group, 95% intervals (bootstrap, {result['n_boot']} resamples; Wilson for accuracy under "
        f"{result['min_group_size']} rows); * = wide interval"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
