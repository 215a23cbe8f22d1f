"""Whole training runs on Ray Train with DeepSpeed on CPU (gloo), tiny model, synthetic data.

World size: 2 Ray Train workers unless a test says otherwise. The module shares runs between tests
(module-scoped fixtures) because each run costs tens of seconds on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from fmdist.config import from_dict
from fmdist.runtime import KILL_AT_STEP_ENV, KILL_MID_UPLOAD_ENV
from fmdist.train.checkpoint import problems
from fmdist.train.export import export
from fmdist.train.launch import train

pytestmark = pytest.mark.usefixtures("ray_cluster")


def run(raw: dict) -> dict:
    return train(from_dict(raw))


def exported_weights(run_dir: str, out: Path) -> dict[str, torch.Tensor]:
    export(run_dir, str(out))
    return load_file(out / "model.safetensors")


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_runs")


@pytest.fixture(scope="module")
def zero3_run(sentiment_data, module_tmp) -> dict:
    """An uninterrupted ZeRO-3 run, 2 workers, checkpoint every 10 of its 40 steps: the reference."""
    from tests.conftest import TINY_MODEL

    raw = _raw(sentiment_data, module_tmp, "zero3", zero_stage=3, checkpoint_every_steps=10)
    return {"raw": raw, "summary": run(raw), "model": TINY_MODEL}


def _raw(data: dict, root: Path, name: str, zero_stage: int = 2, **run_section) -> dict:
    from tests.conftest import TINY_MODEL

    return {
        "model": dict(TINY_MODEL),
        "data": {"train": data["train"], "eval": data["eval"]},
        "train": {"epochs": 1, "micro_batch_size": 8, "lr": 5e-3, "log_every_steps": 5, "shuffle": False},
        "deepspeed": {"zero_stage": zero_stage},
        "scaling": {"num_workers": 2},
        "run": {"name": name, "storage_path": str(root / "runs"), **run_section},
    }


def assert_learned(summary: dict) -> None:
    assert summary["step"] == 40  # 640 rows / (8 x 2 workers)
    assert summary["train/loss"] < 0.8 * summary["train/first_loss"], summary
    assert summary["eval/accuracy"] > 0.75, summary["eval/accuracy"]
    assert summary["eval"]["num_examples"] == 64  # every eval row counted once, across both workers


def test_zero3_lowers_the_loss_and_checkpoints(zero3_run):
    summary = zero3_run["summary"]
    assert_learned(summary)
    run_dir = Path(summary["run_dir"])
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_step_*"))
    assert checkpoints == ["checkpoint_step_00000030", "checkpoint_step_00000040"]  # keep_checkpoints=2
    last = run_dir / checkpoints[-1]
    # Every rank's ZeRO-3 shard was saved into the one checkpoint directory.
    assert sorted(p.name for p in (last / "ds").glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
    ]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_other_zero_stages_lower_the_loss(sentiment_data, module_tmp, zero_stage):
    assert_learned(run(_raw(sentiment_data, module_tmp, f"zero{zero_stage}", zero_stage=zero_stage)))


def test_export_of_zero3_gives_the_trained_models_predictions(zero3_run, module_tmp):
    from fmdist.predict import evaluate, predict

    out = module_tmp / "export-zero3"
    export(zero3_run["summary"]["run_dir"], str(out))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "ZeRO-3" in card
    # The card's provenance: every training file with its rows and sha256, and the compute spent.
    record = json.loads((out / "fmdist_training.json").read_text())
    train_files = sorted(Path(zero3_run["raw"]["data"]["train"]).glob("*.parquet"))
    shards = {s["path"]: s for s in record["provenance"]["train"]["shards"]}
    assert sorted(shards) == [f.name for f in train_files]
    for f in train_files:
        assert shards[f.name]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert shards[f.name]["rows"] == pq.ParquetFile(f).metadata.num_rows
    assert f"sha256 `{shards[train_files[0].name]['sha256']}`" in card
    assert record["compute"]["train_time_s"] > 0 and "worker-seconds" in card
    # Plain transformers, on the same eval rows: identical confusion matrix, loss equal to fp32 precision.
    trained = zero3_run["summary"]["eval"]
    exported = evaluate(str(out), zero3_run["raw"]["data"]["eval"])
    assert exported["confusion_matrix"] == trained["confusion_matrix"]
    assert exported["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    preds = predict(str(out), ["a wonderful brilliant film", "a dull tedious plot"])
    assert abs(sum(preds[0]["probabilities"].values()) - 1) < 1e-5


def test_two_workers_match_one_worker_with_the_same_global_batch(sentiment_data, module_tmp):
    """2 workers x micro 8 vs 1 worker x micro 8 x accumulation 2: same rows in every step."""
    two = _raw(sentiment_data, module_tmp, "parity2")
    one = _raw(sentiment_data, module_tmp, "parity1")
    one["scaling"]["num_workers"] = 1
    one["train"]["gradient_accumulation_steps"] = 2
    s2, s1 = run(two), run(one)
    assert s1["step"] == s2["step"] == 40
    # Tolerance: fp32 with a different reduction order (all-reduce vs accumulation) over 40 steps.
    assert s1["train/loss"] == pytest.approx(s2["train/loss"], abs=1e-4)
    assert s1["eval/loss"] == pytest.approx(s2["eval/loss"], abs=1e-4)
    diff = max_weight_diff(
        exported_weights(s1["run_dir"], module_tmp / "p1"), exported_weights(s2["run_dir"], module_tmp / "p2")
    )
    assert diff < 1e-4, diff


def test_a_zero3_run_of_two_workers_resumes_on_one_with_the_same_result(zero3_run, module_tmp):
    """2 workers -> 1: accumulation 1 -> 2 keeps the slots, DeepSpeed's universal checkpoint re-cuts the
    ZeRO-3 partitions (weights and Adam moments), and the one worker trains exactly the rows the two had
    left in the epoch, ending with the uninterrupted two-worker run's weights. In-process (world size 1)."""
    from fmdist.data.sources import resolve
    from fmdist.data.stream import EpochStreams
    from fmdist.train.checkpoint import consolidated_state_dict
    from tests.inprocess import run_in_process

    run_dir = Path(zero3_run["summary"]["run_dir"])
    paused = module_tmp / "elastic-2-to-1-from"
    shutil.copytree(run_dir / "checkpoint_step_00000030", paused)
    cfg = from_dict(zero3_run["raw"])
    source = resolve(cfg.data.train)
    record: list[dict] = []
    summary, reports = run_in_process(cfg, source, str(module_tmp / "elastic-2-to-1"), restore=str(paused),
                                      record=record)  # fmt: skip
    assert summary["step"] == 40 and reports[0][0]["restore/step"] == 30
    # The rows the two workers train after step 30: each rank's micro-batches from its 31st on.
    left: Counter = Counter()
    for rank in (0, 1):
        for i, rows in enumerate(EpochStreams(cfg, source, rank, 2).batches(0)):
            left.update(rows["sentence"] if i >= 30 and rows else [])
    trained = Counter(sentence for rows in record for sentence in rows["sentence"])
    assert sum(left.values()) == 160 and trained == left
    resumed = consolidated_state_dict(reports[-1][1])
    whole = consolidated_state_dict(str(run_dir / "checkpoint_step_00000040"))
    assert max_weight_diff(resumed, whole) < 1e-6


