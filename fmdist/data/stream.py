"""A per-worker, resumable stream over shards: every row once per epoch, no replay on resume.

Every input reaches the loop through here (data/inputs.py turns each into shards). Why fmdist
streams shards itself instead of through Ray Data: a Ray Data iterator cannot
resume mid-epoch (ray#37633), so a resumed run must either repeat rows or read and discard
everything before the checkpoint. This stream's position is a small state (a cursor, the rows in
the shuffle window, the RNG) saved with each checkpoint; resume reads on from the cursor's shard.

The unit of ownership is a *slot*: one micro-batch position of the global batch. A run has
world_size x gradient_accumulation_steps slots; rank r's slots are r*A .. r*A + A-1, and its iter i
takes a micro-batch from slot r*A + i % A. So 2 workers x accumulation 1 and 1 worker x accumulation
2 put the same rows into every optimizer step.

The plan of an epoch is a pure function of (manifest, seed, epoch, number of slots), so every rank
computes it alone:
- shard order: a seeded permutation per epoch (or manifest order without shuffling);
- ownership: shard k of that order belongs to slot k % slots, so a rank reads only its shards and
  every row is owned by exactly one slot;
- a bounded shuffle window per slot (seeded per epoch and slot) mixes rows across its shards.
Slots may own different row counts: a slot that ran out yields a placeholder (None) for its turns,
and the loop keeps ranks in lockstep (loop._joined).

Memory is bounded, per slot, by one shard being read, one prefetched, and the shuffle window.

Evaluation reads contiguous row ranges instead (`eval_batches`): rank r of W takes rows
[r*N/W, (r+1)*N/W) in order, so every eval row counts exactly once and ranks get even shares.
"""

from __future__ import annotations

import math
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from fmdist.config import Config
from fmdist.data.sources import Source, read_shard

PREFETCH_SHARDS = 1
SHARD_COLUMN = "_shard"
"""Added to every batch: the file each row came from, so that an error about a row (an image that
cannot be decoded, a bad tag) can name its shard."""


def epoch_shards(source: Source, seed: int, epoch: int, slot: int, slots: int, shuffle: bool) -> list[int]:
    """Indices (into the manifest) of the shards this slot reads in this epoch, in reading order."""
    order = list(range(len(source.manifest["shards"])))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[slot::slots]


