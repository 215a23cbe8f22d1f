"""Resolve `data.train` / `data.eval` to shards, and read them.

One resolver for every location: pyarrow's filesystem layer handles local paths and s3:// URIs alike,
so a directory, a glob or a single file means the same thing on a laptop and on a cluster.

Every source is a list of shards with row counts, which is all the resumable stream needs:
- a directory written by `fmdist prepare`: its manifest's shards (sha256-checked on every read);
- plain Parquet / Arrow files: each row group (record batch) is a shard, counted from the file's
  metadata without reading any rows;
- other formats (CSV, TSV, JSONL, CoNLL, text) are prepared once into a cache (data/inputs.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fmdist.data.fs import filesystem

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
    ".conll": "conll",
    ".txt": "text",
}
SHARD_FORMATS = ("parquet", "arrow")
"""Formats read in place; the others are prepared into shards first."""


@dataclass(frozen=True)
class Source:
    """A resolved data location: its files (sorted, so the order is the same on every machine)."""

    uri: str
    filesystem: pafs.FileSystem
    files: tuple[str, ...]
    format: str
    manifest: dict | None = None
    """Shards and schema: the `fmdist prepare` manifest (with checksums) for a prepared directory, or
    one made from the files' metadata (`prepared: false`) for plain Parquet/Arrow; None for formats
    that must be prepared first."""

    @property
    def prepared(self) -> bool:
        return self.manifest is not None and self.manifest.get("prepared", True)


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
        if info.type == pafs.FileType.Directory and is_prepare_output(uri):
            raise ValueError(
                f"{field}: {uri!r} is the output of fmdist prepare; point at its train/ or eval/ directory "
                f"(data.train={uri.rstrip('/')}/train), or give it as data.train, which does this for you."
            )
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
    fmt = formats.pop()
    if fmt in SHARD_FORMATS:
        return _resolve_files_as_shards(uri, fs, files, fmt, field)
    return Source(uri=uri, filesystem=fs, files=tuple(files), format=fmt)


def is_prepare_output(uri: str) -> bool:
    """True for the directory `fmdist prepare` wrote (it holds train/manifest.json), not a split of it."""
    fs, path = filesystem(uri)
    return fs.get_file_info(f"{path}/train/{MANIFEST}").type == pafs.FileType.File


def _resolve_files_as_shards(uri: str, fs: pafs.FileSystem, files: list[str], fmt: str, field: str) -> Source:
    """Plain Parquet/Arrow files as shards: one per row group (record batch), counted from metadata.

    A file whose row groups are fewer than the workers leaves some of them idle: write smaller row
    groups, or run fmdist prepare, for an even split.
    """
    shards, paths, schema = [], [], None
    for path in files:
        try:
            if fmt == "parquet":
                with fs.open_input_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
                    file_schema = meta.schema.to_arrow_schema()
                counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            else:
                with fs.open_input_file(path) as f:
                    reader = pa.ipc.open_file(f)
                    file_schema = reader.schema
                    counts = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(
                f"{field}: cannot read {path!r} as {fmt}: {exc}; the file is corrupt or truncated."
            ) from None
        if schema is None:
            schema = file_schema
        elif file_schema.names != schema.names:
            raise ValueError(
                f"{field}: {path!r} has columns {file_schema.names} but {paths[0]!r} has {schema.names}; "
                "every file of a data set needs the same columns."
            )
        for group, rows in enumerate(counts):
            if rows:
                shards.append({"path": path.rsplit("/", 1)[-1], "rows": rows, "row_group": group})
                paths.append(path)
    manifest = {
        "prepared": False,
        "format": fmt,
        "schema": {f.name: str(f.type) for f in schema},
        "total_rows": sum(s["rows"] for s in shards),
        "shards": shards,
        "label_names": None,
    }
    return Source(uri=uri, filesystem=fs, files=tuple(paths), format=fmt, manifest=manifest)


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


def read_shard(source: Source, index: int) -> pa.Table:
    """One whole shard: a prepared one size- and sha256-checked against its manifest, or one row group
    of a plain file (errors name the shard)."""
    shard = source.manifest["shards"][index]
    path = source.files[index]
    if not source.prepared:
        try:
            with source.filesystem.open_input_file(path) as f:
                if source.format == "parquet":
                    return pq.ParquetFile(f).read_row_group(shard["row_group"])
                return pa.Table.from_batches([pa.ipc.open_file(f).get_batch(shard["row_group"])])
        except (pa.ArrowInvalid, OSError) as exc:
            raise OSError(f"row group {shard['row_group']} of {path!r} could not be read: {exc}") from exc
    try:
        with source.filesystem.open_input_stream(path) as f:
            data = f.read()
    except OSError as exc:
        # The S3 client has already retried transient errors (fs.py); this is past the retry budget.
        raise OSError(f"shard {path!r} of {source.uri} could not be read: {exc}") from exc
    return pa.concat_tables(list(decode_verified_shard(data, path, shard, source.format)))


def first_row_in_file(source: Source, index: int) -> int:
    """The file-level row number of shard `index`'s first row: 0 for a prepared shard (a file each),
    the rows of the earlier row groups for a row group of a plain Parquet/Arrow file."""
    return sum(s["rows"] for s, f in zip(source.manifest["shards"][:index], source.files, strict=False)
               if f == source.files[index])  # fmt: skip


def iter_file_tables(source: Source, index: int, batch_rows: int = 65_536):
    """Tables of one shard of a source, in row order (prepared shards are verified first)."""
    for batch in read_shard(source, index).to_batches(max_chunksize=batch_rows):
        yield pa.Table.from_batches([batch])


def iter_tables(source: Source, batch_rows: int = 1024):
    """Single-process read of a source's shards in order."""
    for index in range(len(source.files)):
        yield from iter_file_tables(source, index, batch_rows)


