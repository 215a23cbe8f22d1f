"""`fmdist prepare`: raw files -> (de-identified) Parquet or Arrow shards with a manifest.

Reads CSV, TSV (unquoted, like SST-2), JSONL, CoNLL column files and plain text as streams, so memory
is bounded by one shard whatever the input size. Every row gets a stable `row_id` (its position in
the inputs), a seeded split decides train or eval, and each split directory gets a `manifest.json`
with the schema, per-shard rows, bytes and sha256, the sources, and what de-identification did.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fmdist import __version__
from fmdist.data.deid import Redactor
from fmdist.data.fs import filesystem
from fmdist.data.sources import MANIFEST

INPUT_FORMATS = ("csv", "tsv", "jsonl", "conll", "text")
OUTPUT_FORMATS = {"parquet": ".parquet", "arrow": ".arrow"}
BATCH_ROWS = 1024

Columns = dict[str, list[Any]]


def infer_format(uri: str, fs: pafs.FileSystem, path: str) -> str:
    lower = uri.lower()
    for suffix, fmt in ((".tsv", "tsv"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl"), (".conll", "conll")):
        if lower.endswith(suffix):
            return fmt
    if lower.endswith(".txt"):
        # CoNLL-2003 ships as .txt; its first line is -DOCSTART-.
        with fs.open_input_stream(path) as f:
            head = f.read(64).decode("utf-8", "replace").lstrip()
        return "conll" if head.startswith("-DOCSTART-") else "text"
    raise ValueError(
        f"input {uri!r}: cannot tell its format from the suffix; pass --input-format {'|'.join(INPUT_FORMATS)}."
    )


def _text_lines(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    with fs.open_input_stream(path) as raw:
        yield from io.TextIOWrapper(raw, encoding="utf-8")


def _read_delimited(fs: pafs.FileSystem, path: str, fmt: str) -> Iterator[Columns]:
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False) if fmt == "tsv" else pacsv.ParseOptions()
    with fs.open_input_stream(path) as f:
        reader = pacsv.open_csv(f, parse_options=parse, read_options=pacsv.ReadOptions(block_size=1 << 20))
        for batch in reader:
            yield batch.to_pydict()


def _read_jsonl(fs: pafs.FileSystem, path: str, uri: str) -> Iterator[Columns]:
    rows: list[dict] = []
    for line_no, line in enumerate(_text_lines(fs, path), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"input {uri!r} line {line_no}: not valid JSON ({exc.msg}); fix or remove that line."
            ) from None
        if len(rows) == BATCH_ROWS:
            yield _columns(rows, uri)
            rows = []
    if rows:
        yield _columns(rows, uri)


def _columns(rows: list[dict], uri: str) -> Columns:
    keys = list(rows[0])
    for row in rows:
        if list(row) != keys and set(row) != set(keys):
            raise ValueError(
                f"input {uri!r}: rows have different fields ({keys} vs {list(row)}); every row needs the same."
            )
    return {k: [row[k] for row in rows] for k in keys}


def _read_conll(fs: pafs.FileSystem, path: str) -> Iterator[Columns]:
    """Token per line (first column = token, last = tag), blank line between sentences, -DOCSTART- skipped."""
    sentences: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in _text_lines(fs, path):
        parts = line.split()
        if not parts:
            if current:
                sentences.append(current)
                current = []
        elif parts[0] != "-DOCSTART-":
            current.append(parts)
        if len(sentences) == BATCH_ROWS:
            yield _conll_columns(sentences)
            sentences = []
    if current:
        sentences.append(current)
    if sentences:
        yield _conll_columns(sentences)


def _conll_columns(sentences: list[list[list[str]]]) -> Columns:
    out: Columns = {"tokens": [[t[0] for t in s] for s in sentences], "tags": [[t[-1] for t in s] for s in sentences]}
    if all(len(t) == 4 for s in sentences for t in s):  # CoNLL-2003: token POS chunk NER
        out["pos_tags"] = [[t[1] for t in s] for s in sentences]
        out["chunk_tags"] = [[t[2] for t in s] for s in sentences]
    return out


def _read_text(fs: pafs.FileSystem, path: str) -> Iterator[Columns]:
    batch: list[str] = []
    for line in _text_lines(fs, path):
        if line.strip():
            batch.append(line.rstrip("\n"))
        if len(batch) == BATCH_ROWS:
            yield {"text": batch}
            batch = []
    if batch:
        yield {"text": batch}


def read_input(uri: str, fmt: str | None = None) -> Iterator[Columns]:
    """Batches of columns from one input file, streamed."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ValueError(f"input {uri!r} does not exist or is not a file.")
    fmt = fmt or infer_format(uri, fs, path)
    if fmt in ("csv", "tsv"):
        return _read_delimited(fs, path, fmt)
    if fmt == "jsonl":
        return _read_jsonl(fs, path, uri)
    if fmt == "conll":
        return _read_conll(fs, path)
    if fmt == "text":
        return _read_text(fs, path)
    raise ValueError(f"--input-format {fmt!r}: must be one of {', '.join(INPUT_FORMATS)}.")


