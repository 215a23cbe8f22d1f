"""Resolve `data.train` / `data.eval` to files and read them as Ray Data datasets.

One resolver for every location: pyarrow's filesystem layer handles local paths and s3:// URIs alike,
so a directory, a glob or a single file means the same thing on a laptop and on a cluster.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fmdist.data.fs import filesystem

if TYPE_CHECKING:
    import ray.data

MANIFEST = "manifest.json"
SUFFIX_FORMATS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".ipc": "arrow",
    ".feather": "arrow",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
}


@dataclass(frozen=True)
class Source:
    """A resolved data location: its files (sorted, so the order is the same on every machine)."""

    uri: str
    filesystem: pafs.FileSystem
    files: tuple[str, ...]
    format: str
    manifest: dict | None = None
    """The `fmdist prepare` manifest when the location is a prepared directory (shard checksums)."""


def _format_of(path: str) -> str | None:
    for suffix, fmt in SUFFIX_FORMATS.items():
        if path.lower().endswith(suffix):
            return fmt
    return None


def resolve(uri: str, field: str = "data.train") -> Source:
    """Files behind `uri` (directory, glob or single file, local or s3://), all of one format.

    Raises:
        ValueError: naming `field` and `uri` when nothing matches, a suffix is unknown, or formats mix.
    """
    try:
        fs, path = filesystem(uri)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{field}: cannot open {uri!r}: {exc}") from None
    if any(ch in path for ch in "*?["):
        parent = path[: path.rfind("/", 0, min(path.find(c) for c in "*?[" if c in path))] or "/"
        infos = fs.get_file_info(pafs.FileSelector(parent, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ValueError(
                f"{field}: {uri!r} does not exist; check the path (relative paths are relative to the config file)."
            )
        if info.type == pafs.FileType.Directory and fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
            return _resolve_manifest(uri, fs, path, field)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [i.path for i in infos if i.type == pafs.FileType.File and _format_of(i.path)]
        else:
            files = [path]
    files = sorted(f for f in files if not f.rsplit("/", 1)[-1].startswith((".", "_")))
    if not files:
        raise ValueError(f"{field}: no data files under {uri!r} (looked for {', '.join(SUFFIX_FORMATS)}).")
    formats = {_format_of(f) for f in files}
    if None in formats:
        bad = next(f for f in files if _format_of(f) is None)
        raise ValueError(f"{field}: {bad!r} has an unknown suffix; use one of {', '.join(SUFFIX_FORMATS)}.")
    if len(formats) > 1:
        raise ValueError(f"{field}: {uri!r} mixes formats {sorted(formats)}; keep one format per data set.")
    return Source(uri=uri, filesystem=fs, files=tuple(files), format=formats.pop())


def _resolve_manifest(uri: str, fs: pafs.FileSystem, path: str, field: str) -> Source:
    """A prepared directory: the shards its manifest lists, in its order, each of which must exist."""
    with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
        try:
            manifest = json.loads(f.read())
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{field}: {uri}/{MANIFEST} is not valid JSON ({exc.msg}); re-run fmdist prepare."
            ) from None
    files = tuple(f"{path}/{shard['path']}" for shard in manifest["shards"])
    for shard_path, info in zip(files, fs.get_file_info(list(files)), strict=True):
        if info.type != pafs.FileType.File:
            raise ValueError(
                f"{field}: shard {shard_path!r} listed in {uri}/{MANIFEST} is missing; restore it or re-run fmdist prepare."
            )
    if not files:
        raise ValueError(f"{field}: {uri}/{MANIFEST} lists no shards; the data set is empty.")
    return Source(uri=uri, filesystem=fs, files=files, format=manifest["format"], manifest=manifest)


def _verified_shard_datasource(source: Source) -> Any:
    """Read prepared shards whole, check each against the manifest's sha256, then decode.

    Ray Data's own readers cannot check a checksum; a shard is bounded in size (rows_per_shard), so
    buffering one per read task keeps memory bounded while letting every byte be verified.
    """
    from ray.data.datasource import FileBasedDatasource

    expected = {shard["path"]: shard for shard in source.manifest["shards"]}
    fmt = source.format

    class VerifiedShardDatasource(FileBasedDatasource):
        def _read_stream(self, f: pa.NativeFile, path: str):
            yield from decode_verified_shard(f.read(), path, expected[path.rsplit("/", 1)[-1]], fmt)

    return VerifiedShardDatasource(list(source.files), filesystem=source.filesystem)


def decode_verified_shard(data: bytes, path: str, shard: dict, fmt: str):
    """Tables from one shard's bytes, after checking size and sha256; errors name the shard."""
    if len(data) != shard["bytes"]:
        raise ValueError(
            f"shard {path!r} is {len(data)} bytes but the manifest says {shard['bytes']}: truncated or replaced. "
            "Restore it from the source or re-run fmdist prepare."
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard["sha256"]:
        raise ValueError(
            f"shard {path!r} fails its checksum (sha256 {digest[:12]}..., manifest {shard['sha256'][:12]}...): "
            "the file is corrupt. Restore it from the source or re-run fmdist prepare."
        )
    try:
        if fmt == "parquet":
            parquet = pq.ParquetFile(pa.BufferReader(data))
            for group in range(parquet.num_row_groups):
                yield parquet.read_row_group(group)
        else:
            reader = pa.ipc.open_file(pa.BufferReader(data))
            for i in range(reader.num_record_batches):
                yield pa.Table.from_batches([reader.get_batch(i)])
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"shard {path!r} cannot be decoded as {fmt}: {exc}") from None


def _arrow_ipc_datasource(files: list[str], fs: pafs.FileSystem) -> Any:
    # Ray Data has no Arrow IPC reader; FileBasedDatasource is its documented extension point.
    from ray.data.datasource import FileBasedDatasource

    class ArrowIPCDatasource(FileBasedDatasource):
        def _read_stream(self, f: pa.NativeFile, path: str):
            # The IPC file format needs random access; one shard is bounded in size, so buffer it.
            reader = pa.ipc.open_file(pa.BufferReader(f.read()))
            for i in range(reader.num_record_batches):
                yield pa.Table.from_batches([reader.get_batch(i)])

    return ArrowIPCDatasource(files, filesystem=fs)


def read_dataset(source: Source) -> ray.data.Dataset:
    """A lazy Ray Data dataset over the source's files, in file order."""
    import ray.data

    files = list(source.files)
    fs = source.filesystem
    if source.manifest is not None:
        return ray.data.read_datasource(_verified_shard_datasource(source))
    if source.format == "parquet":
        return ray.data.read_parquet(files, filesystem=fs)
    if source.format == "csv":
        return ray.data.read_csv(files, filesystem=fs)
    if source.format == "tsv":
        # TSV corpora such as SST-2 are unquoted: a stray `"` is text, not a quote.
        parse = pacsv.ParseOptions(delimiter="\t", quote_char=False)
        return ray.data.read_csv(files, filesystem=fs, parse_options=parse)
    if source.format == "jsonl":
        return ray.data.read_json(files, filesystem=fs, lines=True)
    return ray.data.read_datasource(_arrow_ipc_datasource(files, fs))


def check_columns(ds: ray.data.Dataset, columns: list[str], field: str, uri: str) -> None:
    """Fail before training when a configured column is missing, naming the file and the columns it has."""
    names = ds.schema().names
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(
            f"{field}: {uri!r} has no column(s) {missing}; it has {names}. "
            "Set data.text_column / data.label_column to match."
        )


def read_shard(source: Source, index: int) -> pa.Table:
    """One whole prepared shard, size- and sha256-checked against the manifest (errors name the shard)."""
    shard = source.manifest["shards"][index]
    path = source.files[index]
    try:
        with source.filesystem.open_input_stream(path) as f:
            data = f.read()
    except OSError as exc:
        # The S3 client has already retried transient errors (fs.py); this is past the retry budget.
        raise OSError(f"shard {path!r} of {source.uri} could not be read: {exc}") from exc
    return pa.concat_tables(list(decode_verified_shard(data, path, shard, source.format)))


def _file_tables(source: Source, index: int, batch_rows: int):
    """Tables of one file of a source, in row order (prepared shards are verified first)."""
    import pyarrow.json as pajson

    path = source.files[index]
    if source.manifest is not None:
        for batch in read_shard(source, index).to_batches(max_chunksize=batch_rows):
            yield pa.Table.from_batches([batch])
        return
    try:
        if source.format == "parquet":
            with source.filesystem.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                    yield pa.Table.from_batches([batch])
            return
        with source.filesystem.open_input_stream(path) as f:
            if source.format == "arrow":
                table = pa.ipc.open_file(pa.BufferReader(f.read())).read_all()
            elif source.format == "jsonl":
                table = pajson.read_json(f)
            else:
                parse = pacsv.ParseOptions(delimiter="\t", quote_char=False) if source.format == "tsv" else None
                table = pacsv.read_csv(f, parse_options=parse)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"cannot read {path!r} as {source.format}: {exc}") from None
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield pa.Table.from_batches([batch])


