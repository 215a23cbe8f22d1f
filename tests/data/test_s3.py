"""S3 against a real S3 API (moto's server on loopback): prepare to S3, train from S3, resume from S3.

World size: 2 Ray Train workers.
"""

from __future__ import annotations

import json

import boto3
import pytest

from fmdist.config import from_dict
from fmdist.data.prepare import prepare
from fmdist.train.export import export
from fmdist.train.launch import train
from fmdist.train.loop import FAIL_AT_STEP_ENV
from tests.conftest import TINY_MODEL, sentiment_rows


def keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


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


@pytest.mark.usefixtures("ray_cluster")
def test_train_from_s3_with_checkpoints_on_s3_resumes_after_a_failure(s3_bucket, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "rows.jsonl", sentiment_rows(640, seed=1))
    prepare([src], f"s3://{s3_bucket}/data", rows_per_shard=64, eval_fraction=0.1, seed=3)
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"train": f"s3://{s3_bucket}/data/train", "eval": f"s3://{s3_bucket}/data/eval"},
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
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "15")  # a worker dies; the restarted group resumes from S3 at step 10
    summary = train(from_dict(raw))
    assert summary["run_dir"] == f"s3://{s3_bucket}/runs/s3run"
    assert summary["train/loss"] < summary["train/first_loss"]
    listed = keys(s3_bucket, "runs/s3run/")
    assert "runs/s3run/config.yaml" in listed and "runs/s3run/metrics.json" in listed
    final = f"runs/s3run/checkpoint_step_{summary['step']:08d}/"
    assert any(k.startswith(final + "ds/") for k in listed)
    # The secret key never reaches the run directory.
    for key in listed:
        if key.endswith((".json", ".yaml")):
            body = boto3.client("s3").get_object(Bucket=s3_bucket, Key=key)["Body"].read()
            assert b"testing-secret-do-not-log" not in body, key
    out = tmp_path / "model"
    export(summary["run_dir"], str(out))
    assert (out / "model.safetensors").is_file()
