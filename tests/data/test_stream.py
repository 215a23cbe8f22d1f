"""The resumable shard stream: exactly once per epoch, deterministic, resumable without replay, bounded."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from fmdist.data import stream as stream_mod
from fmdist.data.prepare import prepare
from fmdist.data.sources import resolve
from fmdist.data.stream import ShardStream


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """1,000 rows in 16 shards of 64 (the last one 40)."""
    root = tmp_path_factory.mktemp("stream")
    src = root / "rows.jsonl"
    src.write_text("".join(json.dumps({"sentence": f"row {i}", "label": i % 2}) + "\n" for i in range(1000)))
    prepare([str(src)], str(root / "out"), rows_per_shard=64)
    return resolve(str(root / "out" / "train"))


def ids(source, rank, world, epoch=0, seed=0, window=100, micro=8):
    s = ShardStream(source, slot=rank, slots=world, epoch=epoch, seed=seed, shuffle=True, window_rows=window)
    return [i for b in s.batches(micro) for i in b["row_id"]]


def test_two_ranks_see_every_row_exactly_once(shards):
    """World size 2 (simulated in one process: the plan is a pure function of rank)."""
    rank0, rank1 = ids(shards, 0, 2), ids(shards, 1, 2)
    assert sorted(rank0 + rank1) == list(range(1000))
    assert not set(rank0) & set(rank1)


def test_order_is_fixed_by_the_seed_and_changes_with_seed_and_epoch(shards):
    assert ids(shards, 0, 2, seed=1) == ids(shards, 0, 2, seed=1)
    assert ids(shards, 0, 2, seed=1) != ids(shards, 0, 2, seed=2)
    assert ids(shards, 0, 2, seed=1, epoch=0) != ids(shards, 0, 2, seed=1, epoch=1)
    assert sorted(ids(shards, 0, 1, seed=1, epoch=1)) == list(range(1000))


def test_resume_mid_epoch_continues_exactly_and_reads_only_what_it_needs(shards, monkeypatch):
    full = ids(shards, 0, 1, seed=3)
    first = ShardStream(shards, slot=0, slots=1, epoch=0, seed=3, shuffle=True, window_rows=100)
    it = first.batches(8)
    before = [i for _ in range(40) for i in next(it)["row_id"]]  # stop after 40 micro-batches (320 rows)
    state = copy.deepcopy(first.state())
    assert state.rows_emitted == 320
    it.close()  # the first run stops here (its prefetch thread with it)

    reads = []
    real_read = stream_mod.read_shard
    monkeypatch.setattr(stream_mod, "read_shard", lambda source, index: reads.append(index) or real_read(source, index))
    resumed = ShardStream(shards, slot=0, slots=1, epoch=0, seed=3, shuffle=True, window_rows=100, resume=state)
    after = [i for b in resumed.batches(8) for i in b["row_id"]]
    assert before + after == full  # same rows, same order: nothing repeated, nothing skipped
    # No replay: only the cursor's shard and those after it are read; the window came with the state.
    assert reads == resumed.shards[state.cursor[0] :], (reads, state.cursor)
    assert len(reads) < 16


MEASURE = """
import json, os, resource, sys
from fmdist.data.prepare import prepare
from fmdist.data.sources import resolve
from fmdist.data.stream import ShardStream
rows, out = int(sys.argv[1]), sys.argv[2]
src = out + ".jsonl"
with open(src, "w") as f:
    for i in range(rows):
        f.write(json.dumps({"sentence": os.urandom(2500).hex(), "label": i % 2}) + "\\n")
prepare([src], out, rows_per_shard=1200)
os.remove(src)
"""

STREAM = """
import json, resource, sys
from fmdist.data.sources import resolve
from fmdist.data.stream import ShardStream
source = resolve(sys.argv[1] + "/train")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = sum(len(b["row_id"]) for b in ShardStream(
    source, slot=0, slots=1, epoch=0, seed=0, shuffle=True, window_rows=256).batches(32))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = sum(s["bytes"] for s in source.manifest["shards"])