def count_rows(source: Source) -> int:
    """Rows in a source, from its manifest (plain Parquet/Arrow: from the files' metadata)."""
    return source.manifest["total_rows"]


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
        row = first_row_in_file(source, index)
        for table in iter_file_tables(source, index):
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


PROVENANCE_FILE = "provenance.json"
"""Written into the run directory by `fmdist train`: where the data came from (see `provenance`)."""
CHECKSUM_LIMIT_BYTES = 1 << 30
"""Plain Parquet/Arrow files carry no checksums; fmdist hashes them for the record up to this total size."""


def provenance(source: Source) -> dict[str, Any]:
    """Where a split came from, for the model card: its URI, the inputs it was prepared from, rows, and each
    shard's sha256 (from the manifest, or hashed here for plain files), plus the de-identification record.
    """
    manifest = source.manifest or {}
    shards = []
    files = dict.fromkeys(source.files)  # a plain Parquet file appears once per row group
    sizes = {f: source.filesystem.get_file_info(f).size or 0 for f in files} if not source.prepared else {}
    hash_plain = sum(sizes.values()) <= CHECKSUM_LIMIT_BYTES
    if source.prepared:
        shards = [{"path": s["path"], "rows": s["rows"], "sha256": s["sha256"]} for s in manifest["shards"]]
    else:
        rows: dict[str, int] = {}
        for shard, path in zip(manifest.get("shards", []), source.files, strict=False):
            rows[path] = rows.get(path, 0) + shard["rows"]
        for path in files:
            digest = "not computed (over 1 GiB: run fmdist prepare for checksummed shards)"
            if hash_plain:
                hasher = hashlib.sha256()
                with source.filesystem.open_input_stream(path) as f:
                    while chunk := f.read(1 << 22):
                        hasher.update(chunk)
                digest = hasher.hexdigest()
            shards.append({"path": path.rsplit("/", 1)[-1], "rows": rows.get(path, 0), "sha256": digest})
    return {
        "uri": source.uri,
        "sources": manifest.get("sources"),
        "rows": manifest.get("total_rows"),
        "shards": shards,
        "deidentification": manifest.get("deidentification"),
    }