@dataclass
class StreamState:
    """Where a slot's stream stands: enough to continue without repeating, skipping or re-reading rows."""

    epoch: int
    cursor: tuple[int, int]
    """(position in this slot's shard list, row offset) of the next row to enter the window."""
    window: list[tuple]
    """The rows waiting in the shuffle window (at most `window_rows`: bounded, saved with the checkpoint)."""
    columns: list[str]
    rng_state: Any
    rows_emitted: int

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON and an Arrow table for the window; see train/checkpoint.py)."""
        out = asdict(self)
        version, internal, gauss = self.rng_state
        out["rng_state"] = [version, list(internal), gauss]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamState:
        version, internal, gauss = data["rng_state"]
        return cls(
            epoch=data["epoch"],
            cursor=tuple(data["cursor"]),
            window=[tuple(row) for row in data["window"]],
            columns=list(data["columns"]),
            rng_state=(version, tuple(internal), gauss),
            rows_emitted=data["rows_emitted"],
        )


class ShardStream:
    """Rows of one slot for one epoch, as micro-batches of columns."""

    def __init__(
        self,
        source: Source,
        *,
        slot: int,
        slots: int,
        epoch: int,
        seed: int,
        shuffle: bool,
        window_rows: int,
        resume: StreamState | None = None,
    ):
        if source.manifest is None:
            raise ValueError(f"{source.uri}: not shards; open it with data.inputs.open_split first.")
        self.source = source
        self.epoch = epoch
        self.shards = epoch_shards(source, seed, epoch, slot, slots, shuffle)
        self.window_rows = window_rows if shuffle else 0
        self._rng = random.Random(seed * 7919 + epoch * 104_729 + slot)
        # Rows are tuples in `self._columns` order: far cheaper to build and shuffle than dicts.
        self._window: list[tuple] = []
        self._columns: list[str] = [*source.manifest["schema"], SHARD_COLUMN]
        self._cursor: tuple[int, int] = (0, 0)
        self._rows_emitted = 0
        if resume is not None:
            if resume.epoch != epoch:
                raise ValueError(f"stream state is for epoch {resume.epoch}, not {epoch}")
            if resume.columns != self._columns:
                raise ValueError(f"stream state has columns {resume.columns}, the data has {self._columns}")
            self._rng.setstate(resume.rng_state)
            self._window = list(resume.window)
            self._cursor = tuple(resume.cursor)
            self._rows_emitted = resume.rows_emitted

    def state(self) -> StreamState:
        return StreamState(
            self.epoch, self._cursor, list(self._window), list(self._columns), self._rng.getstate(), self._rows_emitted
        )

    def _prefetched(self) -> Iterator[tuple[int, pa.Table]]:
        """Shards from the cursor's on, read one ahead in a thread so I/O overlaps training."""
        todo: queue.Queue = queue.Queue(maxsize=PREFETCH_SHARDS)
        stop = threading.Event()
        start = self._cursor[0]

        def reader() -> None:
            try:
                for position in range(start, len(self.shards)):
                    if stop.is_set():
                        return
                    todo.put((position, read_shard(self.source, self.shards[position])))
                todo.put(None)
            except BaseException as exc:  # surfaced in the training thread, with the shard named
                todo.put(exc)

        thread = threading.Thread(target=reader, daemon=True, name="fmdist-shard-prefetch")
        thread.start()
        try:
            while (item := todo.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Abandoned early (max_steps, an error): stop the reader and wait for its in-flight read.
            stop.set()
            while thread.is_alive():
                try:
                    todo.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()

    def _pop(self) -> tuple:
        """Emit a uniformly chosen row of the window (swap-remove keeps it O(1))."""
        i = self._rng.randrange(len(self._window))
        self._window[i], self._window[-1] = self._window[-1], self._window[i]
        return self._window.pop()

    def rows(self) -> Iterator[tuple]:
        """Rows in emission order; `state()` is consistent between yields."""
        for position, table in self._prefetched():
            shard = [self.source.files[self.shards[position]]] * table.num_rows
            rows = list(zip(*(table.column(c).to_pylist() for c in self._columns[:-1]), shard, strict=True))
            for offset in range(self._cursor[1] if position == self._cursor[0] else 0, len(rows)):
                self._window.append(rows[offset])
                self._cursor = (position, offset + 1) if offset + 1 < len(rows) else (position + 1, 0)
                if len(self._window) > self.window_rows:
                    yield self._pop()
        while self._window:
            yield self._pop()

    def batches(self, micro_batch_size: int) -> Iterator[dict[str, list]]:
        batch: list[tuple] = []
        for row in self.rows():
            batch.append(row)
            self._rows_emitted += 1
            if len(batch) == micro_batch_size:
                yield dict(zip(self._columns, map(list, zip(*batch, strict=True)), strict=True))
                batch = []
        if batch:
            yield dict(zip(self._columns, map(list, zip(*batch, strict=True)), strict=True))


def iters_per_epoch(
    source: Source, seed: int, epoch: int, world_size: int, accumulation: int, micro_batch_size: int, shuffle: bool
) -> int:
    """Micro-batches of the busiest rank in an epoch: `accumulation` turns for each micro-batch of its
    fullest slot (slots own whole shards, so counts differ)."""
    shards = source.manifest["shards"]
    slots = world_size * accumulation
    fullest = max(
        math.ceil(sum(shards[i]["rows"] for i in epoch_shards(source, seed, epoch, slot, slots, shuffle))
                  / micro_batch_size)
        for slot in range(slots)
    )  # fmt: skip
    return fullest * accumulation


def steps_per_epoch(iters: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of `iters` micro-batches on the busiest rank: the loop joins ranks,
    and an epoch's last, partial accumulation is completed with placeholders."""
    return max(1, math.ceil(iters / gradient_accumulation_steps))


def total_steps(cfg: Config, iters: Callable[[int], int]) -> int:
    """The run's optimizer steps: `train.max_steps`, or every epoch's steps. The one step plan, used by
    the loop and by Tune (ASHA's max_t, PBT's rounds)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return sum(steps_per_epoch(iters(e), cfg.train.gradient_accumulation_steps) for e in range(cfg.train.epochs))


def train_plan(cfg: Config, source: Source, world_size: int) -> Callable[[int], int]:
    """epoch -> micro-batches of the busiest rank, for this config's training stream."""
    return lambda epoch: iters_per_epoch(
        source,
        cfg.train.seed,
        epoch,
        world_size,
        cfg.train.gradient_accumulation_steps,
        cfg.train.micro_batch_size,
        cfg.train.shuffle,
    )


def eval_batches(source: Source, rank: int, world_size: int, micro_batch_size: int) -> Iterator[dict[str, list]]:
    """This rank's contiguous share of the eval rows, in order, as micro-batches of columns.

    Rank r takes rows [r*N/W, (r+1)*N/W) of the shards in manifest order and reads only the shards
    that overlap its range.
    """
    total = source.manifest["total_rows"]
    low, high = rank * total // world_size, (rank + 1) * total // world_size
    columns = [*source.manifest["schema"], SHARD_COLUMN]
    pending: list[pa.Table] = []
    pending_rows = 0
    offset = 0
    for index, shard in enumerate(source.manifest["shards"]):
        start, stop = max(low, offset), min(high, offset + shard["rows"])
        offset += shard["rows"]
        if start >= stop:
            continue
        table = read_shard(source, index).slice(start - (offset - shard["rows"]), stop - start)
        pending.append(table.append_column(SHARD_COLUMN, pa.array([source.files[index]] * table.num_rows)))
        pending_rows += stop - start
        while pending_rows >= micro_batch_size:
            table = pa.concat_tables(pending)
            yield {c: table.column(c).slice(0, micro_batch_size).to_pylist() for c in columns}
            pending, pending_rows = [table.slice(micro_batch_size)], pending_rows - micro_batch_size
    if pending_rows:
        table = pa.concat_tables(pending)
        yield {c: table.column(c).to_pylist() for c in columns}


class EpochStreams:
    """A rank's training data as the loop wants it: its slots' streams interleaved, their state, the plan."""

    def __init__(self, cfg: Config, source: Source, rank: int, world_size: int):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.source = source
        self.accumulation = cfg.train.gradient_accumulation_steps
        self.current: list[ShardStream] = []
        self.pending: list[StreamState] | None = None
        self._turn = 0

    def batches(self, epoch: int) -> Iterator[dict[str, list] | None]:
        """Micro-batches in turn from this rank's slots; None is a placeholder for a slot that ran out
        while another of the rank's slots still has rows (so turns stay aligned with slots)."""
        resume = self.pending if self.pending is not None and self.pending[0].epoch == epoch else None
        self.pending = None
        slots = self.world_size * self.accumulation
        self.current = [
            ShardStream(
                self.source,
                slot=self.rank * self.accumulation + j,
                slots=slots,
                epoch=epoch,
                seed=self.cfg.train.seed,
                shuffle=self.cfg.train.shuffle,
                window_rows=self.cfg.data.shuffle_window_rows,
                resume=resume[j] if resume is not None else None,
            )
            for j in range(self.accumulation)
        ]
        return self._interleaved([s.batches(self.cfg.train.micro_batch_size) for s in self.current])

    def _interleaved(self, streams: list[Iterator[dict[str, list]]]) -> Iterator[dict[str, list] | None]:
        live = [True] * len(streams)
        # Checkpoints fall on optimizer steps, i.e. when every slot has had the same number of turns.
        self._turn = 0
        while True:
            j = self._turn % len(streams)
            batch = next(streams[j], None) if live[j] else None
            live[j] = batch is not None
            if not any(live):
                return
            self._turn += 1
            yield batch

    def iters_per_epoch(self, epoch: int) -> int:
        return train_plan(self.cfg, self.source, self.world_size)(epoch)

    def state(self) -> dict[str, Any] | None:
        if not self.current:
            return None
        return {"slots": [s.state().to_dict() for s in self.current]}

    def restore(self, state: dict[str, Any] | None) -> None:
        self.pending = [StreamState.from_dict(s) for s in state["slots"]] if state is not None else None
