"""NER and image classification end to end on Ray Train: 2 workers (world size 2), DeepSpeed ZeRO-2,
then export, plain-transformers pipelines, and `fmdist eval` equal to the run's own evaluation."""

from __future__ import annotations

import random

import pytest

from fmdist.config import from_dict
from fmdist.data.prepare import prepare
from fmdist.predict import evaluate, predict
from fmdist.train.export import export
from fmdist.train.launch import train
from tests.conftest import TINY_MODEL
from tests.ner_corpus import conll_file
from tests.tasks.test_image_classification import image_folder, shape_png, tiny_image_model

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory):
    """CoNLL files given straight to data.train / data.eval: prepared once into the cache, streamed."""
    root = tmp_path_factory.mktemp("ner_ray")
    model = {k: v for k, v in TINY_MODEL.items() if k != "num_labels"}
    raw = {
        "model": {**model, "task": "token-classification"},
        "data": {
            "train": str(conll_file(root / "train.txt", 480, seed=1)),
            "eval": str(conll_file(root / "valid.txt", 75, seed=2)),  # odd: ranks get 37 and 38 sentences
        },
        "train": {"max_steps": 45, "micro_batch_size": 8, "lr": 5e-3, "log_every_steps": 15},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"name": "ner", "storage_path": str(root / "runs")},
    }
    summary = train(from_dict(raw))
    export(summary["run_dir"], str(root / "model"))
    return {"summary": summary, "model": str(root / "model"), "raw": raw}


def test_ner_on_two_workers_counts_every_eval_sentence_once_and_learns(ner_run):
    metrics = ner_run["summary"]["eval"]
    assert ner_run["summary"]["step"] == 45
    assert metrics["num_examples"] == 75
    assert metrics["f1"] > 0.7, metrics


def test_ner_export_runs_in_the_transformers_pipeline_and_evaluates_alike(ner_run):
    from transformers import AutoModelForTokenClassification, pipeline

    model = AutoModelForTokenClassification.from_pretrained(ner_run["model"])
    assert model.config.id2label[0] == "O" and "B-PER" in model.config.label2id
    text = "Angela Merkel visited Paris on Tuesday ."
    [found] = predict(ner_run["model"], [text])
    spans = {(e["entity"], text[e["start"] : e["end"]]) for e in found["entities"]}
    assert spans >= {("PER", "Angela Merkel"), ("LOC", "Paris")}, found
    simple = pipeline("token-classification", model=ner_run["model"], aggregation_strategy="simple")(text)
    assert {"PER", "LOC"} <= {e["entity_group"] for e in simple}
    exported = evaluate(ner_run["model"], ner_run["raw"]["data"]["eval"])
    trained = ner_run["summary"]["eval"]
    assert exported["per_type"] == trained["per_type"]
    assert exported["loss"] == pytest.approx(trained["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("images_ray")
    prepare([str(image_folder(root / "folder", 100, seed=3))], str(root / "data"), eval_fraction=0.2,
            rows_per_shard=40)  # fmt: skip
    raw = {
        "model": {"name_or_path": tiny_image_model(root / "cnn"), "task": "image-classification"},
        "data": {"train": str(root / "data")},  # a prepare output: trains on train/, evaluates on eval/
        "train": {"max_steps": 30, "micro_batch_size": 8, "lr": 3e-3, "log_every_steps": 10},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
        "run": {"name": "images", "storage_path": str(root / "runs")},
    }
    summary = train(from_dict(raw))
    export(summary["run_dir"], str(root / "model"))
    return {"summary": summary, "model": str(root / "model"), "root": root}


def test_images_on_two_workers_export_to_the_transformers_pipeline(image_run):
    from PIL import Image
    from transformers import pipeline

    summary = image_run["summary"]
    eval_rows = sum(1 for _ in (image_run["root"] / "data").glob("eval/*.parquet"))
    assert eval_rows > 0 and summary["eval"]["num_examples"] > 0
    assert summary["eval"]["accuracy"] > 0.8, summary["eval"]["confusion_matrix"]
    exported = evaluate(image_run["model"], str(image_run["root"] / "data/eval"))
    assert exported["confusion_matrix"] == summary["eval"]["confusion_matrix"]
    png = image_run["root"] / "column.png"
    png.write_bytes(shape_png("column", random.Random(99)))
    classify = pipeline("image-classification", model=image_run["model"], use_fast=False)
    assert classify(Image.open(png))[0]["label"] == "column"
    assert predict(image_run["model"], [str(png)])[0]["label"] == "column"
