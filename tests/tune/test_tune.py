"""An ASHA search of 4 trials x 2 workers (world size 2 each), one trial at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fmdist import config
from fmdist.config import ConfigError, from_dict
from fmdist.train.launch import train
from fmdist.tune.search import format_leaderboard, param_space, trial_config, tune_run
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_search_space_and_invalid_samples():
    base = {"data": {"train": "x"}, "tune": {"search_space": {"train.lr": {"loguniform": ["1e-5", "1e-3"]}}}}
    cfg = from_dict(base)
    space = param_space(cfg.tune.search_space)
    assert space["train.lr"].lower == pytest.approx(1e-5)
    # A sampled value that breaks validation fails that trial with the config error.
    with pytest.raises(ConfigError, match="train.micro_batch_size: must be greater than 0"):
        trial_config(cfg.to_dict(), {"train.micro_batch_size": 0})
    with pytest.raises(ConfigError, match="tune.search_space.train.learning_rate: not a config field"):
        from_dict({"data": {"train": "x"}, "tune": {"search_space": {"train.learning_rate": {"choice": [1]}}}})


def test_leaderboard_prints_values_whole():
    """A value cut to 10 characters read as lr 8.1 for 8.101237089385677e-05."""
    cfg = from_dict({"data": {"train": "x"}, "tune": {"search_space": {"train.lr": {"choice": [1]}}}})
    row = {"trial": "t1", "status": "DONE", "best_metric": 0.9, "steps": 10, "worker_seconds": 3.0,
           "config": {"train.lr": 8.101237089385677e-05}}  # fmt: skip
    line = format_leaderboard([row], cfg).splitlines()[-1]
    assert line.split()[-1] == "8.101e-05"


@pytest.mark.slow
def test_asha_stops_weak_trials_and_best_yaml_reproduces(sentiment_data, tmp_path):
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"train": sentiment_data["train"], "eval": sentiment_data["eval"]},
        "train": {
            "max_steps": 40,
            "micro_batch_size": 8,
            "lr": 5e-3,
            "eval_every_steps": 10,
            "log_every_steps": 10,
            "shuffle": False,
        },
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"name": "search", "storage_path": str(tmp_path / "runs")},
        "tune": {
            "search_space": {"train.lr": {"grid": [5e-3, 1e-6, 2e-6, 3e-6]}},
            # Loss separates the learning rates by the first rung (accuracy is still at chance there).
            "metric": "eval/loss",
            "mode": "min",
            "num_samples": 1,
            # One at a time, in grid order: which trial ASHA stops depends on the order results
            # arrive in, and 5e-3 is not yet ahead at every rung-10 evaluation (it can trail briefly).
            "max_concurrent_trials": 1,
            "scheduler": "asha",
            "grace_period_steps": 10,
            "reduction_factor": 2,
        },
    }
    summary = tune_run(from_dict(raw))
    rows = summary["leaderboard"]
    assert len(rows) == 4 and all(r["status"] == "DONE" for r in rows)
    assert any(r["steps"] < 40 for r in rows), [(r["config"], r["steps"]) for r in rows]  # ASHA stopped some
    best = rows[0]
    assert best["config"]["train.lr"] == pytest.approx(5e-3)
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "leaderboard.csv").is_file() and (run_dir / "trials.png").stat().st_size > 10_000
    assert json.loads((run_dir / "leaderboard.json").read_text())[0]["trial"] == best["trial"]
    assert (run_dir / "best-model" / "model.safetensors").is_file()

    best_yaml = yaml.safe_load((run_dir / "best.yaml").read_text())
    assert best_yaml["train"]["lr"] == pytest.approx(5e-3)
    again = train(config.load(run_dir / "best.yaml"))
    assert again["eval/loss"] == pytest.approx(best["final_metric"], abs=1e-6)