def iter_tables(source: Source, batch_rows: int = 1024):
    """Single-process read of a source in file order (for evaluating exported models without Ray)."""
    for index in range(len(source.files)):
        yield from _file_tables(source, index, batch_rows)


def count_rows(source: Source) -> int:
    """Rows in a source: from Parquet footers when possible (no data read), else by reading once."""
    if source.manifest is not None:
        return source.manifest["total_rows"]
    if source.format == "parquet":
        total = 0
        for path in source.files:
            try:
                with source.filesystem.open_input_file(path) as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            except (pa.ArrowInvalid, OSError) as exc:
                raise ValueError(
                    f"cannot read the Parquet footer of {path!r}: {exc}; the shard is corrupt or truncated."
                ) from None
        return total
    return sum(t.num_rows for t in iter_tables(source))


def check_labels(source: Source, label_column: str, num_labels: int, field: str) -> None:
    """Fail before training on a label outside [0, num_labels), naming the file and the row.

    Prepared shards carry per-shard label statistics in their manifest: only a shard whose
    statistics are out of range (or that has none) is read, to find the row.
    """
    import pyarrow.compute as pc

    for index, path in enumerate(source.files):
        if source.manifest is not None:
            stats = source.manifest["shards"][index].get("int_stats", {}).get(label_column)
            if stats and not stats["nulls"] and stats["min"] >= 0 and stats["max"] < num_labels:
                continue
        row = 0
        for table in _file_tables(source, index, batch_rows=65_536):
            labels = table.column(label_column)
            bad = pc.or_(pc.is_null(labels), pc.or_(pc.less(labels, 0), pc.greater_equal(labels, num_labels)))
            if pc.any(bad).as_py():
                i = pc.index(bad, True).as_py()
                row_id = f" (row_id {table.column('row_id')[i].as_py()})" if "row_id" in table.column_names else ""
                raise ValueError(
                    f"{field}: {path!r} row {row + i}{row_id} has {label_column}={labels[i].as_py()!r}, outside "
                    f"[0, {num_labels}); fix the data or set model.num_labels."
                )
            row += table.num_rows
