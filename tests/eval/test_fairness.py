"""Per-group metrics: small groups are listed and flagged, never hidden, and kept out of the gaps."""

from __future__ import annotations

import numpy as np
import pytest

from fmdist.eval.fairness import group_metrics, wilson_interval

LABELS = ["negative", "positive"]


def _rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Two groups of 200 predicted positive at 30% and 60%, and one row of its own, predicted positive."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, 401)
    y_pred = np.concatenate([rng.random(200) < 0.3, rng.random(200) < 0.6, [True]]).astype(int)
    return y_true, y_pred, ["a"] * 200 + ["b"] * 200 + ["lone"]


def test_a_group_of_one_is_flagged_wide_and_left_out_of_the_gaps():
    """Its bootstrap interval would be [x, x], zero wide; the Wilson interval flags it. Counted in, it
    would make the parity difference max(0.6, 1) - min(0.3, 1) about 0.7 instead of 0.3."""
    y_true, y_pred, groups = _rows()
    result = group_metrics(y_true, y_pred, groups, LABELS, n_boot=50, min_group_size=30)
    rows = {r["group"]: r for r in result["groups"]}
    lone = rows["lone"]
    assert lone["size"] == 1 and lone["wide"] and not lone["in_gaps"]
    correct = int(y_true[-1] == y_pred[-1])
    assert lone["metrics"]["accuracy"] == {"value": float(correct), "ci": wilson_interval(correct, 1)}
    assert rows["a"]["in_gaps"] and rows["b"]["in_gaps"] and not rows["a"]["wide"]
    rate = {g: y_pred[np.asarray(groups) == g].mean() for g in ("a", "b")}
    gap = result["gaps"]["demographic_parity_difference"]
    assert gap["value"] == pytest.approx(abs(rate["b"] - rate["a"]), abs=1e-12)
    assert gap["ci"][0] < gap["value"] < gap["ci"][1]
    assert "lone" in result["gaps_note"]
    assert result["overall"]["accuracy"]["value"] == pytest.approx(float((y_true == y_pred).mean()))


def test_gaps_need_two_groups_of_the_minimum_size():
    y_true, y_pred, groups = _rows()
    result = group_metrics(y_true, y_pred, groups, LABELS, n_boot=20, min_group_size=201)
    assert result["gaps"] == {}
    assert result["gaps_note"].startswith("no gaps: they need two groups of at least 201 rows")
    assert [r["size"] for r in result["groups"]] == [200, 200, 1]  # every group still listed
