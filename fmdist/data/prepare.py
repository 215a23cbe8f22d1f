"""`fmdist prepare`: raw files -> (de-identified) Parquet or Arrow shards with a manifest.

Reads CSV, TSV (unquoted, like SST-2), JSONL, CoNLL column files, plain text and image folders (one
sub-folder per class, as torchvision's ImageFolder) as streams, so memory is bounded by one shard
whatever the input size. Every row gets a stable `row_id` (its position in the inputs), a seeded split
decides train or eval, and each split directory gets a `manifest.json` with the schema, per-shard
rows, bytes and sha256, the sources, the label names and task the data suggests, and what
de-identification did.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from fmdist import __version__
from fmdist.data.deid import Redactor, entity_types
from fmdist.data.fs import filesystem
from fmdist.data.sources import MANIFEST

INPUT_FORMATS = ("csv", "tsv", "jsonl", "conll", "text")
IMAGE_FOLDER = "imagefolder"  # what a directory input is read as; not an --input-format choice
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TASK_HINTS = {IMAGE_FOLDER: "image-classification", "conll": "token-classification"}
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


TEXT_ROW_CHARS = 8192
"""A paragraph longer than this is cut into rows of whole lines (a file without blank lines stays spread
over many rows and shards)."""


def _read_text(fs: pafs.FileSystem, path: str) -> Iterator[Columns]:
    """Rows of running text for language modelling: a paragraph per row (its lines up to and including
    the blank lines after it), every newline kept, so that the rows in order are the file exactly."""
    batch: list[str] = []
    paragraph: list[str] = []
    size = 0
    for line in _text_lines(fs, path):
        starts_paragraph = bool(line.strip()) and bool(paragraph) and not paragraph[-1].strip()
        if starts_paragraph or (paragraph and size + len(line) > TEXT_ROW_CHARS):
            batch.append("".join(paragraph))
            paragraph, size = [], 0
        paragraph.append(line)
        size += len(line)
        if len(batch) == BATCH_ROWS:
            yield {"text": batch}
            batch = []
    if paragraph:
        batch.append("".join(paragraph))
    if batch:
        yield {"text": batch}


def _tail_split(fs: pafs.FileSystem, path: str, eval_fraction: float) -> Iterator[tuple[Columns, list[bool]]]:
    """A text file's rows with their split: eval is the contiguous tail holding `eval_fraction` of the
    characters, so a language model is evaluated on text that follows its training text, never on
    lines shuffled out of it."""
    total = sum(len(line) for line in _text_lines(fs, path))
    seen = 0
    for columns in _read_text(fs, path):
        is_eval = []
        for text in columns["text"]:
            is_eval.append(seen >= total * (1 - eval_fraction))
            seen += len(text)
        yield columns, is_eval


@dataclass(frozen=True)
class ImageFolder:
    """A directory with one sub-folder per class, listed once: file names only, no image bytes."""

    uri: str
    filesystem: pafs.FileSystem
    root: str
    classes: tuple[str, ...]
    """Class folder names, sorted."""
    images: tuple[tuple[str, str], ...]
    """(path relative to `root` with `/` separators, class name), class by class, each class sorted by path."""


def scan_image_folder(uri: str) -> ImageFolder:
    """List an image-folder input: its class sub-folders and, under each (recursively), its image files.

    Hidden files and folders (a leading `.`, such as `.ipynb_checkpoints`) are skipped, as are files
    without an image suffix and files directly under `uri`, as torchvision's ImageFolder does.

    Raises:
        ValueError: naming `uri` when it has no class sub-folders, or a class folder holds no images.
    """
    fs, root = filesystem(uri)
    top = fs.get_file_info(pafs.FileSelector(root))
    classes = sorted(i.base_name for i in top if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))
    if not classes:
        raise ValueError(
            f"input {uri!r} is a directory with no class sub-folders; an image-folder input needs one sub-folder "
            f"per class holding that class's images (e.g. {uri.rstrip('/')}/cat/001.png). To prepare data files, "
            "pass the files themselves."
        )
    images: list[tuple[str, str]] = []
    for name in classes:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{name}", recursive=True))
        relatives = (i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File)
        found = sorted(
            r
            for r in relatives
            if r.lower().endswith(IMAGE_SUFFIXES) and not any(p.startswith(".") for p in r.split("/"))
        )
        if not found:
            raise ValueError(
                f"input {uri!r}: class folder {name!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "add its images or remove the folder."
            )
        images += [(relative, name) for relative in found]
    return ImageFolder(uri, fs, root, tuple(classes), tuple(images))


def _checked_image(folder: ImageFolder, relative: str) -> bytes:
    """The file's bytes, unchanged, after Pillow has decoded them (so training never meets a bad image)."""
    where = f"{folder.uri.rstrip('/')}/{relative}"
    try:
        with folder.filesystem.open_input_stream(f"{folder.root}/{relative}") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"image {where!r} cannot be read ({exc}); check its permissions or remove it.") from None
    try:
        # verify() checks structure and checksums without decoding (a PNG cut short fails here); load()
        # decodes the pixels (broken pixel data fails here). verify() spends the image, hence two opens.
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # Pillow raises many types for a bad file (OSError, SyntaxError, struct.error, ...)
        why = (
            "no image format matches it" if isinstance(exc, UnidentifiedImageError) else f"{type(exc).__name__}: {exc}"
        )
        raise ValueError(
            f"image {where!r} is corrupt or not an image ({why}); replace or delete that file, then run fmdist "
            "prepare again."
        ) from None
    return data


