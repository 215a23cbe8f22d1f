"""`fmdist prepare`: formats, split, row ids, manifest, and de-identification."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from fmdist.data.prepare import prepare
from fmdist.data.sources import count_rows, iter_tables, resolve
from tests.ner_corpus import conll_file

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
        ids += row_ids(out / split)
    assert sorted(ids) == list(range(1000))  # every row once, with a stable id
    again = prepare(
        [str(src)], str(tmp_path / "again"), rows_per_shard=300, eval_fraction=0.2, seed=7, output_format="arrow"
    )
    assert [s["sha256"] for s in again["eval"]["shards"]] == [s["sha256"] for s in eval_["shards"]]
    # The seed decides the split: the same seed picks the same eval rows, another seed other rows.
    prepare([str(src)], str(tmp_path / "other"), rows_per_shard=300, eval_fraction=0.2, seed=8, output_format="arrow")
    assert row_ids(tmp_path / "again/eval") == row_ids(out / "eval")
    assert row_ids(tmp_path / "other/eval") != row_ids(out / "eval")
    assert train["label_names"] is None and train["task_hint"] is None


def row_ids(directory: Path) -> list[int]:
    return [i for t in iter_tables(resolve(str(directory))) for i in t.column("row_id").to_pylist()]


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


def png_bytes(value: int, comment: str = "") -> bytes:
    """A 4x4 grayscale PNG whose pixels depend on `value`; `comment` goes into a tEXt chunk."""
    image = Image.new("L", (4, 4))
    image.putdata([(value * 37 + i * 11) % 256 for i in range(16)])
    info = PngImagePlugin.PngInfo()
    if comment:
        info.add_text("Comment", comment)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def with_bad_pixel_data(png: bytes) -> bytes:
    """The PNG with its compressed pixel data spoiled, and the chunk's CRC made to match (so only decoding fails)."""
    at = png.index(b"IDAT")
    length = int.from_bytes(png[at - 4 : at], "big")
    data = bytearray(png[at + 4 : at + 4 + length])
    data[0] ^= 0xFF  # the zlib header
    crc = zlib.crc32(b"IDAT" + data).to_bytes(4, "big")
    return png[: at + 4] + bytes(data) + crc + png[at + 8 + length :]


def write_image_folder(root: Path, images: dict[str, bytes]) -> Path:
    for relative, data in images.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def test_image_folder_rows_carry_the_file_bytes_and_the_class_of_their_folder(tmp_path):
    images = {
        "zebra/z1.png": png_bytes(1),
        "zebra/z2.PNG": png_bytes(2),
        "ant/a1.png": png_bytes(3, comment="contact jane.doe@example.com today"),  # text a redactor would replace
        "ant/nested/a2.png": png_bytes(4),
        "Mole/m1.png": png_bytes(5),
        "Mole/m2.png": png_bytes(6),
        "Mole/m3.png": png_bytes(7),
    }
    folder = write_image_folder(tmp_path / "images", images)
    (folder / "ant/notes.txt").write_text("not an image")
    (folder / "zebra/.hidden.png").write_bytes(b"skipped")
    manifests = prepare([str(folder)], str(tmp_path / "out"), redact=True, rows_per_shard=2, eval_fraction=0.3, seed=3)
    classes = ["Mole", "ant", "zebra"]  # plain string order, as torchvision's ImageFolder
    rows = [
        row
        for split in ("train", "eval")
        for t in iter_tables(resolve(str(tmp_path / "out" / split)))
        for row in t.to_pylist()
    ]
    assert sorted(r["path"] for r in rows) == sorted(images)  # every image once; the .txt and hidden file skipped
    for row in rows:
        assert row["image"] == images[row["path"]], row["path"]  # unchanged bytes, redaction included
        assert row["label"] == classes.index(row["path"].split("/")[0]), row["path"]
    assert 0 < manifests["eval"]["total_rows"] < len(images)
    for manifest in manifests.values():
        assert manifest["label_names"] == classes and manifest["task_hint"] == "image-classification"
        assert manifest["schema"] == {"row_id": "int64", "image": "binary", "label": "int64", "path": "string"}


def test_bad_image_folders_get_clear_errors(tmp_path):
    good = png_bytes(1)
    folder = write_image_folder(tmp_path / "images", {"cat/ok.png": good, "dog/ok.png": good})
    (folder / "dog/broken.png").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"dog/broken.png' is corrupt or not an image \(no image format matches"):
        prepare([str(folder)], str(tmp_path / "o1"))
    (folder / "dog/broken.png").write_bytes(good[:-12])  # no IEND chunk: Pillow's verify() notices, load() does not
    with pytest.raises(ValueError, match=r"dog/broken.png' is corrupt or not an image \(OSError: truncated"):
        prepare([str(folder)], str(tmp_path / "o2"))
    (folder / "dog/broken.png").write_bytes(with_bad_pixel_data(good))  # load() notices, verify() does not
    with pytest.raises(ValueError, match=r"dog/broken.png' is corrupt or not an image \(OSError: broken data"):
        prepare([str(folder)], str(tmp_path / "o2b"))
    (folder / "dog/broken.png").unlink()
    (folder / "emu").mkdir()
    with pytest.raises(ValueError, match=r"class folder 'emu' holds no images"):
        prepare([str(folder)], str(tmp_path / "o3"))
    flat = write_image_folder(tmp_path / "flat", {"a.png": good})
    with pytest.raises(ValueError, match=r"flat' is a directory with no class sub-folders"):
        prepare([str(flat)], str(tmp_path / "o4"))
    assert not (tmp_path / "o4").exists()  # nothing written before the inputs are checked


def test_conll_label_names_are_the_tags_of_all_inputs_with_o_first(tmp_path):
    more = tmp_path / "more.conll"
    more.write_text("-DOCSTART- -X- -X- O\n\nEaster NNP B-NP B-DATE\nMonday NNP I-NP I-DATE\n. . O O\n")
    inputs = [str(conll_file(tmp_path / "ner.txt", 200, seed=0)), str(more)]
    manifests = prepare(inputs, str(tmp_path / "out"), eval_fraction=0.2, seed=0)
    seen = {
        tag
        for split in ("train", "eval")
        for table in iter_tables(resolve(str(tmp_path / "out" / split)))
        for tags in table.column("tags").to_pylist()
        for tag in tags
    }
    names = manifests["train"]["label_names"]
    assert manifests["eval"]["label_names"] == names
    assert names[0] == "O" and names[1:] == sorted(seen - {"O"})
    assert {"B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "B-DATE"} <= seen
    assert manifests["train"]["task_hint"] == manifests["eval"]["task_hint"] == "token-classification"


def test_image_folder_on_s3(s3_bucket, tmp_path):
    import boto3

    images = {"cat/1.png": png_bytes(1), "cat/2.png": png_bytes(2), "dog/1.png": png_bytes(3)}
    for relative, data in images.items():
        boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"images/{relative}", Body=data)
    manifests = prepare([f"s3://{s3_bucket}/images"], str(tmp_path / "out"))
    rows = [row for t in iter_tables(resolve(str(tmp_path / "out/train"))) for row in t.to_pylist()]
    assert [(r["path"], r["label"], r["image"]) for r in rows] == [(p, int(p[0] == "d"), d) for p, d in images.items()]
    assert manifests["train"]["label_names"] == ["cat", "dog"]
