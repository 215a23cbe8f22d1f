"""Every training and eval input as shards for the one resumable stream.

`data.train` / `data.eval` may be:
- a directory written by `fmdist prepare` (its `train/` or `eval/`), or its output root: then train
  reads `train/` and, unless `data.eval` is set, eval reads `eval/`;
- plain Parquet / Arrow files, a directory or a glob of them: read in place, a row group per shard;
- CSV, TSV, JSONL, CoNLL or text files: prepared once into `data.cache_dir` (default
  `run.storage_path/.cache`), keyed by the inputs' sha256, so that relaunches and Tune trials reuse
  the same shards and the same exactly-once, resumable stream serves every input.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid

import pyarrow.fs as pafs

from fmdist import __version__
from fmdist.data.fs import filesystem
from fmdist.data.sources import MANIFEST, Source, is_prepare_output, resolve
from fmdist.runtime import get_logger

CACHE_ROWS_PER_SHARD = 512
"""Small shards, so that even a small CSV spreads over several workers."""
log = get_logger("fmdist.data")


def split_uris(train: str, eval_: str | None) -> tuple[str, str | None]:
    """(train, eval) locations, with a prepare output root expanded to its train/ and eval/."""
    if not is_prepare_output(train):
        return train, eval_
    root = train.rstrip("/")
    if eval_ is None:
        fs, path = filesystem(root)
        if fs.get_file_info(f"{path}/eval/{MANIFEST}").type == pafs.FileType.File:
            eval_ = f"{root}/eval"
    return f"{root}/train", eval_


def _file_uri(source: Source, path: str) -> str:
    return f"s3://{path}" if source.uri.startswith("s3://") else path


def _digest(source: Source, eval_fraction: float, seed: int) -> str:
    """sha256 over the inputs' bytes (in order) and what shapes the prepared output."""
    shape = f"fmdist {__version__} rows/shard {CACHE_ROWS_PER_SHARD} eval {eval_fraction} seed {seed}\n"
    h = hashlib.sha256(shape.encode())
    for path in source.files:
        with source.filesystem.open_input_stream(path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def open_split(uri: str, field: str, cache_dir: str) -> Source:
    """The shards behind `uri`, preparing other formats into the cache on first use."""
    source = resolve(uri, field)
    if source.manifest is not None:
        return source
    return resolve(f"{_cached(source, field, cache_dir, 0.0, 0)}/train", field)


def _cached(source: Source, field: str, cache_dir: str, eval_fraction: float, seed: int) -> str:
    """The cache directory holding `source`'s files prepared into shards, preparing them the first time."""
    from fmdist.data.prepare import prepare

    target = f"{cache_dir.rstrip('/')}/{_digest(source, eval_fraction, seed)[:24]}"
    fs, path = filesystem(target)
    if fs.get_file_info(f"{path}/train/{MANIFEST}").type != pafs.FileType.File:
        inputs = [_file_uri(source, p) for p in source.files]
        log.info("%s: preparing %d %s file(s) into shards at %s (once; later runs reuse them)", field,
                 len(inputs), source.format, target)  # fmt: skip
        options = dict(rows_per_shard=CACHE_ROWS_PER_SHARD, eval_fraction=eval_fraction, seed=seed)
        if isinstance(fs, pafs.LocalFileSystem):
            # Prepare beside the target and rename: a run or trial that sees the directory sees it whole.
            scratch = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            prepare(inputs, scratch, **options)
            try:
                os.rename(scratch, path)
            except OSError:  # another process prepared the same inputs first
                shutil.rmtree(scratch, ignore_errors=True)
        else:
            # Object stores have no rename; the manifest is written last, so a torn prepare is redone.
            prepare(inputs, target, **options)
    return target


def open_splits(
    train: str, eval_: str | None, cache_dir: str, eval_fraction: float = 0.0, seed: int = 0
) -> dict[str, Source]:
    """The train and (when there is one) eval shards of a run's `data` section.

    `eval_fraction` holds out part of `train` as eval when no eval data is given: plain text keeps its
    contiguous tail, other files a seeded sample (see `fmdist prepare --eval-fraction`).

    Raises:
        ValueError: `eval_fraction` with data that is already shards (hold eval out with fmdist prepare).
    """
    train, eval_ = split_uris(train, eval_)
    if eval_ is not None or not eval_fraction:
        sources = {"train": open_split(train, "data.train", cache_dir)}
        if eval_ is not None:
            sources["eval"] = open_split(eval_, "data.eval", cache_dir)
        return sources
    source = resolve(train, "data.train")
    if source.manifest is not None:
        raise ValueError(
            f"data.eval_fraction: {train!r} is already shards, which are read in place; hold an eval split out "
            "with `fmdist prepare --eval-fraction` and point data.train at its output, or set data.eval."
        )
    root = _cached(source, "data.train", cache_dir, eval_fraction, seed)
    return {"train": resolve(f"{root}/train", "data.train"), "eval": resolve(f"{root}/eval", "data.eval")}
