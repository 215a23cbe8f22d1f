"""Metrics derived from a confusion matrix."""

from __future__ import annotations

import pytest

from fmdist.eval.metrics import classification_metrics, flat_scalars, format_report


def test_metrics_from_confusion_matrix():
    # rows = truth: 8 negatives (6 right), 4 positives (3 right)
    m = classification_metrics([[6, 2], [1, 3]], loss_sum=6.0, label_names=["neg", "pos"])
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["loss"] == pytest.approx(0.5)
    assert m["per_class"]["pos"]["precision"] == pytest.approx(3 / 5)
    assert m["per_class"]["pos"]["recall"] == pytest.approx(3 / 4)
    assert m["per_class"]["neg"]["f1"] == pytest.approx(2 * (6 / 7) * (6 / 8) / (6 / 7 + 6 / 8))
    assert m["macro_f1"] == pytest.approx((m["per_class"]["neg"]["f1"] + m["per_class"]["pos"]["f1"]) / 2)
    report = format_report(m)
    assert "neg" in report and "confusion matrix" in report
    assert flat_scalars(m, "eval")["eval/accuracy"] == pytest.approx(0.75)


def test_class_never_predicted_has_zero_precision():
    m = classification_metrics([[5, 0], [5, 0]], loss_sum=0.0)
    assert m["per_class"]["1"]["precision"] == 0.0
    assert m["per_class"]["1"]["f1"] == 0.0
