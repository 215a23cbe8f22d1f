"""S3 against a real S3 API (moto's server on loopback): prepare to S3, train from S3, resume from S3.

World size: 2 Ray Train workers.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import boto3
import pytest
import ray
import torch
from safetensors.torch import load_file

from fmdist.config import from_dict
from fmdist.data.prepare import prepare
from fmdist.data.sources import resolve
from fmdist.data.stream import total_steps, train_plan
from fmdist.runtime import KILL_MID_UPLOAD_ENV, RECORD_ROWS_ENV
from fmdist.train.export import export
from fmdist.train.launch import train
from tests.conftest import TINY_MODEL, sentiment_rows


def keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def exported_weights(run_dir: str, out: Path) -> dict[str, torch.Tensor]:
    export(run_dir, str(out))
    return load_file(out / "model.safetensors")


def write_jsonl(path, rows: dict[str, list]) -> str:
    path.write_text(
        "".join(json.dumps(dict(zip(rows, values, strict=True))) + "\n" for values in zip(*rows.values(), strict=True))
    )
    return str(path)


def test_prepare_writes_shards_and_manifest_to_s3(s3_bucket, tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(300, seed=5))
    manifests = prepare([src], f"s3://{s3_bucket}/prepared", rows_per_shard=100, eval_fraction=0.2, seed=1, redact=True)
    listed = keys(s3_bucket, "prepared/")
    assert "prepared/train/manifest.json" in listed and "prepared/eval/manifest.json" in listed
    assert len([k for k in listed if k.startswith("prepared/train/part-")]) == len(manifests["train"]["shards"])
    manifest = json.loads(
        boto3.client("s3").get_object(Bucket=s3_bucket, Key="prepared/train/manifest.json")["Body"].read()
    )
    assert manifest["total_rows"] == manifests["train"]["total_rows"]


def canary_hits(name: str, data: bytes, canary: bytes) -> list[str]:
    """`name: ...context...` for every place `canary` occurs in `data` (empty when it does not)."""
    hits, at = [], data.find(canary)
    while at >= 0:
        context = data[max(0, at - 120) : at + len(canary) + 40].decode("utf-8", "replace")
        hits.append(f"{name}: ...{context!r}...")
        at = data.find(canary, at + 1)
    return hits


def recorded_rows(directory, rank: int) -> list[dict]:
    return [json.loads(line) for line in (directory / f"rows_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("ray_cluster")
def test_train_from_s3_with_checkpoints_on_s3_resumes_after_a_failure(s3_bucket, tmp_path, monkeypatch):
    """World size 2. Data on S3 in 9 shards of 64 rows: rank 0 owns 5 shards (40 micro-batches), rank 1
    owns 4 (32) and runs placeholders in the last 8 of the 40 steps. Rank 1's process is SIGKILLed halfway
    through uploading the step-20 checkpoint to S3 (no exception, no clean-up: as the OOM killer or a lost
    node would), and the restarted group resumes from the previous complete checkpoint, step 10's. Outcomes: every training row trained
    exactly once, weights equal to an uninterrupted run's, and the secret key in no stored byte or Ray log.
    """
    num_rows = 9 * 64
    train_rows = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(num_rows, seed=1))
    prepare([train_rows], f"s3://{s3_bucket}/data", rows_per_shard=64)  # row ids 0..575 in data/train
    prepare([write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(64, seed=2))], f"s3://{s3_bucket}/eval-data")
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"train": f"s3://{s3_bucket}/data/train", "eval": f"s3://{s3_bucket}/eval-data/train"},
        "train": {"epochs": 1, "micro_batch_size": 8, "lr": 5e-3, "log_every_steps": 5, "shuffle": False},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {
            "name": "s3run",
            "storage_path": f"s3://{s3_bucket}/runs",
            "checkpoint_every_steps": 10,
            "max_failures": 1,
        },
    }
    cfg = from_dict(copy.deepcopy(raw))
    planned_steps = total_steps(cfg, train_plan(cfg, resolve(raw["data"]["train"]), 2))
    assert planned_steps == 40  # the busiest rank's 320 rows / micro-batch 8, not 576 rows / global batch 16

    rows_dir = tmp_path / "rows"
    monkeypatch.setenv(RECORD_ROWS_ENV, str(rows_dir))
    monkeypatch.setenv(KILL_MID_UPLOAD_ENV, "1:20")  # rank 1 dies mid-upload; the group resumes at step 10
    summary = train(from_dict(copy.deepcopy(raw)))
    assert summary["run_dir"] == f"s3://{s3_bucket}/runs/s3run"
    assert summary["step"] == planned_steps and summary["restore/step"] == 10
    assert summary["train/loss"] < summary["train/first_loss"]
    listed = keys(s3_bucket, "runs/s3run/")
    assert "runs/s3run/config.yaml" in listed and "runs/s3run/metrics.json" in listed
    final = f"runs/s3run/checkpoint_step_{summary['step']:08d}/"
    assert any(k.startswith(final + "ds/") for k in listed)

    # The reference: the same run on local storage, uninterrupted.
    monkeypatch.delenv(KILL_MID_UPLOAD_ENV)
    monkeypatch.setenv(RECORD_ROWS_ENV, str(tmp_path / "rows-reference"))
    reference_raw = copy.deepcopy(raw)
    reference_raw["run"]["storage_path"] = str(tmp_path / "runs")
    reference = train(from_dict(reference_raw))
    assert reference["step"] == planned_steps

    # Rows: each rank's lines come from two attempts (two worker processes). With accumulation 1 and no
    # placeholder before a rank's data runs out, line i is step i+1: keep the failed attempt's lines up to
    # the restored step, then the resumed attempt's.
    kept = {}
    for rank in range(2):
        lines = recorded_rows(rows_dir, rank)
        assert {(line["rank"], line["epoch"]) for line in lines} == {(rank, 0)}
        attempts = list(dict.fromkeys(line["pid"] for line in lines))
        assert len(attempts) == 2, attempts
        failed, resumed = ([line["row_ids"] for line in lines if line["pid"] == pid] for pid in attempts)
        # The killed rank recorded exactly the micro-batches it trained; rank 0 may have taken the next
        # one before its collective with the dead rank failed.
        assert len(failed) == 20 if rank == 1 else 20 <= len(failed) <= 21, len(failed)
        kept[rank] = failed[: summary["restore/step"]] + resumed
    trained = [row_id for batches in kept.values() for batch in batches for row_id in batch]
    missing = set(range(num_rows)) - set(trained)
    repeated = len(trained) - len(set(trained))
    assert sorted(trained) == list(range(num_rows)), f"{len(missing)} rows missing, {repeated} repeated"
    assert [sum(map(len, kept[rank])) for rank in range(2)] == [320, 256]  # rank 1's placeholders add no rows
    for rank in range(2):  # and each rank trained its rows in the uninterrupted run's order
        assert kept[rank] == [line["row_ids"] for line in recorded_rows(tmp_path / "rows-reference", rank)]

    # The resume is exact: the final weights equal the uninterrupted run's.
    resumed_weights = exported_weights(summary["run_dir"], tmp_path / "model")
    reference_weights = exported_weights(reference["run_dir"], tmp_path / "reference-model")
    assert resumed_weights.keys() == reference_weights.keys()
    diff = max((resumed_weights[k] - reference_weights[k]).abs().max().item() for k in resumed_weights)
    assert diff <= 1e-6, diff

    # The secret key is in no stored byte (checkpoint .pt and .arrow files included) and in no Ray log.
    canary = b"testing-secret-do-not-log"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == canary.decode()  # set by the s3_endpoint fixture
    assert any(k.endswith(".pt") for k in listed) and any(k.endswith(".arrow") for k in listed)
    s3 = boto3.client("s3")
    leaks = [
        hit
        for key in keys(s3_bucket, "")
        for hit in canary_hits(
            f"s3://{s3_bucket}/{key}", s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read(), canary
        )
    ]
    local = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    # This session's own log directory (/tmp/ray/session_latest may be another cluster's on a shared host).
    ray_logs = [p for p in Path(ray._private.worker._global_node.get_logs_dir_path()).rglob("*") if p.is_file()]
    assert any(p.name.startswith("worker-") for p in ray_logs)  # the workers' stdout and stderr are among them
    leaks += [hit for path in local + ray_logs for hit in canary_hits(str(path), path.read_bytes(), canary)]
    assert not leaks, "\n".join(leaks)