@pytest.mark.slow
def test_a_zero2_run_of_one_worker_resumes_on_two_with_every_row_once(sentiment_data, module_tmp, monkeypatch):
    """1 worker x accumulation 2, paused at step 20 of 40, relaunched with scaling.num_workers=2 (the
    config still says accumulation 2: the resume lays it out to 1). Row ids recorded inside the workers
    of both launches: every row exactly once. Weights: those of the same run uninterrupted on 1 worker."""
    from fmdist.data.sources import resolve
    from fmdist.runtime import RECORD_ROWS_ENV
    from fmdist.train.checkpoint import consolidated_state_dict
    from tests.conftest import sentiment_rows, write_shards
    from tests.inprocess import run_in_process

    rows = sentiment_rows(640, seed=1)
    rows["row_id"] = list(range(640))
    data = {"train": str(write_shards(module_tmp / "elastic-data", rows, rows_per_shard=64)),
            "eval": sentiment_data["eval"]}  # fmt: skip
    raw = _raw(data, module_tmp, "elastic-1-to-2", zero_stage=2, checkpoint_every_steps=10)
    raw["scaling"]["num_workers"] = 1
    raw["train"]["gradient_accumulation_steps"] = 2
    _, reports = run_in_process(from_dict(raw), resolve(data["train"]), str(module_tmp / "elastic-reference"))
    reference = consolidated_state_dict(reports[-1][1])

    monkeypatch.setenv(RECORD_ROWS_ENV, str(module_tmp / "elastic-rows"))
    assert train(from_dict(raw), stop_at_step=20)["step"] == 20
    raw["scaling"]["num_workers"] = 2
    summary = run(raw)
    assert summary["step"] == 40 and summary["restore/step"] == 20
    lines = [json.loads(line) for f in sorted((module_tmp / "elastic-rows").glob("rows_rank*.jsonl"))
             for line in f.read_text().splitlines()]  # fmt: skip
    assert len({line["pid"] for line in lines}) == 3  # one worker, then two
    trained = [row_id for line in lines for row_id in line["row_ids"]]
    assert sorted(trained) == list(range(640)), f"{len(trained)} rows trained, {len(set(trained))} distinct"
    # Not bit-equal: ZeRO-2 on 2 workers rounds differently from 1 worker x accumulation 2 (the parity
    # test above allows 1e-4 from step 0); the universal resume itself is exact (test_checkpoint.py).
    resumed = consolidated_state_dict(summary["checkpoint"])
    assert max_weight_diff(resumed, reference) < 2e-4