def redact_columns(columns: Columns, redactor: Redactor) -> Columns:
    """Redact every text value; lists of tokens are redacted token by token, so alignment is kept."""
    out: Columns = {}
    for name, values in columns.items():
        if values and all(isinstance(v, str) or v is None for v in values):
            out[name] = [redactor.redact(v) if v else v for v in values]
        elif values and all(isinstance(v, list) for v in values) and name != "tags" and not name.endswith("_tags"):
            out[name] = [[redactor.redact(t) if isinstance(t, str) else t for t in v] for v in values]
        else:
            out[name] = values
    return out


def _int_stats(table: pa.Table) -> dict[str, dict[str, int | None]]:
    """min, max and null count of every integer column, so that checks such as the label range
    before training need not read shards whose values are all in range."""
    stats = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type):
            bounds = pc.min_max(column).as_py()
            stats[name] = {"min": bounds["min"], "max": bounds["max"], "nulls": column.null_count}
    return stats


@dataclass
class ShardWriter:
    """Buffers one shard of rows, writes it, and records rows, bytes and sha256 for the manifest."""

    fs: pafs.FileSystem
    directory: str
    format: str
    rows_per_shard: int
    shards: list[dict] = field(default_factory=list)
    schema: pa.Schema | None = None
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered: int = 0

    def add(self, table: pa.Table, source: str) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif table.schema.names != self.schema.names:
            raise ValueError(
                f"input {source!r} has columns {table.schema.names} but earlier inputs have {self.schema.names}; "
                "prepare one kind of data per output directory."
            )
        else:
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"input {source!r}: column types differ from earlier inputs ({exc}).") from None
        while table.num_rows:
            take = min(table.num_rows, self.rows_per_shard - self._buffered)
            self._buffer.append(table.slice(0, take))
            self._buffered += take
            table = table.slice(take)
            if self._buffered == self.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer)
        sink = pa.BufferOutputStream()
        if self.format == "parquet":
            pq.write_table(table, sink, row_group_size=min(self.rows_per_shard, 8192))
        else:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        data = sink.getvalue().to_pybytes()
        name = f"part-{len(self.shards):05d}{OUTPUT_FORMATS[self.format]}"
        with self.fs.open_output_stream(f"{self.directory}/{name}") as f:
            f.write(data)
        self.shards.append(
            {
                "path": name,
                "rows": table.num_rows,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "int_stats": _int_stats(table),
            }
        )
        self._buffer, self._buffered = [], 0


def prepare(
    inputs: list[str],
    output: str,
    *,
    redact: bool = False,
    output_format: str = "parquet",
    rows_per_shard: int = 10_000,
    eval_fraction: float = 0.0,
    seed: int = 0,
    input_format: str | None = None,
) -> dict[str, dict]:
    """Write shards and manifests under `output`/train (and `output`/eval); returns the manifests."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"--format {output_format!r}: must be parquet or arrow.")
    if rows_per_shard <= 0:
        raise ValueError(f"--rows-per-shard {rows_per_shard}: must be greater than 0.")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"--eval-fraction {eval_fraction}: must be in [0, 1).")
    fs, root = filesystem(output)
    splits = ["train", "eval"] if eval_fraction > 0 else ["train"]
    writers = {}
    for split in splits:
        fs.create_dir(f"{root}/{split}", recursive=True)
        writers[split] = ShardWriter(fs, f"{root}/{split}", output_format, rows_per_shard)
    redactor = Redactor() if redact else None
    rng = random.Random(seed)
    next_row_id = 0
    for uri in inputs:
        for columns in read_input(uri, input_format):
            n = len(next(iter(columns.values())))
            if redactor is not None:
                columns = redact_columns(columns, redactor)
            columns = {"row_id": list(range(next_row_id, next_row_id + n)), **columns}
            next_row_id += n
            table = pa.table(columns)
            if len(splits) == 1:
                writers["train"].add(table, uri)
                continue
            is_eval = pa.array([rng.random() < eval_fraction for _ in range(n)])
            writers["eval"].add(table.filter(is_eval), uri)
            writers["train"].add(table.filter(pc.invert(is_eval)), uri)
    if next_row_id == 0:
        raise ValueError(f"inputs {inputs} hold no rows; nothing to prepare.")
    manifests = {}
    for split, writer in writers.items():
        writer.flush()
        manifest = {
            "fmdist_version": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "split": split,
            "format": output_format,
            "schema": {f.name: str(f.type) for f in (writer.schema or pa.schema([]))},
            "total_rows": sum(s["rows"] for s in writer.shards),
            "shards": writer.shards,
            "sources": list(inputs),
            "split_rule": {"eval_fraction": eval_fraction, "seed": seed},
            "deidentification": redactor.report() if redactor else {"enabled": False},
        }
        with fs.open_output_stream(f"{root}/{split}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2).encode())
        manifests[split] = manifest
    return manifests