def read_image_folder(folder: ImageFolder, class_index: dict[str, int]) -> Iterator[Columns]:
    """Batches of `image` (encoded bytes), `label` (index of the class in `class_index`) and `path`."""
    batch: Columns = {"image": [], "label": [], "path": []}
    for relative, name in folder.images:
        batch["image"].append(_checked_image(folder, relative))
        batch["label"].append(class_index[name])
        batch["path"].append(relative)
        if len(batch["path"]) == BATCH_ROWS:
            yield batch
            batch = {"image": [], "label": [], "path": []}
    if batch["path"]:
        yield batch


def input_kind(uri: str, fmt: str | None = None) -> str:
    """IMAGE_FOLDER for a directory, else the file's format: `fmt` when given, or inferred."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        if fmt is not None:
            raise ValueError(
                f"input {uri!r} is a directory, which is read as an image folder (one sub-folder per class); "
                f"--input-format {fmt} applies to files: pass the files, or drop --input-format."
            )
        return IMAGE_FOLDER
    if info.type != pafs.FileType.File:
        raise ValueError(f"input {uri!r} does not exist or is not a file.")
    return fmt or infer_format(uri, fs, path)


def label_names(kind: str | None, names: set[str]) -> list[str] | None:
    """The label vocabulary for the manifest: class folders sorted; CoNLL tags with "O" first, then sorted;
    None for other kinds of input (or a mix of kinds)."""
    if kind == IMAGE_FOLDER:
        return sorted(names)
    if kind == "conll":
        return ["O", *sorted(names - {"O"})] if "O" in names else sorted(names)
    return None


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
    """Redact every text value; lists of tokens are redacted one for one, so alignment with tags is kept.

    Binary values (encoded images) and numbers are left as they are; so are tag columns (`tags`, `*_tags`).
    """
    out: Columns = {}
    for name, values in columns.items():
        if values and all(isinstance(v, str) or v is None for v in values):
            out[name] = redactor.redact_many(values)
        elif values and all(isinstance(v, list) for v in values) and name != "tags" and not name.endswith("_tags"):
            out[name] = redactor.redact_tokens(values)
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


EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
TOKENIZER_DIR = "tokenizer"


def train_bpe_tokenizer(texts: Iterator[str], vocab_size: int, out_dir: str) -> Any:
    """A byte-level BPE (GPT-2's scheme: any text encodes, newlines included) trained on `texts` with the
    tokenizers library, saved as a transformers tokenizer in `out_dir`; returns it.

    `<|endoftext|>` separates documents (bos, eos and unk) and `<pad>` pads; neither is ever learned
    from the text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"--vocab-size {vocab_size}: must be at least 260 (256 bytes plus the special tokens).")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    wrapped.save_pretrained(out_dir)
    return wrapped


