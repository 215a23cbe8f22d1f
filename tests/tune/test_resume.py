"""`fmdist tune --resume` after the driver was interrupted (SIGINT, as Ctrl+C sends) mid-search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fmdist.config import from_dict
from fmdist.tune.search import TRIALS_DIR, tune_run
from tests.conftest import TINY_MODEL

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]


def _trial_states(search_dir: Path) -> dict[str, str]:
    """trial id -> status, as Tune last saved them in the experiment state file."""
    states = {}
    for path in search_dir.glob("experiment_state-*.json"):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # being rewritten
        for trial_json, _ in data.get("trial_data", []):
            trial = json.loads(trial_json)
            states[trial["trial_id"]] = trial["status"]
    return states


def test_resume_after_interrupt_runs_only_unfinished_trials(sentiment_data, tmp_path):
    import ray

    raw = {
        "model": dict(TINY_MODEL),
        "data": {"train": sentiment_data["train"], "eval": sentiment_data["eval"]},
        "train": {"max_steps": 10, "micro_batch_size": 8, "eval_every_steps": 5, "log_every_steps": 5},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
        "run": {"name": "resumable", "storage_path": str(tmp_path / "runs")},
        "tune": {
            "search_space": {"train.lr": {"grid": [5e-3, 3e-3, 1e-3]}},
            "metric": "eval/loss",
            "mode": "min",
            "num_samples": 1,
            "max_concurrent_trials": 1,
        },
    }
    config_path = tmp_path / "tune.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "resumable"
    # The driver joins this session's cluster, as `ray job submit` would run it on a cluster.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log_path = tmp_path / "driver.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "fmdist.cli", "tune", str(config_path)], env=env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 600
        states: dict[str, str] = {}
        while time.monotonic() < deadline and driver.poll() is None:
            states = _trial_states(run_dir / "search")
            if "TERMINATED" in states.values() and "RUNNING" in states.values():
                break
            time.sleep(2)
        assert driver.poll() is None, log_path.read_text()[-3000:]
        driver.send_signal(signal.SIGINT)
        rc = driver.wait(timeout=300)
    output = log_path.read_text()
    assert rc == 130, output[-3000:]
    assert "--resume" in output
    finished = [trial for trial, status in _trial_states(run_dir / "search").items() if status == "TERMINATED"]
    assert 1 <= len(finished) < 3
    before = {t: (run_dir / TRIALS_DIR / t / "metrics.json") for t in finished}
    snapshot = {t: (p.stat().st_mtime_ns, json.loads(p.read_text())) for t, p in before.items()}

    summary = tune_run(from_dict(raw), resume=True)
    rows = {r["trial"]: r for r in summary["leaderboard"]}
    assert len(rows) == 3 and all(r["status"] == "DONE" and r["steps"] == 10 for r in rows.values()), rows
    for trial, (mtime, metrics) in snapshot.items():
        assert before[trial].stat().st_mtime_ns == mtime  # not trained again
        assert rows[trial]["final_metric"] == pytest.approx(metrics["eval/loss"], rel=1e-9)
    assert (run_dir / "best-model" / "model.safetensors").is_file()
