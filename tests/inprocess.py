"""The training loop in this process (world size 1, gloo), fed by the real per-rank stream: the
harness the in-process tests share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fmdist.config import Config
from fmdist.data.sources import Source
from fmdist.data.stream import EpochStreams, eval_batches
from fmdist.train.checkpoint import read_meta, resume_layout
from fmdist.train.loop import LoopIO, fit


def run_in_process(
    cfg: Config,
    train: Source,
    scratch_dir: str,
    evaluation: Source | None = None,
    stop: int | None = None,
    restore: str | None = None,
    record: list[dict[str, list]] | None = None,
    curves: bool = False,
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], str | None]]]:
    """Train one rank per `cfg` (optionally pausing at `stop`, or resuming from `restore`, which may have
    been written by another worker count); returns the summary and every report (metrics, checkpoint
    directory) in order. `record` gets every micro-batch of rows the loop trains."""
    if restore is not None:  # possibly written by another worker count
        cfg = resume_layout(cfg, read_meta(restore), world_size=1)
    stream = EpochStreams(cfg, train, rank=0, world_size=1)
    reports: list[tuple[dict[str, Any], str | None]] = []

    def batches(epoch: int) -> Iterator[dict[str, list] | None]:
        for rows in stream.batches(epoch):
            if rows is not None and record is not None:
                record.append(rows)
            yield rows

    io = LoopIO(
        train_batches=batches,
        iters_per_epoch=stream.iters_per_epoch,
        num_train_rows=train.manifest["total_rows"],
        report=lambda metrics, path: reports.append((metrics, path)),
        scratch_dir=scratch_dir,
        eval_batches=(lambda: eval_batches(evaluation, 0, 1, cfg.train.micro_batch_size)) if evaluation else None,
        data_state=stream.state,
        restore_data_state=stream.restore,
        restore_dir=restore,
        stop_at_step=stop,
        fingerprint_restore=restore is not None,
        write_curves=curves,
    )
    return fit(cfg, io), reports