def test_worker_failure_restarts_from_checkpoint_with_the_same_result(zero3_run, module_tmp, monkeypatch):
    """Rank 1's process is SIGKILLed after step 24; Ray Train restarts the group, which resumes at step 20."""
    raw = _raw(module_tmp_data(zero3_run), module_tmp, "zero3-restarted", zero_stage=3, checkpoint_every_steps=10)
    raw["run"]["max_failures"] = 1
    monkeypatch.setenv(KILL_AT_STEP_ENV, "1:24")
    summary = run(raw)
    assert summary["step"] == 40
    diff = max_weight_diff(
        exported_weights(summary["run_dir"], module_tmp / "restarted"),
        exported_weights(zero3_run["summary"]["run_dir"], module_tmp / "reference"),
    )
    assert diff < 1e-5, diff


def module_tmp_data(zero3_run: dict) -> dict:
    return {"train": zero3_run["raw"]["data"]["train"], "eval": zero3_run["raw"]["data"]["eval"]}


def test_relaunch_resumes_and_a_broken_checkpoint_is_an_error(zero3_run, module_tmp, monkeypatch):
    raw = _raw(module_tmp_data(zero3_run), module_tmp, "zero3-relaunched", zero_stage=3, checkpoint_every_steps=10)
    # Rank 1's process is SIGKILLed halfway through uploading the step-20 checkpoint, and run.max_failures
    # is 0: the run fails naming the cause and how to resume, from step 10 (step 20 is torn in storage).
    monkeypatch.setenv(KILL_MID_UPLOAD_ENV, "1:20")
    with pytest.raises(RuntimeError) as failed:
        run(raw)
    message = str(failed.value)
    assert "failed after run.max_failures=0 restart(s)" in message
    assert re.search(r"(?i)actor died unexpectedly", message), message  # the cause: a lost worker
    assert "launch the same command again" in message and "checkpoint_step_00000010," in message
    torn = problems(f"{module_tmp}/runs/zero3-relaunched/checkpoint_step_00000020")
    assert any("manifest_rank1.json is missing" in line for line in torn), torn
    monkeypatch.delenv(KILL_MID_UPLOAD_ENV)
    summary = run(raw)  # same run.name and storage_path: resumes from step 10, passing over the torn step 20
    assert summary["restore/step"] == 10
    diff = max_weight_diff(
        exported_weights(summary["run_dir"], module_tmp / "relaunched"),
        exported_weights(zero3_run["summary"]["run_dir"], module_tmp / "reference2"),
    )
    assert diff < 1e-5, diff

    # A checkpoint that is expected but damaged stops the run instead of restarting from step 0.
    latest = Path(summary["run_dir"]) / "checkpoint_step_00000040"
    os.remove(latest / "rng_rank1.json")
    with pytest.raises(Exception, match="checkpoint_step_00000040.*rng_rank1.json"):
        run(raw)
    # Without Ray's record of the checkpoints (a driver stopped between a worker's upload and Ray's
    # record), the newest complete checkpoint is resumed from: step 40 lacks a file, so step 30,
    # never step 0. The run then ends with the uninterrupted run's weights.
    shutil.move(Path(summary["run_dir"]) / "checkpoint_manager_snapshot.json", module_tmp / "snapshot.json")
    summary = run(raw)
    assert summary["restore/step"] == 30 and summary["step"] == 40
    diff = max_weight_diff(
        exported_weights(summary["run_dir"], module_tmp / "relaunched-again"),
        exported_weights(zero3_run["summary"]["run_dir"], module_tmp / "reference3"),
    )
    assert diff < 1e-5, diff


