"""Classification metrics from a confusion matrix, and a report a person can read.

Workers only gather a confusion matrix and a loss sum (a fixed-size all-reduce); every metric is
derived from those here, so distributed metrics equal single-process ones exactly.
"""

from __future__ import annotations

from typing import Any


def classification_metrics(
    confusion: list[list[int]], loss_sum: float, label_names: list[str] | None = None
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro-F1 and the matrix itself (rows = truth)."""
    n = len(confusion)
    names = label_names or [str(i) for i in range(n)]
    total = sum(sum(row) for row in confusion)
    correct = sum(confusion[i][i] for i in range(n))
    per_class = {}
    for i, name in enumerate(names):
        tp = confusion[i][i]
        predicted = sum(confusion[j][i] for j in range(n))
        support = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "loss": loss_sum / total if total else float("nan"),
        "accuracy": correct / total if total else float("nan"),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / n,
        "num_examples": total,
        "per_class": per_class,
        "confusion_matrix": confusion,
        "label_names": names,
    }


def format_report(metrics: dict[str, Any]) -> str:
    """The classification report and confusion matrix as fixed-width text."""
    names = metrics["label_names"]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, c in metrics["per_class"].items():
        lines.append(f"{name:<{width}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>10}")
    lines.append("")
    lines.append(f"{'accuracy':<{width}}{metrics['accuracy']:>30.4f}{metrics['num_examples']:>10}")
    lines.append(f"{'macro f1':<{width}}{metrics['macro_f1']:>30.4f}")
    lines.append(f"{'loss':<{width}}{metrics['loss']:>30.4f}")
    lines.append("")
    lines.append("confusion matrix (rows = true label, columns = predicted)")
    lines.append(f"{'':<{width}}" + "".join(f"{n[:9]:>10}" for n in names))
    for name, row in zip(names, metrics["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>10}" for v in row))
    return "\n".join(lines)


def flat_scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The scalar metrics as `prefix/name` keys, for ray.train.report and Tune."""
    out = {f"{prefix}/{k}": float(metrics[k]) for k in ("loss", "accuracy", "macro_f1")}
    for name, c in metrics["per_class"].items():
        out[f"{prefix}/f1_{name}"] = float(c["f1"])
    return out