print(json.dumps({"rows": rows, "increase_mb": (peak - base) / 1024, "data_mb": data / 2**20}))
"""


def test_memory_is_bounded_by_shards_and_window_not_data_size(tmp_path):
    """Peak RSS of a stream over 4x more data grows by little: memory follows shards, not data size.

    Each measurement is a fresh process (ru_maxrss is a high-water mark) using the system allocator
    with one malloc arena, so RSS shows live memory rather than allocator retention. Steady state
    holds about three 5.7 MB shards (being read, prefetched, being emitted) as bytes, Arrow and
    Python objects, plus a 256-row window: tens of MB. A stream that kept what it read would grow
    by the ~170 MB between the two sizes.
    """
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "1"}
    results = {}
    for rows in (12_000, 48_000):
        out = str(tmp_path / f"d{rows}")
        subprocess.run([sys.executable, "-c", MEASURE, str(rows), out, "prepare"], check=True, env=env)
        done = subprocess.run([sys.executable, "-c", STREAM, out], check=True, capture_output=True, text=True, env=env)
        results[rows] = json.loads(done.stdout.strip().splitlines()[-1])
        assert results[rows]["rows"] == rows
    small, large = results[12_000], results[48_000]
    assert large["data_mb"] > 200
    assert large["increase_mb"] < small["increase_mb"] + 30, results
    assert large["increase_mb"] < large["data_mb"] / 2, results


def test_epoch_streams_plan_the_busiest_ranks_micro_batches_and_resume(shards):
    """World size 2: the step plan equals what the busiest rank really streams."""
    from fmdist.config import from_dict
    from fmdist.data.stream import EpochStreams

    cfg = from_dict({"data": {"train": shards.uri, "shuffle_window_rows": 50}, "train": {"micro_batch_size": 8}})
    ranks = [EpochStreams(cfg, shards, rank, 2) for rank in (0, 1)]
    for epoch in (0, 1):
        counts = [len(list(r.batches(epoch))) for r in ranks]
        assert ranks[0].iters_per_epoch(epoch) == max(counts)
    # A saved state is handed to the next batches() call of its own epoch only.
    it = ranks[0].batches(1)
    for _ in range(3):
        next(it)
    state = copy.deepcopy(ranks[0].state())
    rest = [b["row_id"] for b in it]
    ranks[0].restore(state)
    assert [b["row_id"] for b in ranks[0].batches(1)] == rest
    ranks[0].restore(state)  # a state of epoch 1 does not leak into epoch 2
    fresh = EpochStreams(cfg, shards, 0, 2)
    assert [b["row_id"] for b in ranks[0].batches(2)] == [b["row_id"] for b in fresh.batches(2)]


def test_two_workers_and_one_worker_accumulating_two_put_the_same_rows_in_every_step(shards):
    """Slots: 2 ranks x accumulation 1 and 1 rank x accumulation 2 split the global batch alike."""
    from fmdist.config import from_dict
    from fmdist.data.stream import EpochStreams

    def steps(world: int, accumulation: int) -> list[set[int]]:
        cfg = from_dict({"data": {"train": shards.uri, "shuffle_window_rows": 40},
                         "train": {"micro_batch_size": 8, "gradient_accumulation_steps": accumulation}})  # fmt: skip
        per_rank = [list(EpochStreams(cfg, shards, rank, world).batches(0)) for rank in range(world)]
        iters = max(map(len, per_rank))
        assert iters == EpochStreams(cfg, shards, 0, world).iters_per_epoch(0)
        out = []
        for start in range(0, iters, accumulation):
            rows = set()
            for batches in per_rank:
                for batch in batches[start : start + accumulation]:
                    rows |= set(batch["row_id"]) if batch is not None else set()
            out.append(rows)
        return out

    two_workers, one_accumulating = steps(2, 1), steps(1, 2)
    assert two_workers == one_accumulating
    assert sorted(i for step in two_workers for i in step) == list(range(sum(len(s) for s in two_workers)))
