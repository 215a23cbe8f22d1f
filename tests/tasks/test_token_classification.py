"""Token classification: word alignment, seqeval-equal metrics, label checks, and the loop in-process
(world size 1) learning NER from a generated CoNLL corpus and resuming to the same weights."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from fmdist.config import freeze_labels, from_dict
from fmdist.data.inputs import open_split
from fmdist.tasks import get
from fmdist.tasks.common import load_tokenizer
from fmdist.train.checkpoint import consolidated_state_dict
from tests.conftest import TINY_MODEL
from tests.inprocess import run_in_process
from tests.ner_corpus import conll_file

TAGS = ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]
TASK = get("token-classification")


def ner_config(**train) -> dict:
    model = {k: v for k, v in TINY_MODEL.items() if k != "num_labels"}
    return {
        "model": {**model, "task": "token-classification"},
        "data": {"train": "unused-by-the-loop", "shuffle_window_rows": 32},
        "train": {"micro_batch_size": 16, "lr": 5e-3, "log_every_steps": 20, **train},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
    }


def test_first_sub_token_carries_the_tag_and_cut_words_are_counted():
    cfg = from_dict(ner_config())
    freeze_labels(cfg, TAGS)
    tokenizer = load_tokenizer(TINY_MODEL["name_or_path"])
    rows = {"tokens": [["Schwarzenegger", "visited", "Kathmandu"]], "tags": [["B-PER", "O", "B-LOC"]]}
    batch = TASK.collate(rows, tokenizer, cfg)
    # [CLS] schwarz ##ene ##gger visited kathmandu [SEP]
    assert batch["labels"][0].tolist() == [-100, TAGS.index("B-PER"), -100, -100, 0, TAGS.index("B-LOC"), -100]
    assert batch["stats/words_cut"].item() == 0
    cfg.data.max_length = 4  # [CLS] schwarz ##ene [SEP]: "visited" and "Kathmandu" are cut
    assert TASK.collate(rows, tokenizer, cfg)["stats/words_cut"].item() == 2
    # Integer tags index the label set the same way.
    ints = {"tokens": rows["tokens"], "tags": [[TAGS.index(t) for t in rows["tags"][0]]]}
    cfg.data.max_length = 128
    assert torch.equal(TASK.collate(ints, tokenizer, cfg)["labels"], batch["labels"])
    with pytest.raises(ValueError, match="tag 'B-DATE' is not in the label set"):
        TASK.collate({"tokens": [["May"]], "tags": [["B-DATE"]]}, tokenizer, cfg)


def test_finalize_equals_seqeval_classification_report():
    """Random gold and predicted tags (invalid IOB2 sequences included), counted batch by batch."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    cfg = from_dict(ner_config())
    freeze_labels(cfg, TAGS)
    rng = random.Random(0)
    counts = torch.zeros(TASK.counts_size(cfg), dtype=torch.float64)
    gold_all, pred_all = [], []
    for _ in range(20):  # batches
        lengths = [rng.randint(1, 12) for _ in range(4)]
        width = max(lengths) + 2
        labels = torch.full((4, width), -100)
        logits = torch.zeros(4, width, len(TAGS))
        for i, n in enumerate(lengths):
            gold = [rng.choice(TAGS) if rng.random() < 0.5 else "O" for _ in range(n)]
            # Mostly right, sometimes wrong: both partial matches and type errors occur.
            pred = [g if rng.random() < 0.7 else rng.choice(TAGS) for g in gold]
            gold_all.append(gold)
            pred_all.append(pred)
            for j, (g, p) in enumerate(zip(gold, pred, strict=True)):
                labels[i, j + 1] = TAGS.index(g)
                logits[i, j + 1, TAGS.index(p)] = 1.0
        out = SimpleNamespace(logits=logits, loss=torch.tensor(0.5))
        TASK.count(counts, out, {"labels": labels}, cfg)
    metrics = TASK.finalize(counts.tolist(), cfg)
    report = classification_report(gold_all, pred_all, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    for entity in ("LOC", "MISC", "ORG", "PER"):
        for key in ("precision", "recall"):
            assert metrics["per_type"][entity][key] == pytest.approx(report[entity][key])
        assert metrics["per_type"][entity]["f1"] == pytest.approx(report[entity]["f1-score"])
        assert metrics["per_type"][entity]["support"] == report[entity]["support"]
    assert metrics["f1"] == pytest.approx(report["micro avg"]["f1-score"])
    assert metrics["precision"] == pytest.approx(report["micro avg"]["precision"])
    assert metrics["num_examples"] == len(gold_all)
    correct = sum(g == p for gs, ps in zip(gold_all, pred_all, strict=True) for g, p in zip(gs, ps, strict=True))
    assert metrics["token_accuracy"] == pytest.approx(correct / sum(map(len, gold_all)))
    assert 0.2 < metrics["f1"] < 0.9  # neither trivial case


def test_a_tag_outside_the_label_set_names_the_file_and_row(tmp_path):
    conll = conll_file(tmp_path / "train.conll", 40, seed=1)
    lines = conll.read_text().splitlines()
    # The 3rd sentence's first tag becomes one the label set lacks.
    sentence_starts = [i + 1 for i, line in enumerate(lines) if not line.strip() and i + 1 < len(lines)]
    token, pos, chunk, _ = lines[sentence_starts[2]].split()
    lines[sentence_starts[2]] = f"{token} {pos} {chunk} B-DATE"
    conll.write_text("\n".join(lines) + "\n")
    source = open_split(str(conll), "data.train", str(tmp_path / "cache"))
    cfg = from_dict({**ner_config(), "model": {**ner_config()["model"], "label_names": TAGS}})
    with pytest.raises(ValueError, match=r"part-00000.parquet' row 2 \(row_id 2\) has tag 'B-DATE'"):
        TASK.check_labels(cfg, source, "data.train")


@pytest.fixture(scope="module")
def ner_runs(tmp_path_factory):
    """A CoNLL file prepared through the cache (as data.train=FILE does), then three in-process runs:
    uninterrupted, paused mid-epoch, and resumed from the pause."""
    root = tmp_path_factory.mktemp("ner")
    cache = str(root / "cache")
    train = open_split(str(conll_file(root / "train.conll", 600, seed=1)), "data.train", cache)
    evaluation = open_split(str(conll_file(root / "eval.conll", 96, seed=2)), "data.eval", cache)

    def run(name: str, stop: int | None = None, restore: str | None = None, steps: int = 60) -> tuple[dict, str]:
        cfg = from_dict(ner_config(max_steps=steps))
        freeze_labels(cfg, train.manifest["label_names"])
        summary, reports = run_in_process(cfg, train, str(root / name), evaluation, stop=stop, restore=restore)
        return summary, reports[-1][1]

    untrained, _ = run("untrained", steps=1)
    whole = run("whole")
    paused = run("paused", stop=25)  # mid-epoch: 600 rows / 16 = 38 iters per epoch
    resumed = run("resumed", restore=paused[1])
    return {"untrained": untrained, "whole": whole, "resumed": resumed, "label_names": train.manifest["label_names"]}


def test_ner_learns_entities_far_above_an_untrained_model(ner_runs):
    assert ner_runs["label_names"][0] == "O" and "B-PER" in ner_runs["label_names"]
    trained, untrained = ner_runs["whole"][0]["eval"], ner_runs["untrained"]["eval"]
    assert trained["num_examples"] == 96
    assert untrained["f1"] < 0.2, untrained["f1"]
    assert trained["f1"] > 0.8, trained
    assert all(trained["per_type"][t]["f1"] > 0.6 for t in ("PER", "LOC", "ORG")), trained["per_type"]


def test_ner_resumed_mid_epoch_ends_with_the_same_weights(ner_runs):
    a = consolidated_state_dict(ner_runs["whole"][1])
    b = consolidated_state_dict(ner_runs["resumed"][1])
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point()) < 1e-6
    assert ner_runs["resumed"][0]["eval"]["f1"] == pytest.approx(ner_runs["whole"][0]["eval"]["f1"], abs=1e-9)
