"""bench/step_time.py's fairness: its bare DeepSpeed, HF Trainer and bare PyTorch loops train exactly fmdist's
rows on each rank, as the same token ids (world size 2, no processes started: the data path only)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, SequentialSampler

from fmdist import tasks
from fmdist.config import freeze_labels, from_dict
from fmdist.data.sources import resolve
from fmdist.data.stream import EpochStreams

_PATH = Path(__file__).resolve().parents[2] / "bench" / "step_time.py"
_spec = importlib.util.spec_from_file_location("bench_step_time", _PATH)
step_time = importlib.util.module_from_spec(_spec)
sys.modules["bench_step_time"] = step_time
_spec.loader.exec_module(step_time)

WORLD, MICRO = 2, 8
WORDS = ["a", "moving", "film", "dull", "plot", "and", "superb", "acting", "with", "an", "ending", "that", "drags"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """118 sentences of varied length in 6 row groups of 20 (the last 18): micro-batches straddle row groups,
    the ranks own 60 and 58 rows, and each rank's last micro-batch is short."""
    n = 118
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 11)) for i in range(n)]
    path = tmp_path_factory.mktemp("step_time") / "train.parquet"
    table = pa.table({"sentence": texts, "label": [i % 2 for i in range(n)]})
    pq.write_table(table, path, row_group_size=20)
    return str(path)


def _fmdist_batches(path: str, rank: int) -> list[dict[str, list]]:
    """What fmdist's stream hands rank `rank` in epoch 0 (the benchmark runs with train.shuffle false)."""
    cfg = from_dict({"data": {"train": path}, "train": {"micro_batch_size": MICRO, "shuffle": False}})
    stream = EpochStreams(cfg, resolve(path), rank, WORLD)
    return [{k: b[k] for k in ("sentence", "label")} for b in stream.batches(0)]


def test_bare_loops_read_fmdists_rows_per_rank(data):
    for rank in range(WORLD):
        expected = _fmdist_batches(data, rank)
        assert len(expected) == 8 and len(expected[-1]["sentence"]) < MICRO
        assert list(step_time.rank_micro_batches(data, rank, WORLD, MICRO)) == expected


def test_trainer_sharding_gives_each_rank_fmdists_micro_batches(data):
    """accelerate's own batch-sampler sharding over the sequential sampler the Trainer is given."""
    rows = step_time.trainer_rows(data, WORLD, MICRO)
    for rank in range(WORLD):
        expected = _fmdist_batches(data, rank)
        full = [b for b in expected if len(b["sentence"]) == MICRO]  # the Trainer takes whole micro-batches only
        sampler = BatchSampler(SequentialSampler(rows), MICRO, drop_last=False)
        shard = BatchSamplerShard(sampler, num_processes=WORLD, process_index=rank)
        got = [{k: [rows[i][k] for i in indices] for k in ("sentence", "label")} for indices in shard]
        assert got[: len(full)] == full


def test_bare_tokenization_equals_fmdists_collate(data):
    cfg = from_dict({"data": {"train": data}, "model": {"num_labels": 2}})
    freeze_labels(cfg, None)
    task = tasks.get(cfg.model.task)
    tokenizer = task.load_processor(cfg.model.name_or_path)
    assert cfg.data.max_length == step_time.MAX_LENGTH
    for rows in _fmdist_batches(data, 1):
        ours, theirs = step_time.tokenize(rows, tokenizer), task.collate(rows, tokenizer, cfg)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
