"""`fmdist prepare`: formats, split, row ids, manifest, and de-identification."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fmdist.data.prepare import prepare
from fmdist.data.sources import count_rows, iter_tables, resolve

PLANTED = {
    "EMAIL": ["jane.doe@example.com", "r.smith+ml@mail.example.org"],
    "PHONE": ["+1 415-555-0132", "(212) 555-0187"],
    "URL": ["https://intranet.example.com/patients?id=77", "www.example.net/profile"],
    "IP": ["192.168.10.45", "2001:db8::8a2e:370:7334"],
    "CREDIT_CARD": ["4111 1111 1111 1111", "5500-0000-0000-0004"],  # Luhn-valid test numbers
}
KEPT = ["4111 1111 1111 1112", "the 1999 film ran 124 minutes", "John Smith"]  # invalid Luhn, numbers, a name


def write_corpus(path: Path) -> Path:
    lines = ["text\tlabel"]
    for kind, values in PLANTED.items():
        for value in values:
            lines.append(f"contact {value} about the {kind.lower()} film\t1")
    for value in KEPT:
        lines.append(f"note: {value}\t0")
    path.write_text("\n".join(lines) + "\n")
    return path


def all_text(directory: Path) -> str:
    text = []
    for path in sorted(directory.rglob("*")):
        if path.suffix == ".parquet":
            text.append(json.dumps(pq.read_table(path).to_pylist()))
        elif path.is_file():
            text.append(path.read_text(errors="replace"))
    return "\n".join(text)


def test_redaction_replaces_what_is_planted_and_leaves_the_rest(tmp_path):
    out = tmp_path / "out"
    manifests = prepare([str(write_corpus(tmp_path / "corpus.tsv"))], str(out), redact=True)
    rows = pq.read_table(out / "train" / "part-00000.parquet").to_pylist()
    texts = [r["text"] for r in rows]
    everything = all_text(out)
    for kind, values in PLANTED.items():
        for value in values:
            assert value not in everything, (kind, value)  # not in shards, not in the manifest
        assert sum(f"<{kind}>" in t for t in texts) == len(values), (kind, texts)
    for value in KEPT:
        assert any(value in t for t in texts), value
    replaced = manifests["train"]["deidentification"]["replaced"]
    assert replaced == {kind: len(values) for kind, values in PLANTED.items()}
    assert "person names are not detected" in manifests["train"]["deidentification"]["not_covered"][0]


def test_conll_keeps_token_alignment_under_redaction(tmp_path):
    conll = tmp_path / "ner.txt"
    conll.write_text(
        "-DOCSTART- -X- -X- O\n\nMail NN B-NP O\njane@example.com NN I-NP O\nin IN B-PP O\nParis NNP B-NP B-LOC\n\n"
        "Call VB B-VP O\n192.168.0.1 CD B-NP O\n"
    )
    manifests = prepare([str(conll)], str(tmp_path / "out"), redact=True)
    rows = pq.read_table(tmp_path / "out/train/part-00000.parquet").to_pylist()
    assert [r["tokens"] for r in rows] == [["Mail", "<EMAIL>", "in", "Paris"], ["Call", "<IP>"]]
    assert [r["tags"] for r in rows] == [["O", "O", "O", "B-LOC"], ["O", "O"]]
    assert rows[0]["pos_tags"] == ["NN", "NN", "IN", "NNP"]
    assert manifests["train"]["schema"]["tokens"] == "list<item: string>"


def test_split_shards_row_ids_and_manifest(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) + "\n" for i in range(1000)))
    out = tmp_path / "out"
    manifests = prepare([str(src)], str(out), rows_per_shard=300, eval_fraction=0.2, seed=7, output_format="arrow")
    train, eval_ = manifests["train"], manifests["eval"]
    assert train["total_rows"] + eval_["total_rows"] == 1000
    assert 150 < eval_["total_rows"] < 250
    assert [s["rows"] for s in train["shards"]][:-1] == [300] * (len(train["shards"]) - 1)
    ids = []
    for split in ("train", "eval"):
        source = resolve(str(out / split))
        assert source.manifest is not None and count_rows(source) == manifests[split]["total_rows"]
        ids += [i for t in iter_tables(source) for i in t.column("row_id").to_pylist()]
    assert sorted(ids) == list(range(1000))  # every row once, with a stable id
    again = prepare(
        [str(src)], str(tmp_path / "again"), rows_per_shard=300, eval_fraction=0.2, seed=7, output_format="arrow"
    )
    assert [s["sha256"] for s in again["eval"]["shards"]] == [s["sha256"] for s in eval_["shards"]]
    other = prepare([str(src)], str(tmp_path / "other"), rows_per_shard=300, eval_fraction=0.2, seed=8)
    assert other["eval"]["total_rows"] != eval_["total_rows"] or other["eval"]["shards"] != eval_["shards"]


def test_sst2_style_unquoted_tsv(tmp_path):
    src = tmp_path / "sst.tsv"
    src.write_text('sentence\tlabel\nit \'s a "gem" of a film \t1\n" quoted start\t0\n')
    prepare([str(src)], str(tmp_path / "out"))
    rows = pq.read_table(tmp_path / "out/train/part-00000.parquet").to_pylist()
    assert [r["sentence"] for r in rows] == ['it \'s a "gem" of a film ', '" quoted start']


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"sentence": f"s{i}", "label": 0}) + "\n" for i in range(50)))
    prepare([str(src)], str(tmp_path / "out"), rows_per_shard=20)
    shard = tmp_path / "out/train/part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"part-00001.parquet.*fails its checksum"):
        list(iter_tables(resolve(str(tmp_path / "out/train"))))
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match=r"part-00001.parquet.*truncated"):
        list(iter_tables(resolve(str(tmp_path / "out/train"))))
    shard.unlink()
    with pytest.raises(ValueError, match=r"part-00001.parquet.*is missing"):
        resolve(str(tmp_path / "out/train"))


def test_bad_inputs_get_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl' line 2: not valid JSON"):
        prepare([str(bad)], str(tmp_path / "o1"))
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("sentence,label\nx,1\n")
    b.write_text("text,label\ny,0\n")
    with pytest.raises(ValueError, match=r"b.csv' has columns .* but earlier inputs"):
        prepare([str(a), str(b)], str(tmp_path / "o2"))
    weird = tmp_path / "x.weird"
    weird.write_text("z")
    with pytest.raises(ValueError, match="cannot tell its format"):
        prepare([str(weird)], str(tmp_path / "o3"))


def test_labels_outside_num_labels_are_reported_with_file_and_row(tmp_path):
    from fmdist.data.sources import check_labels

    src = tmp_path / "rows.jsonl"
    src.write_text(
        "".join(json.dumps({"sentence": f"s{i}", "label": 5 if i == 137 else i % 2}) + "\n" for i in range(200))
    )
    prepare([str(src)], str(tmp_path / "out"), rows_per_shard=100)
    manifest = json.loads((tmp_path / "out/train/manifest.json").read_text())
    assert [s["int_stats"]["label"]["max"] for s in manifest["shards"]] == [1, 5]
    # The in-range shard is not read: deleting it does not change the answer.
    (tmp_path / "out/train/part-00000.parquet").unlink()
    with pytest.raises(ValueError, match=r"part-00001.parquet' row 37 \(row_id 137\) has label=5, outside \[0, 2\)"):
        check_labels(resolve_unchecked(tmp_path / "out/train"), "label", 2, "data.train")
    check_labels(resolve_unchecked(tmp_path / "out/train"), "label", 6, "data.train")


def resolve_unchecked(directory: Path):
    """A prepared source without resolve()'s check that every shard exists."""
    import pyarrow.fs as pafs

    from fmdist.data.sources import Source

    manifest = json.loads((directory / "manifest.json").read_text())
    files = tuple(str(directory / s["path"]) for s in manifest["shards"])
    return Source(str(directory), pafs.LocalFileSystem(), files, manifest["format"], manifest)
