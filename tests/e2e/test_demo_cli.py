"""The demo as a user runs it: the `fmdist` command in a fresh process (its own local Ray), then
export, eval and predict on what it produced. Shortened to 60 steps to fit the test budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmdist.train.watch import TENSORBOARD_DIR, read_events

REPO = Path(__file__).resolve().parents[2]
FMDIST = [sys.executable, "-m", "fmdist.cli"]


def fmdist(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([*FMDIST, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_demo_trains_exports_and_evaluates(tmp_path):
    config = REPO / "configs" / "sst2-minilm.yaml"
    train = fmdist(
        "train", str(config), "train.max_steps=60", "run.name=e2e", f"run.storage_path={tmp_path}", cwd=tmp_path
    )
    assert "=== fmdist run summary ===" in train.stdout
    # The console: fmdist's own lines, one per log step (25) from rank 0, then the summary; none of the
    # workers' third-party output (Hugging Face load reports, DeepSpeed op builds, Ray Train's chatter).
    console = train.stdout + train.stderr
    for noise in ("LOAD REPORT", "Loading weights", "FutureWarning", "deepspeed_shm_comm_op", "RayTrainWorker",
                  "TrainController", "Started a local Ray instance"):  # fmt: skip
        assert noise not in console, noise
    steps = [int(line.split(" step ")[1].split("/")[0]) for line in console.splitlines() if " | loss " in line]
    assert steps == [25, 50, 60]
    assert len(console.splitlines()) <= 40, console
    timings = json.loads((tmp_path / "e2e" / "metrics.json").read_text())["timings"]
    phases = {k: v for k, v in timings.items() if k != "time_to_first_step_s"}
    assert {"driver_setup_s", "ray_start_s", "worker_group_s", "model_load_s", "first_step_s"} <= set(phases)
    assert timings["time_to_first_step_s"] == pytest.approx(sum(phases.values()))
    series = read_events(str(tmp_path / "e2e" / TENSORBOARD_DIR))
    assert [step for step, _ in series["train/loss"]] == [25, 50, 60]
    metrics = json.loads((tmp_path / "e2e" / "metrics.json").read_text())
    assert metrics["step"] == 60
    # 1,920 sentences of the real pretrained encoder: well above chance (51%) on GLUE dev.
    assert metrics["eval/accuracy"] > 0.7, metrics["eval/accuracy"]

    fmdist("export", str(tmp_path / "e2e"), str(tmp_path / "model"), cwd=tmp_path)
    fmdist(
        "eval",
        str(tmp_path / "model"),
        "--data",
        str(REPO / "data/sst2/glue-dev.parquet"),
        "--output",
        "m.json",
        cwd=tmp_path,
    )
    exported = json.loads((tmp_path / "m.json").read_text())
    assert exported["confusion_matrix"] == metrics["eval"]["confusion_matrix"]

    out = fmdist(
        "predict",
        str(tmp_path / "model"),
        "--json",
        "--text",
        "a gorgeous, moving film",
        "--text",
        "a dull mess",
        cwd=tmp_path,
    )
    preds = [json.loads(line) for line in out.stdout.splitlines()]
    assert [p["label"] for p in preds] == ["positive", "negative"]


def test_config_errors_exit_2_and_name_the_fields(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: x}\ntrain: {micro_batch_size: 0, lr_schedul: linear}\n")
    proc = subprocess.run([*FMDIST, "train", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.lr_schedul: unknown field. Did you mean `lr_schedule`?" in proc.stderr
    assert "train.micro_batch_size: must be greater than 0, got 0." in proc.stderr


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ["export", str(tmp_path / "no-such-run"), str(tmp_path / "out")]
    plain = subprocess.run([*FMDIST, *args], capture_output=True, text=True)
    assert plain.returncode == 1
    assert "is not a run or checkpoint directory" in plain.stderr and "--debug" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run([*FMDIST, "--debug", *args], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
