"""PBT over 2 trials x 2 ZeRO-3 workers: the weaker trial continues from the stronger one's shards, and
round runs that no trial needs any more are deleted as the search goes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmdist.config import from_dict
from fmdist.train.checkpoint import find
from fmdist.train.export import consolidated_state_dict
from fmdist.tune import pbt
from fmdist.tune.search import TRIALS_DIR, tune_run

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def test_pbt_exploit_continues_from_the_donors_zero3_checkpoint(tiny_config, monkeypatch):
    # The scheduler (in this process) deletes round runs as the search goes, the donor's round 1 among
    # them once the weaker trial has copied it: consolidate each one's weights just before it goes.
    removed = {}
    delete_round = pbt.delete_round

    def consolidate_then_delete(run_uri: str) -> None:
        removed[find(run_uri)] = consolidated_state_dict(find(run_uri))
        delete_round(run_uri)

    monkeypatch.setattr(pbt, "delete_round", consolidate_then_delete)
    raw = tiny_config(
        train={"max_steps": 20, "log_every_steps": 10},
        deepspeed={"zero_stage": 3},
        run={"name": "pbt"},
        tune={
            # Two learning rates far apart: after round 1 the weaker trial copies the stronger one.
            "search_space": {"train.lr": {"grid": [5e-3, 1e-6]}},
            "metric": "eval/loss",
            "mode": "min",
            "num_samples": 1,
            "scheduler": "pbt",
            "perturbation_interval_steps": 10,
            "quantile_fraction": 0.5,
            "resample_probability": 0.0,
        },
    )
    summary = tune_run(from_dict(raw))
    rows = {r["trial"]: r for r in summary["leaderboard"]}
    assert len(rows) == 2 and all(r["status"] == "DONE" and r["steps"] == 20 for r in rows.values())
    exploiters = [r for r in rows.values() if r["lineage"][0]["trial"] != r["trial"]]
    assert len(exploiters) == 1, [r["lineage"] for r in rows.values()]
    weak = exploiters[0]
    (donor_id,) = set(rows) - {weak["trial"]}
    donor_round, own_round = weak["lineage"]
    # Round 1 is the donor's (steps 0-10); round 2 is the weak trial's, from the donor's step 10.
    assert donor_round["trial"] == donor_id and donor_round["params"] == rows[donor_id]["config"]
    assert (donor_round["from_step"], donor_round["to_step"]) == (0, 10)
    assert own_round["trial"] == weak["trial"] and own_round["restored_from"] == donor_round["checkpoint"]
    assert (own_round["from_step"], own_round["restore/step"], own_round["to_step"]) == (10, 10, 20)
    assert own_round["eval/loss"] == pytest.approx(weak["final_metric"])  # the plot draws the lineage
    # The donor's lr perturbed by 0.8 or 1.2 (resample_probability 0).
    assert own_round["params"]["train.lr"] / donor_round["params"]["train.lr"] in (
        pytest.approx(0.8),
        pytest.approx(1.2),
    )
    assert weak["config"]["train.lr"] == own_round["params"]["train.lr"]
    # The weights the weak trial's workers restored are the donor's step-10 ZeRO-3 shards, consolidated.
    assert donor_round["checkpoint"] in removed, sorted(removed)
    donor_state = removed[donor_round["checkpoint"]].values()
    donor_weights = [t.double() for t in donor_state if t.is_floating_point()]
    assert own_round["restore/weights_sum"] == pytest.approx(sum(t.sum().item() for t in donor_weights), rel=1e-9)
    assert own_round["restore/weights_sum_sq"] == pytest.approx(
        sum((t * t).sum().item() for t in donor_weights), rel=1e-9
    )
    run_dir = Path(summary["run_dir"])
    # 4 rounds were trained; the donor's first (copied) and the weak trial's own first are deleted, and
    # each trial's final model is left (the leaderboard links it; the best one is exported).
    assert len(removed) == 2, sorted(removed)
    finals = {Path(pbt.round_run(r["lineage"][-1]["checkpoint"])).name for r in rows.values()}
    assert {p.name for p in (run_dir / TRIALS_DIR).iterdir()} == finals
    assert json.loads((run_dir / "leaderboard.json").read_text())[0]["lineage"]
    assert (run_dir / "best-model" / "model.safetensors").is_file()
    assert (run_dir / "best.yaml").read_text().startswith("# PBT")
