"""Text for language modelling as packed token blocks, tokenized once into the cache.

Packing concatenates every document's tokens, each followed by the EOS token, and cuts the stream
into blocks of exactly `data.max_length` tokens: no padding, no truncation, every token trained on.
Only the last block of a split is shorter (the collate pads it and masks the padding out).

Why the blocks are made here, once, and not by a packer inside the training stream:
- the step plan is exact: blocks are the rows of a manifest, so every rank knows the number of
  optimizer steps before training (the plan of data/stream.py, unchanged);
- resume is exact for free: a checkpoint's stream position is a position in the blocks, so there are
  no carried-over tokens to save, and nothing is re-tokenized on resume;
- the text is tokenized once per (data, tokenizer, block length), not once per epoch per worker.
Blocks are cut from the documents in order, so each block is contiguous text; training shuffles
whole blocks, never lines within a block.

Each block also records `chars`: the characters of the tokens it predicts (all but its first),
from the tokenizer's offsets, so that evaluation reports exact nats and bits per character.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from fmdist import __version__
from fmdist.data.fs import filesystem
from fmdist.data.sources import MANIFEST, Source, iter_tables, resolve
from fmdist.runtime import get_logger

BLOCKS_PER_SHARD = 64
"""Small shards, so that a small corpus still spreads over the workers."""
log = get_logger("fmdist.data")


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens)."""
    text = tokenizer.backend_tokenizer.to_str() + json.dumps(
        [tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.cls_token_id], default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


def separator_id(tokenizer: Any) -> int:
    """The token that ends a document: EOS, or SEP for encoders (BERT) that have no EOS."""
    token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if token_id is None:
        raise ValueError(
            "the tokenizer has neither an EOS nor a SEP token to separate packed documents; set model.tokenizer."
        )
    return token_id


def _digest(source: Source, tokenizer: Any, text_column: str, block_tokens: int) -> str:
    shards = [
        {k: s.get(k) for k in ("path", "rows", "bytes", "sha256", "row_group")} for s in source.manifest["shards"]
    ]
    key = json.dumps([__version__, source.uri, shards, text_column, block_tokens, BLOCKS_PER_SHARD], default=str)
    return hashlib.sha256((key + tokenizer_digest(tokenizer)).encode()).hexdigest()


def pack_blocks(texts: Any, tokenizer: Any, block_tokens: int) -> Any:
    """Yield (input_ids, chars) blocks from an iterable of documents, in order (the last may be short)."""
    eos = separator_id(tokenizer)
    ids: list[int] = []
    lengths: list[int] = []  # characters of each token (0 for EOS)
    for batch in texts:
        encoded = tokenizer(list(batch), add_special_tokens=False, return_offsets_mapping=True)
        for doc_ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
            ids += [*doc_ids, eos]
            lengths += [end - start for start, end in offsets] + [0]
        while len(ids) >= block_tokens:
            yield ids[:block_tokens], sum(lengths[1:block_tokens])
            ids, lengths = ids[block_tokens:], lengths[block_tokens:]
    if ids:
        yield ids, sum(lengths[1:])


def packed_split(
    source: Source, tokenizer: Any, text_column: str, block_tokens: int, cache_dir: str, field: str
) -> Source:
    """The split as shards of packed blocks (columns row_id, input_ids, chars), made once into the cache.

    Raises:
        ValueError: when the split has no column `text_column`.
    """
    from fmdist.data.prepare import ShardWriter

    if text_column not in source.manifest["schema"]:
        raise ValueError(
            f"{field}: {source.uri!r} has no column {text_column!r} to pack; it has "
            f"{list(source.manifest['schema'])}. Set data.text_column."
        )
    target = f"{cache_dir.rstrip('/')}/packed-{_digest(source, tokenizer, text_column, block_tokens)[:24]}"
    fs, path = filesystem(target)
    if fs.get_file_info(f"{path}/{MANIFEST}").type == pafs.FileType.File:
        return resolve(target, field)
    log.info("%s: tokenizing and packing %s into blocks of %d tokens at %s (once; later runs reuse them)",
             field, source.uri, block_tokens, target)  # fmt: skip
    local = isinstance(fs, pafs.LocalFileSystem)
    # Locally: write beside the target and rename, so that a run or trial that sees it sees it whole.
    # Object stores have no rename; there the manifest is written last, so a torn pack is redone.
    write_path = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}" if local else path
    fs.create_dir(write_path, recursive=True)
    writer = ShardWriter(fs, write_path, "parquet", BLOCKS_PER_SHARD)
    texts = (t.column(text_column).to_pylist() for t in iter_tables(source, batch_rows=1024))
    counts = {"tokens": 0, "chars": 0, "documents": source.manifest["total_rows"]}
    batch: dict[str, list] = {"row_id": [], "input_ids": [], "chars": []}
    blocks = 0
    for ids, chars in pack_blocks(([str(t or "") for t in column] for column in texts), tokenizer, block_tokens):
        batch["row_id"].append(blocks)
        blocks += 1
        batch["input_ids"].append(ids)
        batch["chars"].append(chars)
        counts["tokens"] += len(ids)
        counts["chars"] += chars
        if len(batch["row_id"]) == BLOCKS_PER_SHARD:
            writer.add(_table(batch), source.uri)
            batch = {k: [] for k in batch}
    if batch["row_id"]:
        writer.add(_table(batch), source.uri)
    writer.flush()
    if not blocks:
        raise ValueError(f"{field}: {source.uri!r} has no text in column {text_column!r}; nothing to train on.")
    manifest = {
        "fmdist_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "format": "parquet",
        "schema": {f.name: str(f.type) for f in writer.schema},
        "total_rows": sum(s["rows"] for s in writer.shards),
        "shards": writer.shards,
        "sources": [source.uri],
        "label_names": None,
        "task_hint": None,
        "packing": {"block_tokens": block_tokens, "text_column": text_column, **counts},
    }
    with fs.open_output_stream(f"{write_path}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=2).encode())
    if local:
        try:
            os.rename(write_path, path)
        except OSError:  # another process packed the same split first
            shutil.rmtree(write_path, ignore_errors=True)
    return resolve(target, field)


def _table(batch: dict[str, list]) -> pa.Table:
    return pa.table(
        {
            "row_id": pa.array(batch["row_id"], pa.int64()),
            "input_ids": pa.array(batch["input_ids"], pa.list_(pa.int32())),
            "chars": pa.array(batch["chars"], pa.int64()),
        }
    )