def test_distilling_from_a_run_directory_on_two_workers(zero3_run, sentiment_data, module_tmp):
    """Each worker exports the teacher run into its own scratch (transformers 5 would write it on rank 0
    only, and rank 1 then found no config.json), and the student initialised from it keeps its accuracy."""
    raw = _raw(sentiment_data, module_tmp, "distilled")
    raw["distill"] = {"teacher": zero3_run["summary"]["run_dir"], "alpha": 0.5, "init_from_teacher": True}
    summary = run(raw)
    assert summary["step"] == 40 and summary["eval"]["num_examples"] == 64
    assert summary["eval/accuracy"] >= zero3_run["summary"]["eval/accuracy"] - 0.05, summary["eval/accuracy"]


@pytest.mark.slow
def test_a_rank_that_stops_taking_part_fails_the_run_naming_it(sentiment_data, module_tmp):
    """Rank 1 stops after step 3 (FMDIST_HANG_AT_STEP=1:3, as a rank stuck in a collective would): rank 0's
    next collective times out after run.collective_timeout_s and the run fails naming rank 1, instead of
    waiting Ray's default 30 minutes. The run is a `fmdist train` process joined to this session's Ray, so
    that the subprocess timeout bounds a regression (a hang fails the test, it cannot stall CI)."""
    import subprocess
    import sys

    import ray
    import yaml

    from fmdist.runtime import HANG_AT_STEP_ENV

    config = module_tmp / "hung.yaml"
    config.write_text(yaml.safe_dump(_raw(sentiment_data, module_tmp, "hung", collective_timeout_s=20)))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, HANG_AT_STEP_ENV: "1:3"}
    done = subprocess.run([sys.executable, "-m", "fmdist.cli", "train", str(config)], env=env,
                          capture_output=True, text=True, timeout=420)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert re.search(r"rank 0: a collective after step 3 timed out after 20 s.*waiting for rank 1 "
                     r"\(last entered step 3\); the other ranks entered step 4", output), output[-3000:]  # fmt: skip