def prepare(
    inputs: list[str],
    output: str,
    *,
    redact: bool = False,
    redact_entities: str | Sequence[str] = (),
    output_format: str = "parquet",
    rows_per_shard: int = 10_000,
    eval_fraction: float = 0.0,
    seed: int = 0,
    input_format: str | None = None,
    train_tokenizer: str | None = None,
    vocab_size: int = 8192,
    text_column: str = "text",
) -> dict[str, dict]:
    """Write shards and manifests under `output`/train (and `output`/eval); returns the manifests.

    An input that is a directory is read as an image folder: one sub-folder per class, giving rows of
    `image` (the file's encoded bytes, unchanged), `label` (the class's index among all inputs' class
    folders, sorted by name) and `path` (relative to the folder). Each manifest records `label_names`
    (class folders, or the CoNLL tag vocabulary of all inputs with "O" first; None for other inputs) and
    `task_hint` ("image-classification", "token-classification" or None).

    Plain text is read a paragraph per row with its newlines, and its eval split is the contiguous tail
    of each file. `train_tokenizer="bpe"` trains a byte-level BPE of `vocab_size` on the train split's
    `text_column` and writes it to `output`/tokenizer (for `model.tokenizer`).

    `redact` replaces e-mails, URLs, IPs, card and phone numbers, and the named entities of
    `redact_entities` (PERSON, LOCATION, ORGANIZATION; detected with `fmdist[pii]`, and recorded as not
    covered without it). `fmdist prepare --redact` asks for PERSON unless told otherwise.
    """
    if train_tokenizer not in (None, "bpe"):
        raise ValueError(f"--train-tokenizer {train_tokenizer!r}: only bpe is supported.")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"--format {output_format!r}: must be parquet or arrow.")
    if rows_per_shard <= 0:
        raise ValueError(f"--rows-per-shard {rows_per_shard}: must be greater than 0.")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"--eval-fraction {eval_fraction}: must be in [0, 1).")
    entities = entity_types(redact_entities)
    if entities and not redact:
        raise ValueError(f"--redact-entities {','.join(entities)} applies only with --redact; add --redact.")
    # Every input is checked, and image folders listed, before anything is written.
    kinds = {uri: input_kind(uri, input_format) for uri in inputs}
    folders = {uri: scan_image_folder(uri) for uri, kind in kinds.items() if kind == IMAGE_FOLDER}
    if folders and len(folders) != len(kinds):
        files = [uri for uri in kinds if uri not in folders]
        raise ValueError(
            f"inputs mix image folders {list(folders)} and files {files}; prepare one kind of data per output directory."
        )
    # Class indices over all folders, so that the same class has the same label in every input and split.
    classes = sorted({name for folder in folders.values() for name in folder.classes})
    class_index = {name: i for i, name in enumerate(classes)}
    names = set(classes)
    fs, root = filesystem(output)
    splits = ["train", "eval"] if eval_fraction > 0 else ["train"]
    writers = {}
    for split in splits:
        fs.create_dir(f"{root}/{split}", recursive=True)
        writers[split] = ShardWriter(fs, f"{root}/{split}", output_format, rows_per_shard)
    redactor = Redactor(entities=entities) if redact else None
    rng = random.Random(seed)
    next_row_id = 0
    for uri in inputs:
        if kinds[uri] == "text" and len(splits) == 2:
            fs_in, path_in = filesystem(uri)
            batches = _tail_split(fs_in, path_in, eval_fraction)
        elif uri in folders:
            batches = read_image_folder(folders[uri], class_index)
        else:
            batches = read_input(uri, kinds[uri])
        for columns in batches:
            tail = None
            if isinstance(columns, tuple):
                columns, tail = columns
            if kinds[uri] == "conll":
                # The tag vocabulary of all inputs, so train and eval manifests carry the same list.
                names.update(tag for sentence in columns["tags"] for tag in sentence)
            n = len(next(iter(columns.values())))
            if redactor is not None:
                columns = redact_columns(columns, redactor)
            columns = {"row_id": list(range(next_row_id, next_row_id + n)), **columns}
            next_row_id += n
            table = pa.table(columns)
            if len(splits) == 1:
                writers["train"].add(table, uri)
                continue
            is_eval = pa.array(tail if tail is not None else [rng.random() < eval_fraction for _ in range(n)])
            writers["eval"].add(table.filter(is_eval), uri)
            writers["train"].add(table.filter(pc.invert(is_eval)), uri)
    if next_row_id == 0:
        raise ValueError(f"inputs {inputs} hold no rows; nothing to prepare.")
    kind = kinds[inputs[0]] if len(set(kinds.values())) == 1 else None
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
            "label_names": label_names(kind, names),
            "task_hint": TASK_HINTS.get(kind),
            "split_rule": {
                "eval_fraction": eval_fraction,
                "seed": seed,
                "text": "contiguous tail of each text file" if "text" in kinds.values() else None,
            },
            "deidentification": redactor.report() if redactor else {"enabled": False},
        }
        with fs.open_output_stream(f"{root}/{split}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2).encode())
        manifests[split] = manifest
    if train_tokenizer:
        if text_column not in manifests["train"]["schema"]:
            raise ValueError(
                f"--train-tokenizer: the data has no column {text_column!r} to learn from "
                f"(it has {list(manifests['train']['schema'])}); pass --text-column."
            )
        train_bpe_tokenizer(_split_texts(fs, f"{root}/train", manifests["train"], text_column), vocab_size,
                            f"{root}/{TOKENIZER_DIR}")  # fmt: skip
    return manifests


def _split_texts(fs: pafs.FileSystem, directory: str, manifest: dict, column: str) -> Iterator[str]:
    for shard in manifest["shards"]:
        with fs.open_input_file(f"{directory}/{shard['path']}") as f:
            table = (
                pq.read_table(f, columns=[column])
                if manifest["format"] == "parquet"
                else pa.ipc.open_file(f).read_all()
            )
        yield from (t for t in table.column(column).to_pylist() if t)
