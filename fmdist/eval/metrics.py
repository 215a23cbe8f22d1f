"""Classification metrics from a confusion matrix, and a report a person can read.

Sequence and image classification share this: workers only gather a confusion matrix and a loss sum
(the task's fixed-size count tensor, one all-reduce); every metric is derived from those here, so
distributed metrics equal single-process ones exactly.
"""

from __future__ import annotations

from typing import Any

import torch


def confusion_counts_size(num_labels: int) -> int:
    """Count-tensor layout: confusion[true, predicted] flattened (n*n), then the loss sum."""
    return num_labels * num_labels + 1


def count_confusion(counts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
    """Add one batch to the counts in place (stays on the device: no host sync)."""
    n = logits.shape[-1]
    predicted = logits.argmax(dim=-1)
    counts[: n * n] += torch.bincount(labels * n + predicted, minlength=n * n).to(counts.dtype)
    counts[n * n] += loss.detach().double() * labels.numel()


def confusion_metrics() -> dict[str, Any]:
    """The metric fields of a classification task's record (sequence and image classification):
    counts are a confusion matrix and a loss sum; metrics come from `classification_metrics`."""
    return {
        "counts_size": lambda cfg: confusion_counts_size(cfg.model.num_labels),
        "count": lambda counts, out, batch, cfg: count_confusion(counts, out.logits, batch["labels"], out.loss),
        "finalize": lambda counts, cfg: finalize_confusion(counts, cfg.model.label_names),
        "format_report": format_report,
    }


def finalize_confusion(counts: list[float], label_names: list[str]) -> dict[str, Any]:
    n = len(label_names)
    confusion = [[int(counts[i * n + j]) for j in range(n)] for i in range(n)]
    return classification_metrics(confusion, counts[n * n], label_names)


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
    metrics = {
        "loss": loss_sum / total if total else float("nan"),
        "accuracy": correct / total if total else float("nan"),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / n,
        "num_examples": total,
        "per_class": per_class,
        "confusion_matrix": confusion,
        "label_names": names,
        "headline": "accuracy",
    }
    metrics["scalars"] = {k: float(metrics[k]) for k in ("loss", "accuracy", "macro_f1")} | {
        f"f1_{name}": float(c["f1"]) for name, c in per_class.items()
    }
    return metrics


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
    """A task's scalar metrics as `prefix/name` keys, for ray.train.report and Tune."""
    return {f"{prefix}/{k}": v for k, v in metrics["scalars"].items()}
